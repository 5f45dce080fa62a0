"""Views of images: the clean eval view (teacher, evaluation) and the noised train view
(crop/flip, plus RandAugment for the student). Datasets yield uint8 (3, H, W) tensors; the
model normalises (see models.Classifier), so collation moves 4x fewer bytes than float.
With the default reference semantics the noise runs on whole batches (batchaug); with
`randaugment_semantics=timm` it is timm's per-image PIL RandAugment.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from timm.data.auto_augment import rand_augment_transform
from torch.utils.data import Dataset
from torchvision import transforms as T

from .batchaug import BatchAugment
from .data import ImageSet, resize_center

FILL = (128, 128, 128)  # reference code fills with 128


def train_transform(size: int, small: bool, hflip: bool, ra: str | None):
    """The per-image PIL train view with timm's RandAugment semantics
    (`randaugment_semantics=timm`): small (cached) images reflect-pad random crop, large ones
    RandomResizedCrop; then flip and timm's RandAugment. Output uint8 (3, size, size).
    The default reference semantics run on whole batches instead (batchaug.BatchAugment)."""
    pad_crop = T.RandomCrop(size, padding=max(1, size // 8), padding_mode="reflect")
    ops: list = [pad_crop if small else item_crop(size, small)]
    if hflip:
        ops.append(T.RandomHorizontalFlip())
    if ra:
        ops.append(rand_augment_transform(ra, {"translate_pct": 0.45, "img_mean": FILL}))
    ops.append(T.PILToTensor())
    return T.Compose(ops)


def item_crop(size: int, small: bool):
    """The per-image part of the batched train view: nothing for small (cached) images, whose
    crop runs on the batch; RandomResizedCrop for large ones (it needs the full-size image)."""
    if small:
        return None
    return T.RandomResizedCrop(size, interpolation=T.InterpolationMode.BICUBIC)


def batch_train_view(size: int, small: bool, hflip: bool, ra: str | None):
    """(per-image transform or None, BatchAugment) of the train view with the reference code's
    semantics; see batchaug."""
    crop = item_crop(size, small)
    per_image = None if crop is None else T.Compose([crop, T.PILToTensor()])
    return per_image, BatchAugment(pad_crop=small, hflip=hflip, ra=ra,
                                   extra_cutout=small and ra is not None)  # fmt: skip


class ViewDataset(Dataset):
    """images[i] -> (uint8 (3, H, W), i). `transform=None` gives the clean eval view."""

    def __init__(self, images: ImageSet, size: int, transform=None):
        self.images, self.size, self.transform = images, size, transform

    def __len__(self) -> int:
        return len(self.images)

    def raw_array(self) -> np.ndarray | None:
        """The decoded uint8 (N, size, size, 3) cache when this view is exactly its images
        (no transform, same size), so batches can be sliced from it; else None."""
        a = self.images.array
        if self.transform is None and a is not None and a.shape[1] == self.size == a.shape[2]:
            return a
        return None

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        s = self.images
        if self.raw_array() is not None:
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
