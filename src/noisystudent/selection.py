"""Selecting pseudo-labeled images: confidence filtering and class balancing (paper sec. 3).

Pure functions: tensors in, tensors out. `conf`: (N,) max probability per image, `pred`: (N,)
predicted class. Results are row indices into the pseudo-label store; a duplicated image appears
more than once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch

from .seeds import row_uniforms


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


# --------------------------------------------------------------------------------------------
# The reference code's selection (filter_unlabel.py), which scales: one histogram pass over
# the store, then one selection pass, memory bounded by the number of classes x 101 bins.
N_BINS = 101  # thresholds 0.00, 0.01, ..., 1.00


def confidence_bins(conf: torch.Tensor) -> torch.Tensor:
    """Bin b = floor(100 * conf) in 0..100; "conf >= b/100" is "bin >= b" (used by both passes)."""
    return (conf.float() * 100).floor().clamp_(0, N_BINS - 1).long()


def confidence_histogram(conf: torch.Tensor, pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, 101) counts of images per (predicted class, confidence bin). Sum over chunks of a
    store to get the histogram of the whole store."""
    flat = pred.long() * N_BINS + confidence_bins(conf)
    return torch.bincount(flat, minlength=num_classes * N_BINS).view(num_classes, N_BINS)


def class_thresholds(
    hist: torch.Tensor, per_class: int, min_threshold: float = 0.3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class c: the highest threshold bin t_c >= min_threshold at which the class still has
    >= K images; a class that never reaches K gets min_threshold. Returns (t_c bins (C,),
    n_c(t_c) = images of class c at or above t_c (C,))."""
    above = hist.flip(1).cumsum(1).flip(1)  # above[c, b] = #images of class c with bin >= b
    b_min = int(round(min_threshold * 100))
    ok = above >= per_class
    ok[:, :b_min] = False
    bins = torch.arange(N_BINS).expand_as(ok)
    t = torch.where(ok, bins, torch.full_like(bins, -1)).max(1).values
    t = torch.where(t < 0, torch.full_like(t, b_min), t)
    return t, above.gather(1, t[:, None]).squeeze(1)


def copy_counts(
    conf: torch.Tensor,
    pred: torch.Tensor,
    thresholds: torch.Tensor,
    n_at_threshold: torch.Tensor,
    per_class: int,
    upsample: bool = True,
    use_all: bool = False,
    min_threshold: float = 0.3,
    max_prob: float = 1.0,
    seed: int = 0,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Copies of each image (N,) in the reference algorithm: an image of class c with
    t_c <= conf <= max_prob gets K / n_c(t_c) copies, the integer part plus one more with
    probability equal to the fraction (drawn by `row_uniforms(rows, seed)`; rows default to
    0..N-1). `upsample=False` caps the count at 1; `use_all` keeps every image above
    min_threshold exactly once."""
    b = confidence_bins(conf)
    pred = pred.long()
    if use_all:
        return ((b >= round(min_threshold * 100)) & (conf <= max_prob)).long()
    keep = (b >= thresholds[pred]) & (conf <= max_prob)
    ratio = per_class / n_at_threshold[pred].clamp_min(1).double()
    if not upsample:
        ratio = ratio.clamp(max=1.0)
    whole = ratio.floor()
    u = row_uniforms(torch.arange(len(conf)) if rows is None else rows, seed)
    return torch.where(keep, whole + (u < ratio - whole).double(), torch.zeros_like(whole)).long()


Chunks = Callable[[], Iterable[tuple[int, torch.Tensor, torch.Tensor]]]


def reference_select_stream(
    chunks: Chunks,
    num_classes: int,
    per_class: int | None = None,
    min_threshold: float = 0.3,
    upsample: bool = True,
    use_all: bool = False,
    seed: int = 0,
) -> Iterator[torch.Tensor]:
    """The reference selection over a store of any size: `chunks()` yields (first row, conf,
    pred) and is called twice (a histogram pass, then a selection pass). Yields the selected
    row indices chunk by chunk (each repeated by its copy count). Memory: C x 101 counters plus
    one chunk. K defaults to the mean per-class count above min_threshold."""
    hist = torch.zeros(num_classes, N_BINS, dtype=torch.long)
    for _, conf, pred in chunks():
        hist += confidence_histogram(conf, pred, num_classes)
    if per_class is None:
        kept = int(hist[:, round(min_threshold * 100) :].sum())
        per_class = max(1, round(kept / num_classes))
    t, n = class_thresholds(hist, per_class, min_threshold)
    for start, conf, pred in chunks():
        rows = torch.arange(start, start + len(conf))
        c = copy_counts(
            conf, pred, t, n, per_class, upsample, use_all, min_threshold, seed=seed, rows=rows
        )
        yield torch.repeat_interleave(rows, c)


def reference_select(
    conf: torch.Tensor,
    pred: torch.Tensor,
    num_classes: int,
    per_class: int | None = None,
    min_threshold: float = 0.3,
    upsample: bool = True,
    use_all: bool = False,
    seed: int = 0,
) -> torch.Tensor:
    """The reference selection on tensors in memory (one chunk of the streaming version)."""
    out = list(
        reference_select_stream(
            lambda: [(0, conf, pred)],
            num_classes,
            per_class,
            min_threshold,
            upsample,
            use_all,
            seed,
        )
    )
    return torch.cat(out)
