"""The training and inference loops. Backward and optimizer step stay visible in the loop.

`train` covers both the supervised teacher (no unlabeled stream) and the student: every step one
labeled batch plus an unlabeled batch `ratio` times larger, concatenated into ONE forward pass
(shared BatchNorm statistics, paper sec. 3), loss = CE(labeled) + w * CE(soft targets, unlabeled).

Exact resume. Every source of randomness in training is a pure function of (seed, stage, epoch,
step): the data order of each stream (`_BatchPlan`), each image's augmentation (its RNGs are
seeded per item from its position in the plan, in whichever DataLoader worker reads it) and the
model noise of each step (dropout, stochastic depth: the global RNG is seeded before each forward
pass). A checkpoint (checkpoint.py) therefore needs only the position (epoch, step) besides the
weights, optimizer, scheduler, grad scaler and running meters; a resumed run repeats the
uninterrupted one step for step, whatever `num_workers` is.

The engine knows nothing of run directories: a stage hands it a `Checkpoint`, a log callable and
the process's `Runtime` (device, precision, compile, rank).
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from . import distributed as dist
from .augment import ViewDataset
from .checkpoint import Checkpoint, recipe_identity
from .config import TrainConfig
from .data import BadImage, ImageSet, load_rgb
from .errors import UserError
from .losses import soft_cross_entropy
from .progress import bar
from .runtime import Runtime
from .seeds import mix, seed_item, stage_seed

LOG_EVERY = 50  # steps between metrics lines (and the host sync of the finite-loss check)


def _quiet_inductor() -> None:
    """inductor's C++ toolchain check warns 'No CUDA runtime is found' on every CPU-only compile;
    that is expected here, not something for the user to act on."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def has_depthwise_conv(model: nn.Module) -> bool:
    """Whether the model has depthwise convolutions (groups == in_channels > 1: EfficientNet,
    MobileNet, ConvNeXt families)."""
    return any(
        isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels
        for m in model.modules()
    )


def train_memory_format(model: nn.Module, rt: Runtime) -> torch.memory_format:
    """channels_last for training, except for depthwise-conv models under bf16 on CPU: there
    channels-first trains faster (`bench/memory_format.py --precision bf16`; docs/method.md,
    "Performance: precision and compile"), while channels_last stays faster for them in
    inference and for the ResNets in both."""
    if rt.device.type == "cpu" and rt.amp == torch.bfloat16 and has_depthwise_conv(model):
        return torch.contiguous_format
    return torch.channels_last


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


# --------------------------------------------------------------------------------------------
# data order and unreadable files
class _Items(Dataset):
    """A ViewDataset read by key `i` or `(i, seed)`: the seed fixes the image's augmentation.
    An unreadable file yields a zero image and the index -1 - i, reported by the main process
    (`_drop_bad`), so the policy for bad files is applied in one place and never inside a worker."""

    def __init__(self, ds: ViewDataset):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        i, s = key if isinstance(key, tuple) else (key, None)
        if s is not None:
            seed_item(s)
        try:
            return self.ds[i]
        except BadImage:
            return torch.zeros(3, self.ds.size, self.ds.size, dtype=torch.uint8), -1 - i


def _drop_bad(x: torch.Tensor, idx: torch.Tensor, images: ImageSet):
    """Remove the rows of unreadable files from a batch, recording them per the set's policy
    (images.bad_log; None: an error naming the file)."""
    bad = idx < 0
    if not bool(bad.any()):
        return x, idx
    for j in (-1 - idx[bad]).tolist():
        path = images.paths[j] if images.paths is not None else images.uids[j]
        try:  # the worker only said "bad"; read it again here for the reason
            load_rgb(path, images.max_pixels)
            reason = f"cannot read image '{path}' (it failed once while loading)"
        except BadImage as e:
            reason = str(e)
        if images.bad_log is None:
            raise UserError(f"{reason}; fix or remove the file")
        images.bad_log.add(images.uids[j], reason)
    return x[~bad], idx[~bad]


class _BatchPlan:
    """The batches of one data stream for steps [start, stop) of an epoch, as lists of
    (index, item seed). Batch j comes from pass k = j // per_pass over the set, shuffled by a
    permutation seeded from (seed, k): a pure function of j, so a resumed epoch picks up at its
    exact position without reading the batches before it. Under torchrun each pass is PyTorch's
    DistributedSampler (seeded per pass, drop_last): every rank reads a disjoint 1/world of the
    set; with one process it is the plain seeded permutation."""

    def __init__(self, n: int, batch: int, drop_last: bool, seed: int, start: int, stop: int,
                 rank: int = 0, world: int = 1):  # fmt: skip
        self.n, self.batch, self.seed, self.start, self.stop = n, batch, seed, start, stop
        self.rank, self.world = rank, world
        n_rank = n // world if world > 1 else n
        self.per_pass = max(1, n_rank // batch if drop_last else math.ceil(n_rank / batch))

    def _perm(self, k: int) -> list[int]:
        s = DistributedSampler(range(self.n), num_replicas=self.world, rank=self.rank,
                               shuffle=True, seed=mix(self.seed, k), drop_last=self.world > 1)  # fmt: skip
        return list(s)  # epoch 0: randperm(n) from a generator seeded with seed, then rank slice

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        perm_k, perm = -1, []
        for j in range(self.start, self.stop):
            k, slot = divmod(j, self.per_pass)
            if k != perm_k:
                perm, perm_k = self._perm(k), k
            rows = perm[slot * self.batch : (slot + 1) * self.batch]
            off = self.rank * self.batch
            yield [(r, mix(self.seed, j, off + pos)) for pos, r in enumerate(rows)]


def _array_batches(ds: ViewDataset, plan: _BatchPlan) -> Iterator:
    """Batches straight from a decoded uint8 cache (no per-image transform): one fancy index
    per batch; the NHWC array viewed as NCHW is already channels_last."""
    arr = ds.raw_array()
    for batch in plan:
        idx = np.fromiter((i for i, _ in batch), dtype=np.int64, count=len(batch))
        x = torch.from_numpy(arr[idx]).permute(0, 3, 1, 2)
        yield (x.pin_memory() if torch.cuda.is_available() else x), torch.from_numpy(idx)


def _plan_loader(ds: ViewDataset, plan: _BatchPlan, workers: int) -> Iterator:
    if ds.raw_array() is not None:
        return _array_batches(ds, plan)
    return iter(
        DataLoader(
            _Items(ds),
            batch_sampler=plan,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
        )
    )


# --------------------------------------------------------------------------------------------
# training
@dataclass
class TrainData:
    """What one training stage learns from. labels: (N_l,) class indices of `labeled`;
    targets: (N_u, C) soft targets of `unlabeled` (None for the supervised teacher). batch_aug:
    noise applied to each step's whole uint8 batch on the device (batchaug), drawn from a
    generator seeded by the step and rank."""

    labeled: ViewDataset
    labels: torch.Tensor
    unlabeled: ViewDataset | None = None
    targets: torch.Tensor | None = None
    batch_aug: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None
    workers: int = 0


@dataclass
class TrainResult:
    epochs: int
    steps: int
    final_loss: float
    wall_s: float
    ema: nn.Module | None = None  # the weight-EMA model when tc.ema_decay is set


class _Steps:
    """Batch sizes and step counts of one training run. Batch sizes are per rank; each rank
    reads a disjoint 1/world of every stream. An epoch is one pass over the unlabeled set when
    there is one (the labeled stream cycles), else one pass over the labeled set."""

    def __init__(self, data: TrainData, tc: TrainConfig, world: int):
        n_l = len(data.labeled) // world if world > 1 else len(data.labeled)
        self.bl = max(1, min(tc.batch_size, n_l))
        self.lab_drop_last = n_l >= self.bl
        self.bu, self.w_u = 0, 0.0
        if data.unlabeled is not None:
            n_u = len(data.unlabeled) // world if world > 1 else len(data.unlabeled)
            self.bu = max(1, min(tc.batch_size * tc.ratio, n_u))  # a tiny selection still trains
            self.per_epoch = max(1, n_u // self.bu)
            self.w_u = float(tc.ratio if tc.unlabeled_weight is None else tc.unlabeled_weight)
        else:
            self.per_epoch = max(1, n_l // self.bl)
        self.total = tc.epochs * self.per_epoch
        self.warmup = int(tc.warmup_epochs * self.per_epoch)


class _Meters:
    """Running loss and labeled top-1 since the last log line, kept on the device."""

    def __init__(self, device: torch.device, saved: dict[str, Any] | None = None):
        s = saved or {"loss_sum": 0.0, "correct": 0, "n_sum": 0, "seen": 0}
        self.loss_sum = torch.full((), float(s["loss_sum"]), device=device)
        self.correct = torch.full((), int(s["correct"]), device=device)
        self.n_sum, self.seen = int(s["n_sum"]), int(s["seen"])

    def add(self, loss: torch.Tensor, logits_l: torch.Tensor, yl: torch.Tensor) -> None:
        self.loss_sum += loss.detach()
        self.correct += (logits_l.detach().argmax(1) == yl).sum()
        self.n_sum += 1
        self.seen += len(yl)

    def mean_loss(self) -> float:
        return (self.loss_sum / self.n_sum).item()

    def accuracy(self) -> float:
        return 100.0 * self.correct.item() / max(1, self.seen)

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.correct.zero_()
        self.n_sum = self.seen = 0

    def state(self) -> dict[str, Any]:
        return {"loss_sum": float(self.loss_sum.item()), "correct": int(self.correct.item()),
                "n_sum": self.n_sum, "seen": self.seen}  # fmt: skip


class NonFinite(UserError):
    """Training diverged: a non-finite loss, or weights / optimizer state gone non-finite. The
    last good checkpoint is kept; the stage adds how to retry."""


def _non_finite(parts: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors in these objects' state dicts holding a NaN or an
    infinity (one host sync for all of them)."""
    names, flags = [], []

    def walk(prefix: str, x: Any) -> None:
        if isinstance(x, torch.Tensor):
            if x.is_floating_point():
                names.append(prefix)
                flags.append(torch.isfinite(x).all())
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(x, (list, tuple)):
            for k, v in enumerate(x):
                walk(f"{prefix}.{k}", v)

    for name, obj in parts.items():
        walk(name, obj.state_dict())
    if not flags:
        return []
    ok = torch.stack(flags).cpu().tolist()
    return [n for n, good in zip(names, ok, strict=True) if not good]


class _FiniteGuard:
    """The first non-finite loss: its step and value, kept on the device (no per-step host
    sync). `check` raises; it runs before every checkpoint, so a broken model never overwrites
    the last good checkpoint. `check_state` looks at the state itself, once per checkpoint: a
    step can leave non-finite weights behind while its own loss was still finite."""

    def __init__(self, device: torch.device, tag: str, lr: float, per_epoch: int):
        self.step = torch.full((), -1, dtype=torch.long, device=device)
        self.loss = torch.zeros((), device=device)
        self.tag, self.lr, self.per_epoch = tag, lr, per_epoch

    def record(self, loss: torch.Tensor, step: int) -> None:
        first = ~torch.isfinite(loss.detach()) & (self.step < 0)
        self.step = torch.where(first, step, self.step)
        self.loss = torch.where(first, loss.detach(), self.loss)

    def check(self, ckpt: Checkpoint) -> None:
        if dist.is_distributed():  # a fault on any rank stops every rank at the same step
            b = self.step.clone()
            torch.distributed.all_reduce(b, op=torch.distributed.ReduceOp.MAX)
            self.step = b
        s = int(self.step.item())
        if s < 0:
            return
        e, k = divmod(s - 1, self.per_epoch)
        raise NonFinite(
            f"{self.tag}: loss became {self.loss.item()} at step {s} (epoch {e + 1}, step {k + 1} "
            f"of {self.per_epoch}); lower the learning rate ({self.lr:g}) or check the data; "
            f"{self._kept(ckpt)}"
        )

    def check_state(self, parts: dict[str, Any], ckpt: Checkpoint, step: int) -> None:
        bad = _non_finite({**parts, **ckpt.extra})
        if dist.is_distributed():  # every rank stops, or none
            n = torch.tensor([len(bad)], device=self.step.device)
            torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MAX)
            if int(n.item()) and not bad:
                bad = ["(on another rank)"]
        if not bad:
            return
        e, k = divmod(step - 1, self.per_epoch)
        raise NonFinite(
            f"{self.tag}: {len(bad)} weight/optimizer tensors hold NaN or inf at step {step} "
            f"(epoch {e + 1}, step {k + 1} of {self.per_epoch}; first: {bad[0]}) although the "
            f"loss was still finite; lower the learning rate ({self.lr:g}); {self._kept(ckpt)}"
        )

    @staticmethod
    def _kept(ckpt: Checkpoint) -> str:
        if ckpt.saved_step is None:
            return "no checkpoint was written yet"
        return f"the last good checkpoint '{ckpt.path}' (step {ckpt.saved_step}) is kept"


def _prepare(model: nn.Module, tc: TrainConfig, rt: Runtime):
    """The model on the device in its training memory format, and the module the loop calls
    (DDP under torchrun; `model` stays the bare module whose state dicts are saved)."""
    if tc.sync_bn and rt.world > 1:
        if rt.device.type != "cuda":
            raise UserError("sync_bn=true needs CUDA devices (nccl); set it to false on CPU")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(rt.device)
    fmt = train_memory_format(model, rt)
    model.to(memory_format=fmt)
    net = model
    if dist.is_distributed():
        ids = [rt.device.index] if rt.device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return model, net, fmt


def _epoch_batches(data: TrainData, steps: _Steps, es: int, i0: int, rt: Runtime) -> Iterator:
    """Steps i0.. of one epoch: (step, labeled images, labels, unlabeled images or None, their
    targets or None), unreadable files dropped per their set's policy."""
    lab_plan = _BatchPlan(len(data.labeled), steps.bl, steps.lab_drop_last, mix(es, 0), i0,
                          steps.per_epoch, rt.rank, rt.world)  # fmt: skip
    lab_it = _plan_loader(data.labeled, lab_plan, data.workers)
    unl_it = None
    if data.unlabeled is not None:
        unl_plan = _BatchPlan(len(data.unlabeled), steps.bu, True, mix(es, 1), i0,
                              steps.per_epoch, rt.rank, rt.world)  # fmt: skip
        unl_it = _plan_loader(data.unlabeled, unl_plan, data.workers)
    for i in range(i0, steps.per_epoch):
        xl, il = _drop_bad(*next(lab_it), data.labeled.images)
        yl = data.labels[il.to(rt.device)]
        xu = tu = None
        if unl_it is not None:
            xu, iu = _drop_bad(*next(unl_it), data.unlabeled.images)
            tu = data.targets[iu.to(rt.device)]
        yield i, xl, yl, xu, tu


def _step_seed(es: int, what: int, i: int, rt: Runtime) -> int:
    """The seed of step i's model noise (what=2) or batch noise (what=3), per rank."""
    return mix(es, what, i, rt.rank) if rt.world > 1 else mix(es, what, i)


def train(model: nn.Module, data: TrainData, tc: TrainConfig, ckpt: Checkpoint,
          log: Callable[..., None], rt: Runtime, seed: int, tag: str) -> TrainResult:  # fmt: skip
    """Train `model` in place. `ckpt` is written every ckpt.every steps (0: epoch ends only)
    and at every epoch end, and resumed from exactly (see the module docstring). `log(event=...,
    **fields)` receives the train/resume events. A non-finite loss stops training with an error
    naming the step; nothing after that step is saved, so the last checkpoint stays good."""
    model, net, fmt = _prepare(model, tc, rt)
    scaler = torch.amp.GradScaler("cuda", enabled=rt.amp == torch.float16)
    opt = build_optimizer(model, tc)
    steps = _Steps(data, tc, rt.world)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, steps.total, steps.warmup)
    )
    ema = None
    if tc.ema_decay is not None:  # weight EMA (timm), checkpointed and resumed with the rest
        ema = ModelEmaV3(model, decay=tc.ema_decay, use_warmup=True)
        ckpt.extra["ema"] = ema
    n_u = len(data.unlabeled) if data.unlabeled is not None else 0
    recipe = recipe_identity(tc, seed, tag, steps.per_epoch, len(data.labeled), n_u)
    parts = {"model": model, "optimizer": opt, "scheduler": sched, "scaler": scaler}
    saved = ckpt.restore(recipe, parts)
    pos = saved["position"] if saved else {"epoch": 0, "step_in_epoch": 0, "step": 0}
    start_epoch, start_i = int(pos["epoch"]), int(pos["step_in_epoch"])
    t_used = saved["wall_s"] if saved else 0.0
    last = saved.get("last_loss") if saved else None
    loss_val = float("nan") if last is None else float(last)
    if saved:
        log(event="resume", epoch=start_epoch, step=int(pos["step"]))
    data.labels = data.labels.to(rt.device)
    if data.targets is not None:
        data.targets = data.targets.to(rt.device)
    t0 = time.time()
    step = start_epoch * steps.per_epoch + start_i
    if rt.compile_training(steps.total - step):  # the steps left; state dicts stay `model`'s
        _quiet_inductor()
        net = torch.compile(net)
    guard = _FiniteGuard(rt.device, tag, tc.lr, steps.per_epoch)
    meters = _Meters(rt.device, saved["meters"] if saved else None)

    def save(epoch: int, step_in_epoch: int) -> None:
        guard.check(ckpt)  # never overwrite the last good checkpoint with a broken model
        guard.check_state(parts, ckpt, step)
        position = {"epoch": epoch, "step_in_epoch": step_in_epoch, "step": step}
        ckpt.save(parts, position, meters.state(), loss_val, t_used + time.time() - t0)

    for epoch in range(start_epoch, tc.epochs):
        es = stage_seed(seed, tag, epoch)
        i0 = start_i if epoch == start_epoch else 0
        model.train()
        batches = _epoch_batches(data, steps, es, i0, rt)
        progress = bar(batches, f"{tag} epoch {epoch + 1}/{tc.epochs}",
                       steps.per_epoch - i0, rt.progress)  # fmt: skip
        for i, xl, yl, xu, tu in progress:
            x = xl if xu is None else torch.cat([xl, xu])
            x = x.to(rt.device, non_blocking=True)
            if data.batch_aug is not None:
                x = data.batch_aug(x, torch.Generator().manual_seed(_step_seed(es, 3, i, rt)))
            x = x.contiguous(memory_format=fmt)
            torch.manual_seed(_step_seed(es, 2, i, rt))  # this step's dropout / drop path
            with torch.autocast(rt.device.type, dtype=rt.amp or torch.float32,
                                enabled=rt.amp is not None):  # fmt: skip
                logits = net(x)
            loss = F.cross_entropy(
                logits[: len(xl)].float(), yl, label_smoothing=tc.label_smoothing
            )
            if xu is not None:
                loss = loss + steps.w_u * soft_cross_entropy(logits[len(xl) :], tu)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            step += 1
            if ema is not None:
                ema.update(model, step=step)
            guard.record(loss, step)
            meters.add(loss, logits[: len(xl)], yl)
            if (i + 1) % LOG_EVERY == 0 or i + 1 == steps.per_epoch:
                guard.check(ckpt)  # one host sync per LOG_EVERY steps
                loss_val = meters.mean_loss()
                progress.set_postfix(loss=f"{loss_val:.3f}")
                log(event="train", epoch=epoch + 1, step=step, loss=loss_val,
                    train_acc=meters.accuracy(), lr=sched.get_last_lr()[0])  # fmt: skip
                meters.reset()
            if i + 1 == steps.per_epoch:
                save(epoch + 1, 0)
            elif ckpt.every > 0 and step % ckpt.every == 0:
                save(epoch, i + 1)
    guard.check(ckpt)
    wall = t_used + time.time() - t0
    return TrainResult(tc.epochs, steps.total, loss_val, wall, None if ema is None else ema.module)


# --------------------------------------------------------------------------------------------
# inference
def _batches_of_array(a: np.ndarray, batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Slices of a decoded uint8 cache (NHWC viewed as NCHW), no per-image work."""
    for k in range(0, len(a), batch):
        yield (
            torch.from_numpy(a[k : k + batch]).permute(0, 3, 1, 2),
            torch.arange(k, min(k + batch, len(a))),
        )


def _inference_setup(model: nn.Module, rt: Runtime, n_job: int):
    """(callable, autocast dtype or None, input dtype or None) for eval-mode inference: the
    compiled frozen copy when `compile` pays for this job or one exists for these weights."""
    model.to(rt.device).eval()
    model.to(memory_format=torch.channels_last)
    amp = rt.amp
    if rt.compile_inference(n_job) or _cached_inference_net(model, rt.device, amp):
        net, in_dtype = inference_net(model, rt.device, amp)
        return net, (None if in_dtype is not None else amp), in_dtype
    return model, amp, None


def _forward(net, model: nn.Module, x: torch.Tensor, batch: int, amp, in_dtype, device):
    x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
    n = len(x)
    if net is not model and n < batch:  # pad a short last batch: no recompile for its shape
        x = torch.cat([x, x.new_zeros((batch - n, *x.shape[1:]))])
        x = x.contiguous(memory_format=torch.channels_last)
    if in_dtype is not None and x.is_floating_point():  # uint8 goes in as it is
        x = x.to(in_dtype)
    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        return net(x)[:n]


@torch.no_grad()
def predict(model: nn.Module, ds: ViewDataset, batch: int, rt: Runtime, workers: int = 0,
            desc: str = "predict", job_images: int | None = None,
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
    """Eval mode (no dropout, no stochastic depth, BN in inference mode) on the clean view.
    Yields (logits (n, C) float32 on CPU, dataset indices (n,)) batch by batch. Unreadable files
    are left out of their batch when ds.images.bad_log skips them, else an error names the file.
    job_images: the images of the whole job this call is part of (e.g. every shard of a
    pseudo-labeling pass), for the `compile: auto` decision; default len(ds). A compiled copy
    already made for these exact weights is reused whatever the size, so one job's calls all
    take the same numeric path."""
    net, amp, in_dtype = _inference_setup(model, rt, len(ds) if job_images is None else job_images)
    a = ds.raw_array()
    if a is not None:
        loader, n_batches = _batches_of_array(a, batch), math.ceil(len(a) / batch)
    else:  # a private generator: reading never draws from the global RNG
        loader = DataLoader(_Items(ds), batch_size=batch, shuffle=False,
                            generator=torch.Generator().manual_seed(0), num_workers=workers,
                            pin_memory=torch.cuda.is_available())  # fmt: skip
        n_batches = len(loader)
    for x, idx in bar(loader, desc, n_batches, rt.progress):
        x, idx = _drop_bad(x, idx, ds.images)
        if len(idx) == 0:
            continue
        yield _forward(net, model, x, batch, amp, in_dtype, rt.device).float().cpu(), idx


@torch.no_grad()
def predict_array(model: nn.Module, images: np.ndarray, batch: int, rt: Runtime,
                  desc: str = "predict", progress: bool = True) -> torch.Tensor:  # fmt: skip
    """Eval-mode logits (n, C) float32 on CPU of uint8 images (n, H, W, 3) already in memory
    (an array or a memory map, read a batch at a time), with the same precision and compile
    policy as `predict`. `progress`: show a bar when the runtime shows progress."""
    net, amp, in_dtype = _inference_setup(model, rt, len(images))
    out = []
    for k in bar(range(0, len(images), batch), desc, None, rt.progress and progress):
        x = torch.from_numpy(np.array(images[k : k + batch])).permute(0, 3, 1, 2)
        out.append(_forward(net, model, x, batch, amp, in_dtype, rt.device).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


# compiled inference copies, one per model, valid while the model's weights are unchanged
_INFERENCE_NETS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _weights_key(model: nn.Module, device: torch.device, amp: torch.dtype | None) -> tuple:
    """Changes whenever a parameter or buffer is replaced or modified in place (optimizer steps
    bump the tensors' version counters), so a stale compiled copy is never used."""
    ts = itertools.chain(model.parameters(), model.buffers())
    return (str(device), amp, tuple((t.data_ptr(), t._version) for t in ts))


class _Frozen:
    """Calls a compiled module with inductor's weight freezing on. torch.compile's
    `options={"freezing": True}` is not honoured (it runs as fast as no freezing at all; docs/
    method.md, "Performance: precision and compile"), and inductor compiles on the first call,
    so the global switch is set around each call (a recompile for a new input shape is frozen
    too)."""

    def __init__(self, compiled: Callable[[torch.Tensor], torch.Tensor]):
        import torch._inductor.config as inductor_config

        self.compiled, self.inductor_config = compiled, inductor_config

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with self.inductor_config.patch(freezing=True):
            return self.compiled(x)


def _cached_inference_net(model: nn.Module, device: torch.device, amp: torch.dtype | None):
    """(net, input dtype) of the compiled copy made for `model`'s current weights, or None."""
    hit = _INFERENCE_NETS.get(model)
    return hit[1:] if hit is not None and hit[0] == _weights_key(model, device, amp) else None


def inference_net(
    model: nn.Module, device: torch.device, amp: torch.dtype | None
) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.dtype | None]:
    """A compiled eval-mode copy of `model` for inference, and the dtype its input must have
    (None: run it under autocast as usual). On CPU: inductor with weight freezing (BatchNorm
    folded into the convolutions, weights prepacked for oneDNN), the copy cast to bf16 outright
    when bf16 is in use, which beats autocast's per-op casts. `model` itself is not changed."""
    hit = _cached_inference_net(model, device, amp)
    if hit is not None:
        return hit
    _quiet_inductor()
    if device.type == "cpu":
        frozen = copy.deepcopy(model).eval()
        in_dtype = amp if amp == torch.bfloat16 else torch.float32
        frozen = frozen.to(in_dtype)
        for p in frozen.parameters():
            p.requires_grad_(False)
        net = _Frozen(torch.compile(frozen))
    else:  # CUDA: plain torch.compile under autocast (not cached: it would hold `model`)
        return torch.compile(model), None
    _INFERENCE_NETS[model] = (_weights_key(model, device, amp), net, in_dtype)
    return net, in_dtype


def evaluate(model: nn.Module, images: ImageSet, size: int, batch: int, rt: Runtime,
             workers: int = 0) -> dict[str, Any]:  # fmt: skip
    """Top-1 / top-5 accuracy in percent, and the predictions (for a confusion matrix).
    Images skipped as unreadable (see ImageSet.bad_log) are left out: prediction -1, not in `n`."""
    ds = ViewDataset(images, size)
    labels = torch.from_numpy(images.labels)
    preds, top5_hits = torch.full((len(ds),), -1, dtype=torch.long), 0
    read = 0
    for logits, idx in predict(model, ds, batch, rt, workers, "evaluate"):
        preds[idx] = logits.argmax(1)
        k = min(5, logits.shape[1])
        top5_hits += (logits.topk(k, 1).indices == labels[idx, None]).any(1).sum().item()
        read += len(idx)
    n = max(1, read)
    return {
        "top1": 100.0 * (preds == labels).sum().item() / n,
        "top5": 100.0 * top5_hits / n,
        "n": read,
        "predictions": preds.tolist(),
        "labels": labels.tolist(),
    }
