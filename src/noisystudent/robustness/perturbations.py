"""ImageNet-P style perturbation sequences (Hendrycks & Dietterich, ICLR 2019; docs/robustness.md
sec. 3.2): the 10 test perturbations, CIFAR-P parameters for small images (<= 48 px) and
ImageNet-P ones for larger, difficulty 1.

`sequence(img, name, rng, kind)` takes a uint8 (H, W, 3) image and returns uint8 (T, H, W, 3).
Noise sequences: frame 0 is the clean image, frames 1..30 independent draws (compared with
frame 0 by the flip metrics). Temporal sequences change one parameter frame by frame; the frame
with parameter 0 (translate 0, rotate 0, tilt 0, scale 1, brightness 0) equals the clean image.

Deviations: the geometric perturbations are applied to the already centre-cropped image with
reflect-101 borders (ImageNet-P warps the 256-px image before its crop, so it has real content
at the borders); snow's layer uses (mu, sigma, threshold) = (0.1, 0.3, 0.5) (not stated in the
notes); frames are stored losslessly (ImageNet-P used MP4).
"""

from __future__ import annotations

import cv2
import numpy as np

from ..errors import UserError
from .corruptions import clipped_zoom, hsv2rgb, motion_blur_array, rgb2hsv, to_uint8

TEST = (
    "gaussian_noise",
    "shot_noise",
    "motion_blur",
    "zoom_blur",
    "snow",
    "brightness",
    "translate",
    "rotate",
    "tilt",
    "scale",
)
NOISE = frozenset({"gaussian_noise", "shot_noise"})  # compared with the clean first frame

# kind -> per-perturbation parameters (difficulty 1)
PARAMS = {
    "cifar": {
        "gaussian_noise": {"sigma": 0.02, "frames": 31},
        "shot_noise": {"lam": 700, "frames": 31},
        "motion_blur": {"radius": 6, "sigma": 1.8, "frames": 21, "deg_per_frame": 9},
        "zoom_blur": {"step": 0.004, "frames": 31},
        "snow": {"radius": 10, "sigma": 2, "zoom": 2, "blend": 0.85, "frames": 31},
        "brightness": {"step": 0.015, "frames": 31},
        "translate": {"frames": 16},
        "rotate": {"frames": 31},
        "tilt": {"deg_per_frame": 0.75, "frames": 31},
        "scale": {"a": 2.0, "b": 70.0, "frames": 31},
    },
    "imagenet": {
        "gaussian_noise": {"sigma": 0.03, "frames": 31},
        "shot_noise": {"lam": 300, "frames": 31},
        "motion_blur": {"radius": 10, "sigma": 3, "frames": 31, "deg_per_frame": 4},
        "zoom_blur": {"step": 0.004, "frames": 31},
        "snow": {"radius": 14, "sigma": 4, "zoom": 2, "blend": 0.85, "frames": 31},
        "brightness": {"step": 0.02, "frames": 31},
        "translate": {"frames": 41},
        "rotate": {"frames": 31},
        "tilt": {"deg_per_frame": 1.0, "frames": 31},
        "scale": {"a": 2.5, "b": 40.0, "frames": 31},
    },
}
SNOW_LAYER = (0.1, 0.3, 0.5)  # mu, sigma, threshold of the fixed snow layer


def choose_kind(size: int) -> str:
    """CIFAR-P parameters up to 48 px, ImageNet-P above."""
    return "cifar" if size <= 48 else "imagenet"


def frame_count(name: str, kind: str) -> int:
    return PARAMS[kind][name]["frames"]


def _warp(x: np.ndarray, m: np.ndarray) -> np.ndarray:
    h, w = x.shape[:2]
    if m.shape == (2, 3):
        return cv2.warpAffine(
            x, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101
        )
    return cv2.warpPerspective(
        x, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101
    )


def _tilt_matrix(h: int, w: int, deg: float) -> np.ndarray:
    """Homography of a rotation by `deg` about both the x and y axes, focal sqrt(w^2 + h^2)."""
    f = float(np.hypot(w, h))
    a = np.deg2rad(deg)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    k = np.array([[f, 0, w / 2], [0, f, h / 2], [0, 0, 1]])
    return k @ rx @ ry @ np.linalg.inv(k)


def sequence(img: np.ndarray, name: str, rng: np.random.Generator, kind: str) -> np.ndarray:
    """The perturbation sequence of one image: uint8 (H, W, 3) -> uint8 (T, H, W, 3)."""
    if name not in TEST:
        raise UserError(f"unknown perturbation '{name}'; known: {', '.join(TEST)}")
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise UserError(f"sequence() needs a uint8 (H, W, 3) image, got {img.dtype} {img.shape}")
    p = PARAMS[kind][name]
    n = p["frames"]
    h, w = img.shape[:2]
    x = img.astype(np.float64) / 255.0
    frames = np.empty((n, h, w, 3), dtype=np.uint8)
    frames[0] = img
    if name == "gaussian_noise":
        for i in range(1, n):
            frames[i] = to_uint8(x + rng.normal(size=x.shape, scale=p["sigma"]))
    elif name == "shot_noise":
        for i in range(1, n):
            frames[i] = to_uint8(rng.poisson(x * p["lam"]) / p["lam"])
    elif name == "motion_blur":
        mid = n - 1
        for i in range(n):
            ang = (i - mid) * p["deg_per_frame"]
            frames[i] = to_uint8(motion_blur_array(x, p["radius"], p["sigma"], ang))
    elif name == "zoom_blur":
        acc = np.zeros_like(x)
        for i in range(n):  # running mean of zooms 1, 1.004, ..., 1 + 0.004 i
            acc += clipped_zoom(x, 1 + p["step"] * i)
            frames[i] = to_uint8(acc / (i + 1))
    elif name == "snow":
        mu, sd, t = SNOW_LAYER
        layer = rng.normal(size=(h, w), loc=mu, scale=sd)[..., None]
        layer = clipped_zoom(layer, p["zoom"])
        layer[layer < t] = 0
        layer = to_uint8(layer[..., 0]) / 255.0
        gray = cv2.cvtColor(x.astype(np.float32), cv2.COLOR_RGB2GRAY)[..., None]
        base = p["blend"] * x + (1 - p["blend"]) * np.maximum(x, gray * 1.5 + 0.5)
        for i in range(n):
            lb = motion_blur_array(layer, p["radius"], p["sigma"], i * 4 - 150)[..., None]
            frames[i] = to_uint8(base + lb + np.rot90(lb, k=2))
    elif name == "brightness":
        hsv = rgb2hsv(x)
        mid = n // 2
        for i in range(n):
            hv = hsv.copy()
            hv[..., 2] = np.clip(hv[..., 2] + (i - mid) * p["step"], 0, 1)
            frames[i] = img if i == mid else to_uint8(hsv2rgb(hv))
    elif name == "translate":
        mid = n // 2 - 1 if kind == "cifar" else n // 2  # CIFAR: shifts -7..8, ImageNet: -20..20
        for i in range(n):
            m = np.float32([[1, 0, i - mid], [0, 1, 0]])
            frames[i] = _warp(img, m)
    elif name == "rotate":
        for i in range(n):
            m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), float(i - n // 2), 1.0)
            frames[i] = _warp(img, m)
    elif name == "tilt":
        for i in range(n):
            frames[i] = _warp(img, _tilt_matrix(h, w, (i - n // 2) * p["deg_per_frame"]))
    elif name == "scale":
        for i in range(n):
            s = (p["a"] * i + p["b"]) / 100.0
            m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), 0.0, s)
            frames[i] = _warp(img, m)
    return frames


def clean_frame_index(name: str, kind: str) -> int:
    """Index of the frame whose parameter is zero (the clean image), for the sanity tests."""
    n = frame_count(name, kind)
    if name in NOISE:
        return 0
    if name == "translate":
        return n // 2 - 1 if kind == "cifar" else n // 2
    if name == "scale":
        p = PARAMS[kind]["scale"]
        return int(round((100 - p["b"]) / p["a"]))
    return n // 2
