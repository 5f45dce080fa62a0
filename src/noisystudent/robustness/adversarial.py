"""FGSM and PGD-L_inf in [0, 1] pixel space (docs/robustness.md sec. 5), written directly.

The model must normalise inside (`models.Classifier`), so eps is a pixel-space bound: eps_px/255.
Attacks run with the model in eval mode (BN running statistics, no dropout or stochastic depth),
restore its mode afterwards and accumulate no parameter gradients (`torch.autograd.grad` with
respect to the input only). The loss is summed cross-entropy: the sign of the gradient is the
same as for the mean, without underflow to 0 on large batches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..progress import bar as progress_bar


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for the duration, the original mode restored afterwards."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def input_grad_sign(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sign(grad_x CE(model(x), y)). x: (N, 3, H, W) in [0, 1]; parameters get no .grad."""
    x = x.detach().clone().requires_grad_(True)
    loss = F.cross_entropy(model(x).float(), y, reduction="sum")
    (g,) = torch.autograd.grad(loss, x)
    return g.sign()


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """x_adv = clip_[0,1](x + eps * sign(grad_x L)). eps in [0, 1] units (eps_px / 255)."""
    with eval_mode(model):
        return (x + eps * input_grad_sign(model, x, y)).clamp(0.0, 1.0).detach()


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int = 10,
    alpha: float | None = None,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Untargeted PGD-L_inf (Madry et al. 2018): optional uniform random start in the eps-ball,
    then `steps` signed steps of `alpha` (default eps / 4), each projected onto the eps-ball
    around x and onto [0, 1]."""
    alpha = eps / 4 if alpha is None else alpha
    with eval_mode(model):
        x = x.detach()
        lo, hi = x - eps, x + eps
        adv = x.clone()
        if random_start:
            noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            adv = (x + (2 * noise - 1) * eps).clamp(0.0, 1.0)
        for _ in range(steps):
            adv = adv + alpha * input_grad_sign(model, adv, y)
            adv = torch.min(torch.max(adv, lo), hi).clamp(0.0, 1.0).detach()
        return adv


@torch.no_grad()
def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    return int((model(x).argmax(1) == y).sum())


def adversarial_accuracy(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    fgsm_eps_px: list[float],
    pgd_eps_px: float | None,
    pgd_steps: int,
    batch_size: int,
    device: torch.device,
    seed: int = 0,
    use_predicted_labels: bool = False,
    progress: bool = False,
) -> dict:
    """Top-1 accuracy (%) under FGSM at each eps_px and PGD-`pgd_steps` at `pgd_eps_px`.

    images: uint8 (N, H, W, 3); labels: (N,). FGSM's direction does not depend on eps, so one
    gradient per batch serves every eps. `use_predicted_labels` attacks the model's own clean
    prediction (avoids label leaking, as Hendrycks' FGSM helper)."""
    model.to(device)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    hits = {e: 0 for e in fgsm_eps_px}
    pgd_hits, n = 0, len(labels)
    with eval_mode(model):
        bar = progress_bar(range(0, n, batch_size), "adversarial", None, progress)
        for s in bar:
            x = images[s : s + batch_size].to(device).permute(0, 3, 1, 2).float().div(255.0)
            y = labels[s : s + batch_size].to(device)
            if use_predicted_labels:
                with torch.no_grad():
                    y = model(x).argmax(1)
                y_true = labels[s : s + batch_size].to(device)
            else:
                y_true = y
            g = input_grad_sign(model, x, y)
            for e in fgsm_eps_px:
                hits[e] += _correct(model, (x + e / 255.0 * g).clamp(0.0, 1.0), y_true)
            if pgd_eps_px is not None:
                adv = pgd(model, x, y, pgd_eps_px / 255.0, pgd_steps, generator=gen)
                pgd_hits += _correct(model, adv, y_true)
    out = {"fgsm": {_key(e): 100.0 * hits[e] / max(1, n) for e in fgsm_eps_px}}
    if pgd_eps_px is not None:
        out[f"pgd{pgd_steps}_{_key(pgd_eps_px)}"] = 100.0 * pgd_hits / max(1, n)
    return out


def _key(e: float) -> str:
    return str(int(e)) if float(e).is_integer() else str(e)
