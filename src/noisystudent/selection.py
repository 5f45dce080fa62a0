"""Selecting pseudo-labeled images: confidence filtering and class balancing (paper sec. 3).

Pure functions: tensors in, tensors out. `conf`: (N,) max probability per image, `pred`: (N,)
predicted class. Results are row indices into the pseudo-label store; a duplicated image appears
more than once.
"""

from __future__ import annotations

import torch


def filter_by_confidence(conf: torch.Tensor, threshold: float) -> torch.Tensor:
    """Indices of images with conf >= threshold (paper: 0.3 drops mostly out-of-domain images)."""
    return torch.nonzero(conf >= threshold).flatten()


def class_counts(pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.bincount(pred, minlength=num_classes)


def balance_classes(
    pred: torch.Tensor,
    conf: torch.Tensor,
    idx: torch.Tensor,
    num_classes: int,
    per_class: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Make every class hold K images among the rows `idx` (paper sec. 3, "data balancing").

    Classes with more than K keep their K most confident images; classes with fewer are filled
    by duplicating: every image `K // n` times, plus `K % n` distinct images drawn at random
    (seeded by `generator`). A class with no image stays empty. K defaults to the mean
    per-class count of `idx` (rounded, at least 1).
    Returns row indices, sorted by class then descending confidence.
    """
    idx = idx.long()
    if per_class is None:
        per_class = max(1, round(len(idx) / num_classes))
    out = []
    for c in range(num_classes):
        rows = idx[pred[idx] == c]
        n = len(rows)
        if n == 0:
            continue
        rows = rows[torch.argsort(conf[rows], descending=True, stable=True)]
        if n >= per_class:
            out.append(rows[:per_class])
            continue
        reps, extra = divmod(per_class, n)
        pick = torch.randperm(n, generator=generator)[:extra]
        out.append(torch.cat([rows.repeat(reps), rows[torch.sort(pick).values]]))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def select_pseudo_labels(
    conf: torch.Tensor,
    pred: torch.Tensor,
    num_classes: int,
    threshold: float,
    balance: bool,
    per_class: int | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Filter by confidence, then (optionally) balance. Deterministic for a given seed."""
    idx = filter_by_confidence(conf, threshold)
    if not balance:
        return idx
    g = torch.Generator().manual_seed(seed)
    return balance_classes(pred, conf, idx, num_classes, per_class, g)
