"""Seeds and per-item random numbers that are pure functions of their inputs, so a run repeats
exactly whatever the worker count, chunk size, shard layout or resume point.

Two 64-bit multiply-xorshift hashes live here, one per use: `mix` folds a few integers into one
seed (Python ints; the engine calls it per step and per image), `row_uniforms` turns a whole
tensor of row numbers into uniforms at once (the reference selection's Bernoulli draws). They
are kept as two because each fixes results already on disk: replacing either by the other
would change every trained model or every reference-mode selection.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def stage_seed(seed: int, tag: str, epoch: int) -> int:
    """The seed of one epoch of one training stage (tag, e.g. "iter1/train")."""
    return (
        seed * 1_000_003 + sum(ord(c) * 31**i for i, c in enumerate(tag)) + epoch * 7919
    ) % 2**31


M64 = 0xFFFF_FFFF_FFFF_FFFF


def mix(*xs: int) -> int:
    """A well-spread 63-bit seed from integers (splitmix64 steps); cheap enough per image."""
    h = 0x9E37_79B9_7F4A_7C15
    for x in xs:
        h = ((h ^ (x & M64)) * 0xBF58_476D_1CE4_E5B9) & M64
        h ^= h >> 31
        h = (h * 0x94D0_49BB_1331_11EB) & M64
        h ^= h >> 29
    return h >> 1


def seed_item(s: int) -> None:
    """Seed the generators augmentations draw from (Python random: timm RandAugment; torch CPU:
    torchvision crops and flips; numpy) for one image."""
    random.seed(s)
    np.random.seed(s & 0xFFFF_FFFF)
    torch.random.default_generator.manual_seed(s)


def _signed(x: int) -> int:
    x &= M64
    return x - (1 << 64) if x >= 1 << 63 else x


def row_uniforms(rows: torch.Tensor, seed: int) -> torch.Tensor:
    """A uniform [0, 1) number per row index, a pure function of (seed, row) (a splitmix64-style
    hash), so the Bernoulli draws do not depend on chunk size, shard layout or rank count."""
    x = rows.long() * _signed(0x9E3779B97F4A7C15) + _signed(seed * 0xD1B54A32D192ED03 + 1)
    x = (x ^ ((x >> 30) & ((1 << 34) - 1))) * _signed(0xBF58476D1CE4E5B9)
    x = (x ^ ((x >> 27) & ((1 << 37) - 1))) * _signed(0x94D049BB133111EB)
    x = x ^ ((x >> 31) & ((1 << 33) - 1))
    return ((x >> 11) & ((1 << 53) - 1)).double() / float(1 << 53)
