"""RandAugment semantics: the reference code's (every op applied, unclipped magnitude, Cutout)
built on timm's ops, and timm's own for the same string."""

import random

import numpy as np
from PIL import Image

from noisystudent.augment import FILL, Cutout, randaugment, train_transform


def test_reference_semantics_apply_every_op_unclipped_with_cutout():
    t = randaugment("rand-m27-n2", 32, reference=True)
    ops = t.ops
    assert t.num_layers == 2
    timm_ops = ops[:-1]
    assert all(op.prob == 1.0 for op in timm_ops)  # no per-op probability
    assert all(
        op.magnitude == 27 and op.magnitude_max == 30 for op in timm_ops
    )  # not clipped at 10
    assert isinstance(ops[-1], Cutout) and ops[-1].magnitude == 27
    names = {op.name for op in timm_ops}
    assert {"Rotate", "ShearX", "TranslateXRel", "Solarize", "Posterize", "Equalize"} <= names or {
        "Rotate",
        "ShearX",
        "TranslateX",
        "Solarize",
        "Posterize",
        "Equalize",
    } <= names


def test_timm_semantics_keep_timm_defaults():
    t = randaugment("rand-m9-n2", 32, reference=False)
    assert all(op.prob == 0.5 for op in t.ops)  # timm: each op with probability 0.5
    assert all(
        op.magnitude_max is None for op in t.ops
    )  # timm: clipped at its level denominator 10
    assert not any(isinstance(op, Cutout) for op in t.ops)


def test_cutout_fills_a_grey_square():
    random.seed(0)
    img = Image.fromarray(np.zeros((32, 32, 3), np.uint8))
    out = np.asarray(Cutout(pad=8)(img))
    grey = (out == FILL[0]).all(-1)
    assert 0 < grey.sum() <= 16 * 16
    rows, cols = np.nonzero(grey)
    assert rows.max() - rows.min() < 16 and cols.max() - cols.min() < 16
    mag = Cutout(magnitude=10, pad_const=4)(img)  # M/10 x size/8 at 32 px: pad 4, an 8x8 square
    assert (np.asarray(mag) == FILL[0]).all(-1).sum() <= 64


def test_small_images_get_the_extra_cutout_and_stay_uint8():
    random.seed(1)
    t = train_transform(32, small=True, hflip=True, ra="rand-m9-n2", reference=True)
    assert any(isinstance(op, Cutout) and op.pad == 8 for op in t.transforms)
    x = t(Image.fromarray(np.full((32, 32, 3), 7, np.uint8)))
    assert x.dtype.is_floating_point is False and tuple(x.shape) == (3, 32, 32)
    plain = train_transform(32, small=True, hflip=True, ra="rand-m9-n2", reference=False)
    assert not any(isinstance(op, Cutout) for op in plain.transforms)
