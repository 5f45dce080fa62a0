"""Corruptions (docs/robustness.md sec. 6.2, "Corruptions"): shapes, tables, seeds, known values,
monotonicity where it is guaranteed, and an optional oracle."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from noisystudent.errors import UserError
from noisystudent.robustness import corruptions as C
from noisystudent.robustness import perturbations as P


def natural_images(n: int, size: int = 32, seed: int = 0) -> np.ndarray:
    """Smooth, natural-like uint8 images (blurred noise + gradients), (n, size, size, 3)."""
    rng = np.random.default_rng(seed)
    out = []
    yy, xx = np.mgrid[0:size, 0:size] / size
    for _ in range(n):
        base = gaussian_filter(rng.random((size, size, 3)), (2, 2, 0))
        base = (base - base.min()) / (np.ptp(base) + 1e-9)
        g = rng.uniform(-0.3, 0.3, 3)
        img = 0.15 + 0.6 * base + g * (xx[..., None] - 0.5) + g[::-1] * (yy[..., None] - 0.5)
        out.append((np.clip(img, 0, 1) * 255).astype(np.uint8))
    return np.stack(out)


IMG32 = natural_images(1, 32)[0]


# --------------------------------------------------------------------------------------------
# shape, dtype, range
@pytest.mark.parametrize(
    "shape,table", [((32, 32), "cifar32"), ((64, 64), "tiny64"), ((24, 40), "cifar32")]
)
def test_every_corruption_and_severity_keeps_shape_and_uint8(shape, table):
    img = natural_images(1, max(shape), seed=3)[0][: shape[0], : shape[1]]
    for name in C.ALL:
        for s in range(1, 6):
            out = C.corrupt(img, name, s, np.random.default_rng(s), table)
            assert out.shape == img.shape and out.dtype == np.uint8, (name, s)


@pytest.mark.slow
def test_every_corruption_at_224():
    img = natural_images(1, 224, seed=4)[0]
    for name in C.ALL:
        for s in range(1, 6):
            out = C.corrupt(img, name, s, np.random.default_rng(s), "imagenet224")
            assert out.shape == img.shape and out.dtype == np.uint8, (name, s)


def test_bad_inputs_are_user_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(UserError, match="unknown corruption"):
        C.corrupt(IMG32, "rain", 1, rng)
    with pytest.raises(UserError, match="severity"):
        C.corrupt(IMG32, "contrast", 6, rng)
    with pytest.raises(UserError, match="uint8"):
        C.corrupt(IMG32.astype(np.float32), "contrast", 1, rng)
    with pytest.raises(UserError, match="table"):
        C.choose_table(32, "cifar100")


# --------------------------------------------------------------------------------------------
# tables (golden constants from docs/robustness.md sec. 1.4)
def test_names_order_and_held_out():
    assert C.BENCHMARK == (
        "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur",
        "motion_blur", "zoom_blur", "snow", "frost", "fog", "brightness", "contrast",
        "elastic_transform", "pixelate", "jpeg_compression",
    )  # fmt: skip
    assert C.HELD_OUT == ("speckle_noise", "gaussian_blur", "spatter", "saturate")
    assert not set(C.HELD_OUT) & set(C.BENCHMARK)
    assert list(C.ALEXNET_ERR) == list(C.BENCHMARK)
    for t in C.TABLES.values():
        assert set(t) == set(C.ALL) and all(len(v) == 5 for v in t.values())


GOLDEN = {
    "cifar32": {
        "gaussian_noise": [0.04, 0.06, 0.08, 0.09, 0.10],
        "shot_noise": [500, 250, 100, 75, 50],
        "impulse_noise": [0.01, 0.02, 0.03, 0.05, 0.07],
        "speckle_noise": [0.06, 0.10, 0.12, 0.16, 0.20],
        "gaussian_blur": [0.4, 0.6, 0.7, 0.8, 1],
        "glass_blur": [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)],
        "defocus_blur": [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)],
        "motion_blur": [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)],
        "fog": [(0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75)],
        "frost": [(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)],
        "contrast": [0.75, 0.5, 0.4, 0.3, 0.15],
        "brightness": [0.05, 0.1, 0.15, 0.2, 0.3],
        "saturate": [(0.3, 0), (0.1, 0), (1.5, 0), (2, 0.1), (2.5, 0.2)],
        "jpeg_compression": [80, 65, 58, 50, 40],
        "pixelate": [0.95, 0.9, 0.85, 0.75, 0.65],
        "elastic_transform": [
            (0, 0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)
        ],
        "snow": [
            (0.1, 0.2, 1, 0.6, 8, 3, 0.95), (0.1, 0.2, 1, 0.5, 10, 4, 0.9),
            (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9), (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
            (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8),
        ],
    },
    "tiny64": {
        "gaussian_noise": [0.04, 0.08, 0.12, 0.15, 0.18],
        "shot_noise": [250, 100, 50, 30, 15],
        "impulse_noise": [0.01, 0.02, 0.05, 0.08, 0.14],
        "defocus_blur": [(0.5, 0.6), (1, 0.1), (1.5, 0.1), (2.5, 0.01), (3, 0.1)],
        "contrast": [0.4, 0.3, 0.2, 0.1, 0.05],
        "saturate": [(0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (30, 0.2)],
        "jpeg_compression": [65, 58, 50, 40, 25],
        "pixelate": [0.9, 0.8, 0.7, 0.6, 0.5],
    },
    "imagenet224": {
        "gaussian_noise": [0.08, 0.12, 0.18, 0.26, 0.38],
        "shot_noise": [60, 25, 12, 5, 3],
        "impulse_noise": [0.03, 0.06, 0.09, 0.17, 0.27],
        "glass_blur": [(0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)],
        "defocus_blur": [(3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)],
        "motion_blur": [(10, 3), (15, 5), (15, 8), (15, 12), (20, 15)],
        "fog": [(1.5, 2), (2, 2), (2.5, 1.7), (2.5, 1.5), (3, 1.4)],
        "saturate": [(0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2)],
        "jpeg_compression": [25, 18, 15, 10, 7],
        "pixelate": [0.6, 0.5, 0.4, 0.3, 0.25],
    },
}  # fmt: skip


def test_tables_match_the_golden_constants():
    for table, rows in GOLDEN.items():
        for name, want in rows.items():
            got = C.TABLES[table][name]
            assert [tuple(np.atleast_1d(g)) for g in got] == [
                tuple(np.atleast_1d(w)) for w in want
            ], (table, name)
    assert [t[-1] for t in C.TABLES["tiny64"]["snow"]] == [0.8, 0.8, 0.7, 0.65, 0.6]
    assert C.TABLES["tiny64"]["snow"][2][:6] == C.TABLES["cifar32"]["snow"][2][:6]
    z = C.TABLES["cifar32"]["zoom_blur"]
    # np.arange(1, 1.06, 0.01) has 7 entries (float end point), as in the original scripts
    assert z[0] == tuple(np.arange(1, 1.06, 0.01)) and z[4] == tuple(np.arange(1, 1.26, 0.01))
    z = C.TABLES["imagenet224"]["zoom_blur"]
    assert z[4] == tuple(np.arange(1, 1.31, 0.03)) and z[2] == tuple(np.arange(1, 1.21, 0.02))
    assert C.ELASTIC_SCALE == {"cifar32": 32, "tiny64": 64, "imagenet224": 244}


def test_table_is_chosen_by_resolution():
    assert C.choose_table(32) == "cifar32" and C.choose_table(48) == "cifar32"
    assert C.choose_table(64) == "tiny64" and C.choose_table(128) == "tiny64"
    assert C.choose_table(224) == "imagenet224"
    assert C.choose_table(224, "cifar32") == "cifar32" and C.choose_table(32, "auto") == "cifar32"


# --------------------------------------------------------------------------------------------
# seeds
def test_same_seed_same_output_and_seed_dependence():
    for name in C.ALL:
        a = C.corrupt(IMG32, name, 3, np.random.default_rng(7))
        b = C.corrupt(IMG32, name, 3, np.random.default_rng(7))
        assert np.array_equal(a, b), name
        c = C.corrupt(IMG32, name, 3, np.random.default_rng(8))
        if name in C.RANDOM:
            assert not np.array_equal(a, c), f"{name} ignores the seed"
        else:
            assert np.array_equal(a, c), f"{name} should be deterministic"


# --------------------------------------------------------------------------------------------
# known values
def const(v: int, size: int = 32) -> np.ndarray:
    return np.full((size, size, 3), v, np.uint8)


def test_constant_image_unchanged_by_blurs_and_contrast():
    img = const(120)
    for name in ("contrast", "zoom_blur", "gaussian_blur", "defocus_blur"):
        for s in range(1, 6):
            out = C.corrupt(img, name, s, np.random.default_rng(0)).astype(int)
            assert np.abs(out - 120).max() <= 1, (name, s)


def test_imagenet_defocus_kernel_sums_are_kept_faithfully():
    sums = [C.disk(*C.TABLES["imagenet224"]["defocus_blur"][s]).sum() for s in range(5)]
    assert all(abs(v - 1) < 1e-5 for v in sums[:3])
    assert abs(sums[3] - 1.013) < 0.002 and abs(sums[4] - 1.011) < 0.002


def test_contrast_keeps_channel_means_and_brightness_keeps_white():
    x = (IMG32.astype(np.float64) / 255) * 0.5 + 0.25  # mid range: no clipping
    out = C.contrast(x, 0.3, None, {})
    assert np.allclose(out.mean((0, 1)), x.mean((0, 1)))
    for s in range(1, 6):
        assert (C.corrupt(const(255), "brightness", s, np.random.default_rng(0)) == 255).all()


def test_identities_pixelate_1_and_zoom_1():
    x = IMG32.astype(np.float64) / 255
    assert np.array_equal(C.to_uint8(C.pixelate(x, 1.0, None, {})), C.to_uint8(x))
    assert np.allclose(C.zoom_blur(x, (1.0,), None, {}), x)


def test_noise_statistics_on_mid_gray():
    x = np.full((96, 96, 3), 0.5)
    rng = np.random.default_rng(0)
    for c in (0.04, 0.1):
        d = C.gaussian_noise(x, c, rng, {}) - x
        assert abs(d.std() / c - 1) < 0.05
    for lam in (50, 500):
        v = C.shot_noise(x, lam, rng, {}).var()
        assert abs(v / (0.5 / lam) - 1) < 0.1
    for amount in (0.03, 0.07):
        frac = (C.impulse_noise(x, amount, rng, {}) != x).mean()
        assert abs(frac / amount - 1) < 0.1


def test_glass_blur_permutation_equals_naive_pixel_swaps():
    """The fast permutation form gives exactly the original's sequential swaps."""
    x = IMG32.astype(np.float64) / 255
    for c in ((0.25, 1, 2), (0.7, 2, 1)):
        fast = C.glass_blur(x, c, np.random.default_rng(5), {})
        sigma, delta, iters = c
        rng = np.random.default_rng(5)
        img = C.to_uint8(gaussian_filter(x, sigma=(sigma, sigma, 0), mode="nearest"))
        h, w = img.shape[:2]
        ys, xs = range(h - delta, delta, -1), range(w - delta, delta, -1)
        for _ in range(iters):
            d = rng.integers(-delta, delta, size=(len(ys) * len(xs), 2))
            k = 0
            for hh in ys:
                for ww in xs:
                    dx, dy = d[k]
                    k += 1
                    hp, wp = hh + dy, ww + dx
                    img[hh, ww], img[hp, wp] = img[hp, wp].copy(), img[hh, ww].copy()
        naive = gaussian_filter(img / 255.0, sigma=(sigma, sigma, 0), mode="nearest")
        assert np.array_equal(fast, naive)


def test_motion_blur_pad_once_equals_per_shift_edge_replication():
    x = np.random.default_rng(1).random((20, 28, 3))
    for radius, sigma, ang in ((6, 1.8, -45), (10, 3, 33), (14, 4, -150), (3, 1, 90)):
        width = radius * 2 + 1
        k = np.exp(-(np.arange(width) ** 2) / (2 * sigma**2))
        k /= k.sum()
        a = np.deg2rad(ang)
        py, px = width * np.sin(a), width * np.cos(a)
        want = np.zeros_like(x)
        for i in range(width):
            dy = -int(np.ceil(i * py / np.hypot(py, px) - 0.5))
            dx = -int(np.ceil(i * px / np.hypot(py, px) - 0.5))
            if abs(dy) >= 20 or abs(dx) >= 28:
                break
            want += k[i] * C._shift(x, dx, dy)
        assert np.allclose(C.motion_blur_array(x, radius, sigma, ang), want)


def test_clipped_zoom_matrix_equals_scipy_zoom():
    x = np.random.default_rng(0).random((24, 40, 3))
    for z in (1.0, 1.03, 1.17, 2.25):
        assert np.allclose(C.clipped_zoom(x, z), C._clipped_zoom_scipy(x, z), atol=1e-12)


# --------------------------------------------------------------------------------------------
# monotonicity only where guaranteed (not saturate, CIFAR glass, elastic, frost, spatter, jpeg)
MONOTONE = (
    "gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "gaussian_blur",
    "defocus_blur", "zoom_blur", "contrast", "brightness", "pixelate",
)  # fmt: skip


def test_mean_distance_non_decreasing_in_severity_for_the_monotone_family():
    imgs = natural_images(24, 32, seed=11)
    for name in MONOTONE:
        d = []
        for s in range(1, 6):
            rng = np.random.default_rng(s)
            d.append(
                np.mean(
                    [np.abs(C.corrupt(im, name, s, rng).astype(float) - im).mean() for im in imgs]
                )
            )
        assert all(b >= a - 1e-9 for a, b in zip(d, d[1:], strict=False)), (name, d)


# --------------------------------------------------------------------------------------------
# optional oracle
def test_oracle_imagecorruptions_224():
    ic = pytest.importorskip("imagecorruptions")
    img = natural_images(1, 224, seed=2)[0]
    for s in range(1, 6):
        for name, tol in (("contrast", 0), ("gaussian_blur", 0), ("jpeg_compression", 0)):
            want = ic.corrupt(img, severity=s, corruption_name=name)
            got = C.corrupt(img, name, s, np.random.default_rng(0), "imagenet224")
            assert np.abs(got.astype(int) - np.asarray(want).astype(int)).max() <= tol
        for name in ("brightness", "saturate"):
            want = np.asarray(ic.corrupt(img, severity=s, corruption_name=name)).astype(int)
            got = C.corrupt(img, name, s, np.random.default_rng(0), "imagenet224").astype(int)
            assert np.abs(got - want).max() <= 1


# --------------------------------------------------------------------------------------------
# perturbation sequences (sec. 6.2 "Sequence sanity")
@pytest.mark.parametrize("kind", ["cifar", "imagenet"])
def test_perturbation_frame_counts_and_clean_frames(kind):
    img = natural_images(1, 32, seed=5)[0]
    want = {
        "translate": 16 if kind == "cifar" else 41,
        "motion_blur": 21 if kind == "cifar" else 31,
    }
    for name in P.TEST:
        seq = P.sequence(img, name, np.random.default_rng(0), kind)
        assert seq.dtype == np.uint8 and seq.shape[1:] == img.shape
        assert len(seq) == want.get(name, 31), name
        k = P.clean_frame_index(name, kind)
        if name in P.NOISE or name in ("translate", "rotate", "scale", "tilt"):
            assert np.array_equal(seq[k], img), name
        elif name == "brightness":
            assert np.abs(seq[k].astype(int) - img).max() <= 1
        if name in P.NOISE:
            assert not np.array_equal(seq[1], img)
    with pytest.raises(UserError, match="unknown perturbation"):
        P.sequence(img, "shear", np.random.default_rng(0), kind)
    assert P.choose_kind(32) == "cifar" and P.choose_kind(224) == "imagenet"
