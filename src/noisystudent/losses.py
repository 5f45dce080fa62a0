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
