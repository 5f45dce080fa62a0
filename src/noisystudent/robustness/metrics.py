"""Robustness metrics as small pure functions (docs/robustness.md sec. 1.5, 1.7, 3.3, 4).

Corruption errors are percentages keyed `errors[corruption][severity]` with severities
"1".."5" (JSON keys). Reference-normalised scores are x100 (the reference model scores 100).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from ..errors import UserError
from .corruptions import BENCHMARK

SEVERITIES = ("1", "2", "3", "4", "5")
Errors = Mapping[str, Mapping[str, float]]


# ---------------------------------------------------------------------------------------------
# corruptions
def unnormalized_ce(errors: Errors, names=BENCHMARK) -> float:
    """Mean error over the 15 benchmark corruptions x 5 severities (Hendrycks' "mCE
    unnormalized"; = 100 - mean corrupted accuracy)."""
    return float(np.mean([errors[c][s] for c in names for s in SEVERITIES]))


def corruption_errors(errors: Errors, ref: Errors, names=BENCHMARK) -> dict[str, float]:
    """CE_c = 100 * sum_s E_{s,c} / sum_s E^ref_{s,c} per corruption."""
    out = {}
    for c in names:
        den = sum(ref[c][s] for s in SEVERITIES)
        if den <= 0:
            raise UserError(
                f"reference error on '{c}' sums to {den}; cannot normalise mCE by a reference "
                "that makes no mistakes (use another reference or a larger subset)"
            )
        out[c] = 100.0 * sum(errors[c][s] for s in SEVERITIES) / den
    return out


def mce(errors: Errors, ref: Errors, names=BENCHMARK) -> float:
    """Mean Corruption Error: the mean of CE_c over the 15 benchmark corruptions (x100)."""
    return float(np.mean(list(corruption_errors(errors, ref, names).values())))


def relative_mce(
    errors: Errors, clean_err: float, ref: Errors, ref_clean_err: float, names=BENCHMARK
) -> float:
    """Relative mCE: mean_c sum_s (E_{s,c} - E_clean) / sum_s (E^ref_{s,c} - E^ref_clean), x100."""
    vals = []
    for c in names:
        den = sum(ref[c][s] - ref_clean_err for s in SEVERITIES)
        if den == 0:
            raise UserError(
                f"reference's corrupted error on '{c}' equals its clean error; relative mCE "
                "is undefined"
            )
        vals.append(100.0 * sum(errors[c][s] - clean_err for s in SEVERITIES) / den)
    return float(np.mean(vals))


def alexnet_mce(errors: Errors) -> float:
    """mCE against the built-in AlexNet ImageNet-C errors. Only meaningful on genuine
    ImageNet-C data; CE_c = 100 * mean_s(E) / ALEXNET_ERR[c] (AugMix's form)."""
    from .corruptions import ALEXNET_ERR

    return float(
        np.mean(
            [
                np.mean([errors[c][s] for s in SEVERITIES]) / (100.0 * ALEXNET_ERR[c]) * 100.0
                for c in BENCHMARK
            ]
        )
    )


# ---------------------------------------------------------------------------------------------
# perturbations
def flip_probability(preds: np.ndarray, noise: bool, difficulty: int = 1) -> float:
    """FP over sequences. preds: (m, n) top-1 class per frame.

    noise: every frame j >= 1 is compared with the clean frame 0. Temporal: frames `difficulty`
    apart are compared along each chain o, o + d, o + 2d, ... (reference test.py). The mean is
    taken per sequence and then over sequences (identical for equal lengths)."""
    preds = np.asarray(preds)
    if preds.ndim != 2 or preds.shape[1] < 2:
        raise UserError(
            f"flip probability needs (sequences, frames >= 2) predictions, got {preds.shape}"
        )
    if noise:
        return float((preds[:, 1:] != preds[:, :1]).mean())
    flips = []
    for o in range(difficulty):
        chain = preds[:, o::difficulty]
        if chain.shape[1] >= 2:
            flips.append(chain[:, 1:] != chain[:, :-1])
    return float(np.concatenate(flips, axis=1).mean())


def top5_distance_closed(sigma: np.ndarray) -> np.ndarray:
    """d = sum_{i=1..5} |min(sigma(i) - 1, 5) - (i - 1)|. sigma: (..., >=5) 1-based ranks in x'
    of the classes ranked 1..5 in x."""
    s = np.asarray(sigma)[..., :5]
    i = np.arange(5)
    return np.abs(np.minimum(s - 1, 5) - i).sum(-1)


def top5_distance_sum(sigma: np.ndarray) -> int:
    """The definition's double sum (slow; for tests): sum over i of the j in
    (min(i, sigma(i)), max(i, sigma(i))] with 1 <= j - 1 <= 5."""
    d = 0
    for i in range(1, 6):
        lo, hi = sorted((i, int(sigma[i - 1])))
        d += sum(1 for j in range(lo + 1, hi + 1) if 1 <= j - 1 <= 5)
    return d


def rank_sigma(scores_a: torch.Tensor, scores_b: torch.Tensor, k: int = 5) -> torch.Tensor:
    """sigma(i) for i = 1..k: the 1-based rank under scores_b of the class ranked i under scores_a.
    scores: (N, C) -> (N, k)."""
    top_a = scores_a.topk(k, 1).indices  # (N, k)
    rank_b = scores_b.argsort(1, descending=True).argsort(1) + 1  # (N, C) 1-based ranks
    return rank_b.gather(1, top_a)


def top5_distance(logits: torch.Tensor, noise: bool, difficulty: int = 1) -> float:
    """Mean top-5 distance over the same frame pairs as the flip probability.
    logits: (m, n, C). Needs C >= 5 (the caller skips it otherwise)."""
    m, n, c = logits.shape
    pairs = (
        [(0, j) for j in range(1, n)]
        if noise
        else [(j - difficulty, j) for j in range(difficulty, n)]
    )
    a = torch.stack([logits[:, i] for i, _ in pairs], 1).reshape(-1, c)
    b = torch.stack([logits[:, j] for _, j in pairs], 1).reshape(-1, c)
    return float(top5_distance_closed(rank_sigma(a, b).numpy()).mean())


def flip_rates(fp: Mapping[str, float], ref_fp: Mapping[str, float]) -> dict[str, float]:
    """FR_p = 100 * FP_p / FP^ref_p."""
    out = {}
    for p, v in fp.items():
        den = ref_fp[p]
        if den <= 0:
            raise UserError(
                f"reference flip probability on '{p}' is 0; mFR against it is undefined "
                "(use another reference or a larger subset)"
            )
        out[p] = 100.0 * v / den
    return out


def mfr(fp: Mapping[str, float], ref_fp: Mapping[str, float]) -> float:
    return float(np.mean(list(flip_rates(fp, ref_fp).values())))


# ---------------------------------------------------------------------------------------------
# filtered-hard accuracy and calibration
def filtered_hard_mask(ref_pred: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """ImageNet-A analogue: the test images the reference model R gets wrong."""
    return np.asarray(ref_pred) != np.asarray(labels)


def filtered_hard_accuracy(
    pred: np.ndarray, labels: np.ndarray, ref_pred: np.ndarray
) -> tuple[float | None, int]:
    """(accuracy in % on A = {R(x) != y}, |A|); accuracy None when A is empty."""
    mask = filtered_hard_mask(ref_pred, labels)
    n = int(mask.sum())
    if n == 0:
        return None, 0
    return 100.0 * float((np.asarray(pred)[mask] == np.asarray(labels)[mask]).mean()), n


def restrict_logits(logits: torch.Tensor, classes: list[int]) -> torch.Tensor:
    """Keep only the listed classes' logits (others -inf), as ImageNet-A's 200-class mask."""
    out = torch.full_like(logits, float("-inf"))
    idx = torch.as_tensor(classes, dtype=torch.long)
    out[:, idx] = logits[:, idx]
    return out


def calibration_errors(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> dict:
    """Expected (ECE) and RMS calibration error in %, equal-width confidence bins.
    probs: (N, C) softmax; labels: (N,)."""
    conf, pred = probs.max(1)
    correct = (pred == labels).double()
    conf = conf.double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    ece = rms = 0.0
    n = max(1, len(labels))
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        m = (conf > lo) & (conf <= hi) if lo > 0 else (conf >= lo) & (conf <= hi)
        k = int(m.sum())
        if k:
            gap = float(correct[m].mean() - conf[m].mean())
            ece += k / n * abs(gap)
            rms += k / n * gap * gap
    return {"ece": 100.0 * ece, "rms_calibration_error": 100.0 * rms**0.5}
