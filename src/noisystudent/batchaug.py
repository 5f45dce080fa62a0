"""The student's input noise on whole uint8 batches: crop/flip, RandAugment and Cutout as torch
tensor ops, one call per training step, on the CPU or the GPU the model runs on.

Why not timm/torchvision: their RandAugment works one PIL image at a time (about 0.5 ms per
32 px image here, as much as a small ResNet's whole training step on a 2-core CPU), and
neither has the reference code's semantics (see `randaugment_ops`). torchvision.transforms.v2
takes batches but draws one op and one magnitude for the whole batch.

The reference code's RandAugment (method.md): each of N layers picks one of 16 ops uniformly
and always applies it at magnitude level = M / 10, not clipped (M = 27 is 2.7x the nominal
maximum); fill 128. Per-op arguments, as the reference `level_to_arg`:
  Rotate level x 30 deg, ShearX/Y level x 0.3, TranslateX/Y level x size/8 px (random sign);
  Posterize keeps int(level x 4) bits; Solarize inverts pixels >= int(level x 256);
  SolarizeAdd adds int(level x 110) below 128; Color/Contrast/Brightness/Sharpness blend with
  factor level x 1.8 + 0.1; Cutout a square of side 2 x int(level x size/8);
  AutoContrast, Equalize, Invert take no argument.
Small images (<= 64 px, the reference's CIFAR/SVHN setting) also get a reflect-pad random crop
(size/8) before and an extra Cutout of side size/2 after. Every random draw comes from the
generator passed in, so a step's noise is a function of its seed (exact resume).
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F

from .errors import UserError

FILL = 128.0
OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
       "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX",
       "TranslateY", "Cutout")  # fmt: skip
GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")
_GRAY = (0.299, 0.587, 0.114)  # PIL's "L" conversion


def parse_randaugment(spec: str) -> tuple[int, float]:
    """'rand-m9-n2' -> (N=2, M=9.0). Only N and M: the reference semantics have no other knob."""
    parts = spec.split("-")
    n, m = 2, 9.0
    if parts[0] != "rand":
        raise UserError(f"randaugment '{spec}' must look like 'rand-m9-n2'")
    for p in parts[1:]:
        if re.fullmatch(r"m\d+(\.\d+)?", p):
            m = float(p[1:])
        elif re.fullmatch(r"n\d+", p):
            n = int(p[1:])
        else:
            raise UserError(
                f"randaugment '{spec}': '{p}' is not supported with randaugment_semantics="
                "reference (only mM and nN); set randaugment_semantics=timm for timm's options"
            )
    return n, m


# --------------------------------------------------------------------------------------------
# ops on float batches (B, 3, H, W) holding integer values 0..255; `a` holds per-image arguments
def _blend(degenerate: torch.Tensor, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (degenerate + f.view(-1, 1, 1, 1) * (x - degenerate)).clamp_(0, 255).round_()


def _gray(x: torch.Tensor) -> torch.Tensor:
    w = torch.tensor(_GRAY, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True).round_()


def _autocontrast(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    lo = x.amin((2, 3), keepdim=True)
    hi = x.amax((2, 3), keepdim=True)
    scale = 255.0 / (hi - lo).clamp_min(1)
    return torch.where(hi > lo, ((x - lo) * scale).floor_().clamp_(0, 255), x)


def _equalize(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """PIL's ImageOps.equalize per channel: lut[i] = (step // 2 + #pixels below i) // step with
    step = (#pixels - #pixels of the highest value present) // 255; identity when step is 0."""
    b, c, h, w = x.shape
    v = x.long().view(b * c, h * w)
    hist = torch.zeros(b * c, 256, dtype=torch.long, device=x.device).scatter_add_(
        1, v, torch.ones_like(v)
    )
    last = 255 - (hist > 0).flip(1).long().argmax(1, keepdim=True)
    step = (h * w - hist.gather(1, last)) // 255
    below = hist.cumsum(1) - hist
    lut = ((step // 2 + below) // step.clamp_min(1)).clamp_(0, 255)
    ident = torch.arange(256, device=x.device).expand_as(lut)
    lut = torch.where(step > 0, lut, ident)
    return lut.gather(1, v).view(b, c, h, w).to(x.dtype)


def _invert(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return 255.0 - x


def _posterize(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    shift = (8 - a.clamp(0, 8)).view(-1, 1, 1, 1)
    q = torch.pow(2.0, shift)
    return torch.div(x, q, rounding_mode="floor") * q


def _solarize(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return torch.where(x < a.view(-1, 1, 1, 1), x, 255.0 - x)


def _solarize_add(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return torch.where(x < 128, (x + a.view(-1, 1, 1, 1)).clamp_(0, 255), x)


def _color(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return _blend(_gray(x).expand_as(x), x, a)


def _contrast(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    mean = _gray(x).mean((1, 2, 3), keepdim=True).round_()
    return _blend(mean.expand_as(x), x, a)


def _brightness(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return _blend(torch.zeros_like(x), x, a)


def _sharpness(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Blend with PIL's SMOOTH filter (3x3, centre 5, others 1, / 13); the border keeps the
    original pixels, as the reference code does."""
    k = torch.ones(3, 1, 3, 3, dtype=x.dtype, device=x.device)
    k[:, :, 1, 1] = 5.0
    smooth = x.clone()
    smooth[:, :, 1:-1, 1:-1] = F.conv2d(x, k / 13.0, groups=3).round_()
    return _blend(smooth, x, a)


_COLOR_OPS = {
    "AutoContrast": _autocontrast, "Equalize": _equalize, "Invert": _invert,
    "Posterize": _posterize, "Solarize": _solarize, "SolarizeAdd": _solarize_add,
    "Color": _color, "Contrast": _contrast, "Brightness": _brightness, "Sharpness": _sharpness,
}  # fmt: skip


def _affine(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour warp with fill 128: output pixel centre p (pixel units, origin at the
    top-left corner) reads the input at m @ [p, 1], as PIL's Image.transform(AFFINE)."""
    b, _, h, w = x.shape
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=x.dtype, device=x.device) + 0.5,
        torch.arange(w, dtype=x.dtype, device=x.device) + 0.5,
        indexing="ij",
    )
    p = torch.stack([xs, ys, torch.ones_like(xs)], -1).view(1, h * w, 3)
    q = p @ m.transpose(1, 2)  # (B, H*W, 2) input points
    grid = torch.stack([q[..., 0] * (2.0 / w) - 1, q[..., 1] * (2.0 / h) - 1], -1)
    out = F.grid_sample(x - FILL, grid.view(b, h, w, 2), mode="nearest", align_corners=False)
    return out + FILL  # outside the image: 0 + 128


def _geometric_matrices(op: torch.Tensor, arg: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Per-image 2x3 output->input matrices for Rotate/Shear/Translate (arg already signed)."""
    n = len(op)
    m = torch.zeros(n, 2, 3, dtype=arg.dtype, device=arg.device)
    m[:, 0, 0] = m[:, 1, 1] = 1.0
    rot = op == GEOMETRIC.index("Rotate")
    t = -arg * (math.pi / 180.0)  # PIL: positive angles turn counter-clockwise
    cx, cy = w / 2.0, h / 2.0
    cos, sin = torch.cos(t), torch.sin(t)
    r = torch.stack(
        [
            torch.stack([cos, sin, cx - cos * cx - sin * cy], -1),
            torch.stack([-sin, cos, cy + sin * cx - cos * cy], -1),
        ],
        1,
    )
    m = torch.where(rot.view(-1, 1, 1), r, m)
    sx, sy = op == GEOMETRIC.index("ShearX"), op == GEOMETRIC.index("ShearY")
    tx, ty = op == GEOMETRIC.index("TranslateX"), op == GEOMETRIC.index("TranslateY")
    m[:, 0, 1] = torch.where(sx, arg, m[:, 0, 1])
    m[:, 1, 0] = torch.where(sy, arg, m[:, 1, 0])
    m[:, 0, 2] = torch.where(tx, arg, m[:, 0, 2])
    m[:, 1, 2] = torch.where(ty, arg, m[:, 1, 2])
    return m


def _cutout(x: torch.Tensor, pad: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Grey square [cy - pad, cy + pad) x [cx - pad, cx + pad) at a uniform centre, per image."""
    b, _, h, w = x.shape
    cy = torch.randint(0, h, (b,), generator=g).to(x.device)
    cx = torch.randint(0, w, (b,), generator=g).to(x.device)
    pad = pad.to(x.device)
    rows = torch.arange(h, device=x.device).view(1, h)
    cols = torch.arange(w, device=x.device).view(1, w)
    in_r = (rows >= (cy - pad).view(-1, 1)) & (rows < (cy + pad).view(-1, 1))
    in_c = (cols >= (cx - pad).view(-1, 1)) & (cols < (cx + pad).view(-1, 1))
    mask = (in_r.view(b, 1, h, 1) & in_c.view(b, 1, 1, w)) & (pad > 0).view(b, 1, 1, 1)
    return x.masked_fill(mask, FILL)


def op_args(m: float, h: int, w: int) -> dict[str, float]:
    """Each op's argument at magnitude M (reference `level_to_arg`, level = M / 10, unclipped)."""
    level = m / 10.0
    return {
        "Rotate": level * 30.0, "ShearX": level * 0.3, "ShearY": level * 0.3,
        "TranslateX": level * w / 8.0, "TranslateY": level * h / 8.0,
        "Posterize": float(int(level * 4)), "Solarize": float(int(level * 256)),
        "SolarizeAdd": float(int(level * 110)), "Color": level * 1.8 + 0.1,
        "Contrast": level * 1.8 + 0.1, "Brightness": level * 1.8 + 0.1,
        "Sharpness": level * 1.8 + 0.1, "Cutout": float(int(level * min(h, w) / 8.0)),
    }  # fmt: skip


def randaugment_ops(x: torch.Tensor, n: int, m: float, g: torch.Generator) -> torch.Tensor:
    """N layers of the reference RandAugment on a float batch; one op per image per layer."""
    b, _, h, w = x.shape
    args = op_args(m, h, w)
    geo_of_op = torch.full((len(OPS),), -1, dtype=torch.long)  # op index -> GEOMETRIC index
    geo_of_op[[OPS.index(k) for k in GEOMETRIC]] = torch.arange(len(GEOMETRIC))
    geo_arg = torch.tensor([args[k] for k in GEOMETRIC])
    for _ in range(n):
        op = torch.randint(0, len(OPS), (b,), generator=g)
        sign = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0)
        gop = geo_of_op[op]
        sel = (gop >= 0).nonzero().squeeze(1)
        if len(sel):
            mats = _geometric_matrices(gop[sel], geo_arg[gop[sel]] * sign[sel], h, w)
            sel_d = sel.to(x.device)
            x[sel_d] = _affine(x[sel_d], mats.to(x.device, x.dtype))
        for name, fn in _COLOR_OPS.items():
            sel = (op == OPS.index(name)).nonzero().squeeze(1)
            if len(sel):
                a = torch.full((len(sel),), args.get(name, 0.0), dtype=x.dtype, device=x.device)
                sel_d = sel.to(x.device)
                x[sel_d] = fn(x[sel_d], a)
        sel = (op == OPS.index("Cutout")).nonzero().squeeze(1)
        if len(sel):
            sel_d = sel.to(x.device)
            x[sel_d] = _cutout(x[sel_d], torch.full((len(sel),), int(args["Cutout"])), g)
    return x


class BatchAugment:
    """The train view's noise on a uint8 batch (B, 3, H, W) -> uint8 batch of the same shape.

    pad_crop: reflect-pad size/8 random crop (small images; large ones were random-resized-
    cropped per image already); hflip: random horizontal flip; ra: RandAugment 'rand-mM-nN' or
    None; extra_cutout: the reference's extra Cutout (side size/2) for small images.
    """

    def __init__(self, pad_crop: bool, hflip: bool, ra: str | None, extra_cutout: bool):
        self.pad_crop, self.hflip, self.extra_cutout = pad_crop, hflip, extra_cutout
        self.ra = parse_randaugment(ra) if ra else None

    def __call__(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        b, _, h, w = x.shape
        if b == 0:
            return x
        x = x.float()
        dev = x.device
        if self.pad_crop:
            p = max(1, h // 8)
            xp = F.pad(x, (p, p, p, p), mode="reflect")
            wp = w + 2 * p
            oy = torch.randint(0, 2 * p + 1, (b, 1, 1), generator=g).to(dev)
            ox = torch.randint(0, 2 * p + 1, (b, 1, 1), generator=g).to(dev)
            r = torch.arange(h, device=dev).view(1, h, 1)
            c = torch.arange(w, device=dev).view(1, 1, w)
            flat = ((oy + r) * wp + ox + c).view(b, 1, h * w).expand(b, 3, h * w)
            x = xp.view(b, 3, -1).gather(2, flat).view(b, 3, h, w)
        if self.hflip:
            flip = (torch.rand(b, generator=g) < 0.5).to(dev).view(b, 1, 1, 1)
            x = torch.where(flip, x.flip(3), x)
        if self.ra is not None:
            x = randaugment_ops(x.contiguous(), self.ra[0], self.ra[1], g)
        if self.extra_cutout:
            x = _cutout(x, torch.full((b,), min(h, w) // 4), g)
        return x.round_().clamp_(0, 255).to(torch.uint8)
