"""The train views: timm's per-image RandAugment for `randaugment_semantics=timm`, and the
batched reference view's split into a per-image crop and the batch noise."""

import numpy as np
import torch
from PIL import Image

from noisystudent.augment import batch_train_view, train_transform
from noisystudent.batchaug import BatchAugment


def test_timm_semantics_keep_timm_defaults():
    t = train_transform(32, small=True, hflip=True, ra="rand-m9-n2")
    ra = t.transforms[2]
    assert all(op.prob == 0.5 for op in ra.ops)  # timm: each op with probability 0.5
    assert all(op.magnitude_max is None for op in ra.ops)  # clipped at its level 10
    x = t(Image.fromarray(np.full((32, 32, 3), 7, np.uint8)))
    assert x.dtype == torch.uint8 and tuple(x.shape) == (3, 32, 32)


def test_reference_view_small_images_are_all_batch_ops():
    per_image, aug = batch_train_view(32, small=True, hflip=True, ra="rand-m9-n2")
    assert per_image is None  # the cached uint8 array is read as is
    assert isinstance(aug, BatchAugment) and aug.pad_crop and aug.extra_cutout
    assert aug.ra == (2, 9.0)


def test_reference_view_large_images_crop_per_image_then_batch_noise():
    per_image, aug = batch_train_view(96, small=False, hflip=True, ra="rand-m9-n2")
    x = per_image(Image.fromarray(np.zeros((200, 150, 3), np.uint8)))
    assert x.dtype == torch.uint8 and tuple(x.shape) == (3, 96, 96)
    assert not aug.pad_crop and not aug.extra_cutout  # the reference's extras are for 32 px
    out = aug(torch.stack([x, x]), torch.Generator().manual_seed(0))
    assert out.dtype == torch.uint8 and tuple(out.shape) == (2, 3, 96, 96)
