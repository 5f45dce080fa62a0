"""Batched RandAugment with the reference code's semantics: each op against PIL, the
magnitudes (unclipped), crop/flip/Cutout geometry, determinism per generator seed."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from noisystudent import batchaug as B
from noisystudent.errors import UserError


def _image(seed=0):
    """A smooth 32 px image (upsampled noise), as PIL and as a float (1, 3, 32, 32) batch."""
    small = (np.random.default_rng(seed).random((8, 8, 3)) * 200 + 20).astype(np.uint8)
    pil = Image.fromarray(small).resize((32, 32), Image.BILINEAR)
    return pil, torch.from_numpy(np.array(pil)).permute(2, 0, 1)[None].float()


def _as_tensor(pil):
    return torch.from_numpy(np.array(pil)).permute(2, 0, 1).float()


@pytest.mark.parametrize(
    "name,arg,ref",
    [
        ("Equalize", 0, ImageOps.equalize),
        ("AutoContrast", 0, ImageOps.autocontrast),
        ("Invert", 0, ImageOps.invert),
        ("Posterize", 3, lambda im: ImageOps.posterize(im, 3)),
        ("Solarize", 128, lambda im: ImageOps.solarize(im, 128)),
        ("Color", 1.72, lambda im: ImageEnhance.Color(im).enhance(1.72)),
        ("Contrast", 0.4, lambda im: ImageEnhance.Contrast(im).enhance(0.4)),
        ("Brightness", 1.5, lambda im: ImageEnhance.Brightness(im).enhance(1.5)),
    ],
)
def test_color_ops_match_pil(name, arg, ref):
    pil, x = _image()
    ours = B._COLOR_OPS[name](x, torch.tensor([float(arg)]))[0]
    assert (ours - _as_tensor(ref(pil))).abs().max() <= 1  # rounding only


def test_sharpness_matches_pil_inside_and_keeps_the_border():
    pil, x = _image(1)
    ours = B._sharpness(x, torch.tensor([1.8]))[0]
    ref = _as_tensor(ImageEnhance.Sharpness(pil).enhance(1.8))
    assert (ours[:, 1:-1, 1:-1] - ref[:, 1:-1, 1:-1]).abs().max() <= 1
    assert torch.equal(ours[:, 0], x[0, :, 0])  # reference: the border is the original


@pytest.mark.parametrize(
    "op,arg,data",
    [("ShearX", 0.27, (1, 0.27, 0, 0, 1, 0)), ("ShearY", -0.3, (1, 0, 0, -0.3, 1, 0)),
     ("TranslateX", 3.0, (1, 0, 3, 0, 1, 0)), ("TranslateY", -4.0, (1, 0, 0, 0, 1, -4))],
)  # fmt: skip
def test_shear_and_translate_match_pil_affine_with_grey_fill(op, arg, data):
    pil, x = _image(2)
    m = B._geometric_matrices(torch.tensor([B.GEOMETRIC.index(op)]), torch.tensor([arg]), 32, 32)
    ours = B._affine(x, m)[0]
    ref = pil.transform(pil.size, Image.AFFINE, data, fillcolor=(128, 128, 128))
    assert torch.equal(ours, _as_tensor(ref))
    assert (ours == 128).all(0).any()  # the uncovered part is grey


def test_rotate_turns_like_pil():
    pil, x = _image(3)
    m = B._geometric_matrices(torch.tensor([0]), torch.tensor([20.0]), 32, 32)
    diff = (B._affine(x, m)[0] - _as_tensor(pil.rotate(20, fillcolor=(128,) * 3))).abs()
    assert (diff > 1).float().mean() < 0.01  # nearest-neighbour ties at a few pixels


def test_spec_parsing_unclipped_and_errors():
    assert B.parse_randaugment("rand-m27-n3") == (3, 27.0)  # M = 27 kept, not clipped at 10
    with pytest.raises(UserError, match="mstd0.5.*randaugment_semantics=timm"):
        B.parse_randaugment("rand-m9-n2-mstd0.5")
    with pytest.raises(UserError, match="must look like"):
        B.parse_randaugment("augmix-m9")


def test_cutout_sizes():
    x = torch.zeros(64, 3, 32, 32)
    g = torch.Generator().manual_seed(0)
    out = B._cutout(x, torch.full((64,), 8), g)  # the extra Cutout at 32 px: pad size/4
    grey = (out == 128).all(1)
    assert grey.flatten(1).sum(1).max() == 16 * 16 and grey.flatten(1).sum(1).min() >= 8 * 8


def test_magnitude_is_not_clipped():
    a9, a27 = B.op_args(9, 32, 32), B.op_args(27, 32, 32)
    assert a9["Rotate"] == pytest.approx(27) and a27["Rotate"] == pytest.approx(81)
    assert a9["TranslateX"] == pytest.approx(3.6) and a27["TranslateX"] == pytest.approx(10.8)
    assert a9["Cutout"] == 3 and a27["Cutout"] == 10  # pad: squares of 6 and 20 px
    assert a9["Color"] == pytest.approx(1.72) and a27["Color"] == pytest.approx(4.96)
    assert a9["Solarize"] == 230 and a9["Posterize"] == 3


def test_every_sampled_op_is_applied():
    """p = 1.0: with one layer at M = 9, an image whose op changes any image still changes."""
    _, x = _image(4)
    batch = x.repeat(256, 1, 1, 1).to(torch.uint8)
    out = B.BatchAugment(False, False, "rand-m9-n1", False)(batch, torch.Generator().manual_seed(0))
    changed = (out != batch).flatten(1).any(1).float().mean()
    # only AutoContrast can leave this image as it is (the others always move some pixel)
    assert changed > 1 - 2 / 16


def test_crop_is_a_window_of_the_reflect_padded_image_and_flip_is_a_coin():
    x = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)
    out = B.BatchAugment(True, False, None, False)(x, torch.Generator().manual_seed(0))
    xp = torch.nn.functional.pad(x.float(), (4, 4, 4, 4), mode="reflect")
    for b in range(32):
        hits = [(dy, dx) for dy in range(9) for dx in range(9)
                if torch.equal(xp[b, :, dy:dy + 32, dx:dx + 32], out[b].float())]  # fmt: skip
        assert hits
    flipped = B.BatchAugment(False, True, None, False)(x, torch.Generator().manual_seed(0))
    n_flip = sum(torch.equal(flipped[b], x[b].flip(2)) for b in range(32))
    assert 8 <= n_flip <= 24


def test_same_seed_same_noise_and_uint8_out():
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    aug = B.BatchAugment(True, True, "rand-m9-n2", True)
    a = aug(x, torch.Generator().manual_seed(5))
    b = aug(x, torch.Generator().manual_seed(5))
    c = aug(x, torch.Generator().manual_seed(6))
    assert a.dtype == torch.uint8 and a.shape == x.shape
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert aug(x[:0], torch.Generator()).shape == (0, 3, 32, 32)
