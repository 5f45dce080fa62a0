"""Pseudo-label targets and losses (paper sec. 2: soft or hard pseudo labels)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_labels(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """softmax(logits / T). logits: (N, C) -> (N, C) probabilities."""
    return F.softmax(logits.float() / temperature, dim=-1)


def hard_labels(probs: torch.Tensor) -> torch.Tensor:
    """One-hot argmax. probs: (N, C) -> (N, C)."""
    return F.one_hot(probs.argmax(-1), probs.shape[-1]).to(probs.dtype)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum_c t_c log softmax(logits)_c. logits, targets: (N, C).
    With one-hot targets this equals F.cross_entropy with class indices."""
    return -(targets * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()


def retemper(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Stored probabilities p = softmax(z / T0) re-tempered to softmax(z / (T0 * T)):
    p^(1/T), renormalised. probs: (N, C). T < 1 sharpens, T > 1 flattens."""
    if temperature == 1.0:
        return probs
    p = probs.clamp_min(0).pow(1.0 / temperature)
    return p / p.sum(-1, keepdim=True).clamp_min(1e-12)


def smooth(one_hot: torch.Tensor, eps: float) -> torch.Tensor:
    """Label smoothing: (1 - eps) * one_hot + eps / C."""
    return one_hot * (1.0 - eps) + eps / one_hot.shape[-1]


def pseudo_targets(
    probs: torch.Tensor, mode: str, temperature: float = 1.0, label_smoothing: float = 0.1
) -> torch.Tensor:
    """Training targets from stored teacher probabilities (N, C): soft (re-tempered) or hard
    (one-hot argmax, smoothed as the reference code does)."""
    if mode == "hard":
        return smooth(hard_labels(probs), label_smoothing)
    return retemper(probs, temperature)
