"""The training and inference loops. Backward and optimizer step stay visible in the loop.

`train` covers both the supervised teacher (no unlabeled stream) and the student: every step one
labeled batch plus an unlabeled batch `ratio` times larger, concatenated into ONE forward pass
(shared BatchNorm statistics, paper sec. 3), loss = CE(labeled) + w * CE(soft targets, unlabeled).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from .augment import ViewDataset
from .config import TrainConfig
from .data import ImageSet
from .errors import UserError
from .losses import soft_cross_entropy
from .rundir import RunDir, load_state, load_tensors, save_state, save_tensors


# --------------------------------------------------------------------------------------------
# device and precision
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{name}' requested but CUDA is not available; use device=cpu")
    return torch.device(name)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 where the hardware runs it natively, else None (fp32).

    On CPUs without AVX512-BF16/AMX, bf16 autocast is ~10x SLOWER than fp32 (measured on this
    project's 2-core AVX2 dev machine: cifar_resnet20 training 472 -> 36 img/s), so it is used
    only when the CPU reports native support.
    """
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    cap = torch.backends.cpu.get_cpu_capability()
    return torch.bfloat16 if cap in ("AVX512_BF16", "AMX") or "AMX" in cap else None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _stage_seed(seed: int, tag: str, epoch: int) -> int:
    return (
        seed * 1_000_003 + sum(ord(c) * 31**i for i, c in enumerate(tag)) + epoch * 7919
    ) % 2**31


# --------------------------------------------------------------------------------------------
# optimisation
def build_optimizer(model: nn.Module, tc: TrainConfig) -> torch.optim.Optimizer:
    """Weight decay on weights only (not on BatchNorm or biases)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": tc.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if tc.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=tc.lr, momentum=tc.momentum, nesterov=tc.momentum > 0)
    return torch.optim.AdamW(groups, lr=tc.lr)


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up for `warmup` steps, then cosine decay to 0 at `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def _loader(ds, batch: int, shuffle: bool, seed: int, workers: int, drop_last: bool) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(
        ds,
        batch_size=batch,
        shuffle=shuffle,
        generator=g,
        num_workers=workers,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
    )


def _cycle(ds, batch: int, seed: int, workers: int) -> Iterator:
    """Endless shuffled batches (the labeled stream under a longer unlabeled epoch)."""
    k = 0
    while True:
        yield from _loader(ds, batch, True, seed + k, workers, drop_last=len(ds) >= batch)
        k += 1


@dataclass
class TrainResult:
    epochs: int
    steps: int
    final_loss: float
    wall_s: float


def train(
    model: nn.Module,
    labeled: ViewDataset,
    labels: torch.Tensor,
    tc: TrainConfig,
    out_dir: Path,
    run: RunDir,
    tag: str,
    seed: int,
    device: torch.device,
    unlabeled: ViewDataset | None = None,
    targets: torch.Tensor | None = None,
    workers: int = 0,
    progress: bool = True,
    log_every: int = 50,
) -> TrainResult:
    """Train `model` in place; checkpoint every epoch to out_dir/last.*; resume from there.

    labels: (N_l,) class indices of `labeled`; targets: (N_u, C) soft targets of `unlabeled`.
    An epoch is one pass over the unlabeled set when there is one (the labeled stream cycles),
    else one pass over the labeled set.
    """
    model.to(device)
    if device.type == "cpu" or device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    amp = autocast_dtype(device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    opt = build_optimizer(model, tc)
    bl = min(tc.batch_size, len(labeled))
    if unlabeled is not None:
        bu = min(tc.batch_size * tc.ratio, len(unlabeled))  # a tiny selection still trains
        steps_per_epoch = max(1, len(unlabeled) // bu)
        w_u = float(tc.ratio if tc.unlabeled_weight is None else tc.unlabeled_weight)
    else:
        steps_per_epoch = max(1, len(labeled) // bl)
    total = tc.epochs * steps_per_epoch
    warmup = int(tc.warmup_epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup))

    start_epoch, t_used = 0, 0.0
    ckpt, state_path = out_dir / "last.safetensors", out_dir / "last_state.pt"
    if ckpt.is_file() and state_path.is_file():
        st = load_state(state_path)
        model.load_state_dict(load_tensors(ckpt))
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        scaler.load_state_dict(st["scaler"])
        start_epoch, t_used = int(st["epoch"]) + 1, float(st.get("wall_s", 0.0))
        run.log(stage=tag, event="resume", epoch=start_epoch)

    labels = labels.to(device)
    if targets is not None:
        targets = targets.to(device)
    t0 = time.time()
    loss_val = float("nan")
    step = start_epoch * steps_per_epoch
    for epoch in range(start_epoch, tc.epochs):
        es = _stage_seed(seed, tag, epoch)
        seed_everything(es)  # augmentation, dropout and data order are a function of the epoch
        model.train()
        if unlabeled is not None:
            lab_it = _cycle(labeled, bl, es, workers)
            unl_it = iter(_loader(unlabeled, bu, True, es + 1, workers, drop_last=True))
        else:
            lab_it = iter(_loader(labeled, bl, True, es, workers, drop_last=len(labeled) >= bl))
            unl_it = None
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)  # labeled-batch top-1 hits (no per-step sync)
        n_sum = seen = 0
        bar = tqdm(
            range(steps_per_epoch),
            desc=f"{tag} epoch {epoch + 1}/{tc.epochs}",
            disable=not progress,
            leave=False,
        )
        for i in bar:
            xl, il = next(lab_it)
            yl = labels[il.to(device)]
            x = xl
            if unl_it is not None:
                xu, iu = next(unl_it)
                x = torch.cat([xl, xu])
                tu = targets[iu.to(device)]
            x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                logits = model(x)
            loss = F.cross_entropy(
                logits[: len(xl)].float(), yl, label_smoothing=tc.label_smoothing
            )
            if unl_it is not None:
                loss = loss + w_u * soft_cross_entropy(logits[len(xl) :], tu)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            step += 1
            loss_sum += loss.detach()
            correct += (logits[: len(xl)].detach().argmax(1) == yl).sum()
            n_sum += 1
            seen += len(xl)
            if (i + 1) % log_every == 0 or i + 1 == steps_per_epoch:
                loss_val = (loss_sum / n_sum).item()  # one host sync per `log_every` steps
                if not math.isfinite(loss_val):
                    raise UserError(
                        f"{tag}: loss became {loss_val} at epoch {epoch + 1} step {step}; "
                        f"lower the learning rate ({tc.lr}); last good checkpoint kept in {out_dir}"
                    )
                bar.set_postfix(loss=f"{loss_val:.3f}")
                run.log(
                    stage=tag,
                    event="train",
                    epoch=epoch + 1,
                    step=step,
                    loss=loss_val,
                    train_acc=100.0 * correct.item() / max(1, seen),
                    lr=sched.get_last_lr()[0],
                )
                loss_sum.zero_()
                correct.zero_()
                n_sum = seen = 0
        wall = t_used + time.time() - t0
        save_tensors(ckpt, model.state_dict())
        save_state(
            state_path,
            {
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": epoch,
                "wall_s": wall,
            },
        )
    return TrainResult(tc.epochs, total, loss_val, t_used + time.time() - t0)


@torch.no_grad()
def predict(
    model: nn.Module,
    ds: ViewDataset,
    batch: int,
    device: torch.device,
    workers: int = 0,
    progress: bool = False,
    desc: str = "predict",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Eval mode (no dropout, no stochastic depth, BN in inference mode) on the clean view.
    Yields (logits (n, C) float32 on CPU, dataset indices (n,)) batch by batch."""
    model.to(device).eval()
    model.to(memory_format=torch.channels_last)
    amp = autocast_dtype(device)
    loader = _loader(ds, batch, False, 0, workers, drop_last=False)
    for x, idx in tqdm(loader, desc=desc, disable=not progress, leave=False):
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = model(x)
        yield logits.float().cpu(), idx


def evaluate(
    model: nn.Module,
    images: ImageSet,
    size: int,
    batch: int,
    device: torch.device,
    workers: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Top-1 / top-5 accuracy in percent, and the predictions (for a confusion matrix)."""
    ds = ViewDataset(images, size)
    labels = torch.from_numpy(images.labels)
    preds, top5_hits = torch.empty(len(ds), dtype=torch.long), 0
    for logits, idx in predict(model, ds, batch, device, workers, progress, "evaluate"):
        preds[idx] = logits.argmax(1)
        k = min(5, logits.shape[1])
        top5_hits += (logits.topk(k, 1).indices == labels[idx, None]).any(1).sum().item()
    n = max(1, len(ds))
    return {
        "top1": 100.0 * (preds == labels).sum().item() / n,
        "top5": 100.0 * top5_hits / n,
        "n": len(ds),
        "predictions": preds.tolist(),
        "labels": labels.tolist(),
    }
