"""Views of images: the clean eval view (teacher, evaluation) and the noised train view
(crop/flip, plus RandAugment for the student). Datasets yield uint8 (3, H, W) tensors; the
model normalises (see models.Classifier), so collation moves 4x fewer bytes than float.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from timm.data.auto_augment import rand_augment_transform
from torch.utils.data import Dataset
from torchvision import transforms as T

from .data import ImageSet, resize_center

FILL = (128, 128, 128)  # reference code fills with 128


def randaugment(spec: str, size: int):
    """timm RandAugment from a config string such as 'rand-m9-n2' (N ops, magnitude M of 10).
    Translations are relative to the image size, fill grey as the reference code."""
    return rand_augment_transform(spec, {"translate_pct": 0.45, "img_mean": FILL})


def train_transform(size: int, small: bool, hflip: bool, ra: str | None):
    """Small (cached) images: reflect-pad-4 random crop; large: RandomResizedCrop.
    Then flip and RandAugment (PIL), output uint8 (3, size, size)."""
    ops: list = []
    if small:
        ops.append(T.RandomCrop(size, padding=max(1, size // 8), padding_mode="reflect"))
    else:
        ops.append(T.RandomResizedCrop(size, interpolation=T.InterpolationMode.BICUBIC))
    if hflip:
        ops.append(T.RandomHorizontalFlip())
    if ra:
        ops.append(randaugment(ra, size))
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
