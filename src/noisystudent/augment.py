"""Views of images: the clean eval view (teacher, evaluation) and the noised train view
(crop/flip, plus RandAugment for the student). Datasets yield uint8 (3, H, W) tensors; the
model normalises (see models.Classifier), so collation moves 4x fewer bytes than float.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image
from timm.data.auto_augment import rand_augment_transform
from torch.utils.data import Dataset
from torchvision import transforms as T

from .data import ImageSet, resize_center

FILL = (128, 128, 128)  # reference code fills with 128


class Cutout:
    """Fill a square of side 2 * pad (clipped at the borders) at a random centre with grey, as
    the reference code's `cutout`. As a RandAugment op, pad = M / 10 * pad_const."""

    def __init__(self, pad: float | None = None, magnitude: float = 10.0, pad_const: float = 0.0):
        self.pad, self.magnitude, self.pad_const = pad, magnitude, pad_const

    def __call__(self, img: Image.Image) -> Image.Image:
        pad = self.pad if self.pad is not None else self.magnitude / 10.0 * self.pad_const
        pad = int(round(pad))
        if pad <= 0:
            return img
        w, h = img.size
        cx, cy = random.randrange(w), random.randrange(h)
        img = img.copy()
        img.paste(FILL, (max(0, cx - pad), max(0, cy - pad), min(w, cx + pad), min(h, cy + pad)))
        return img


def randaugment(spec: str, size: int, reference: bool = True):
    """RandAugment from a timm config string such as 'rand-m9-n2' (N ops, magnitude M).

    reference=True gives the reference code's semantics on top of timm's ops: every sampled op
    is applied (timm's `p1.0`; timm's default applies each with probability 0.5), the magnitude
    is not clipped at 10 (`mmax30`: M = 27 is 2.7x the nominal maximum), Cutout is one of the
    ops (pad M/10 x size/8) and translations are M/10 x size/8 pixels (the reference's 32-px
    setting, scaled). reference=False is timm's behaviour for the same string. Fill grey (128).
    """
    if not reference:
        return rand_augment_transform(spec, {"translate_pct": 0.45, "img_mean": FILL})
    t = rand_augment_transform(
        spec + "-mmax30-p1.0", {"translate_const": max(1, size // 8), "img_mean": FILL}
    )
    m = t.ops[0].magnitude if t.ops else 10.0
    t.ops.append(Cutout(magnitude=m, pad_const=size / 8))
    return t


def train_transform(size: int, small: bool, hflip: bool, ra: str | None, reference: bool = True):
    """Small (cached) images: reflect-pad random crop; large: RandomResizedCrop. Then flip and
    RandAugment (PIL); with reference semantics small images also get the reference code's extra
    Cutout (pad size/4, i.e. a 16x16 square at 32 px). Output uint8 (3, size, size)."""
    ops: list = []
    if small:
        ops.append(T.RandomCrop(size, padding=max(1, size // 8), padding_mode="reflect"))
    else:
        ops.append(T.RandomResizedCrop(size, interpolation=T.InterpolationMode.BICUBIC))
    if hflip:
        ops.append(T.RandomHorizontalFlip())
    if ra:
        ops.append(randaugment(ra, size, reference))
        if reference and small:
            ops.append(Cutout(pad=size / 4))
    ops.append(T.PILToTensor())
    return T.Compose(ops)


class ViewDataset(Dataset):
    """images[i] -> (uint8 (3, H, W), i). `transform=None` gives the clean eval view."""

    def __init__(self, images: ImageSet, size: int, transform=None):
        self.images, self.size, self.transform = images, size, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        s = self.images
        if self.transform is None and s.array is not None and s.array.shape[1] == self.size:
            return torch.from_numpy(np.ascontiguousarray(s.array[i].transpose(2, 0, 1))), i
        img = s.image(i)
        if s.array is None and self.transform is None:
            img = resize_center(img, self.size)
        elif s.array is None:
            img = img  # RandomResizedCrop handles the resolution
        elif img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), Image.BILINEAR)
        if self.transform is None:
            return T.functional.pil_to_tensor(img), i
        return self.transform(img), i
