"""The training and inference loops. Backward and optimizer step stay visible in the loop.

`train` covers both the supervised teacher (no unlabeled stream) and the student: every step one
labeled batch plus an unlabeled batch `ratio` times larger, concatenated into ONE forward pass
(shared BatchNorm statistics, paper sec. 3), loss = CE(labeled) + w * CE(soft targets, unlabeled).

Exact resume. Every source of randomness in training is a pure function of (seed, stage, epoch,
step): the data order of each stream (`_BatchPlan`), each image's augmentation (its RNGs are
seeded per item from its position in the plan, in whichever DataLoader worker reads it) and the
model noise of each step (dropout, stochastic depth: the global RNG is seeded before each forward
pass). A checkpoint therefore needs only the position (epoch, step) besides the weights, optimizer,
scheduler, grad scaler and running meters; a resumed run repeats the uninterrupted one step for
step, whatever `num_workers` is. RNG states are saved and restored as well, for anything that
draws from the global generators outside that scheme.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import os
import random
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.utils import ModelEmaV3
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from . import __version__
from . import distributed as dist
from .augment import ViewDataset
from .config import TrainConfig
from .data import BadImage, ImageSet, load_rgb
from .errors import UserError
from .losses import soft_cross_entropy
from .rundir import RunDir, load_state, save_state


# --------------------------------------------------------------------------------------------
# device and precision
def resolve_device(name: str) -> torch.device:
    """`auto`: CUDA when present. Under torchrun, `auto`/`cuda` mean this rank's GPU
    (cuda:LOCAL_RANK)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{name}' requested but CUDA is not available; use device=cpu")
    if name == "cuda" and dist.world_size() > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device(name)


@dataclass
class Runtime:
    """How this process computes (set once from the config by `configure`)."""

    precision: str = "auto"  # "auto", "fp32", "bf16", "fp16"
    compile: str = "auto"  # "auto", "on", "off" (see compile_training / compile_inference)


RUNTIME = Runtime()

# `compile: auto` thresholds, measured on the 2-core AMX CPU with cifar_resnet20 in bf16
# (README, "Performance notes"). Inference: inductor with weight freezing (conv + BN folded,
# weights prepacked) ran 10,000 img/s against ~4,500 eager, after ~5 s of compiling, so it pays
# from ~40k images. Training: compiled steps were ~1.15-1.2x faster after 17-35 s of compiling
# (warm / cold inductor cache), which pays from ~1,000 steps of a 256-image batch; 2,000 leaves
# a margin for larger models.
COMPILE_INFER_MIN_IMAGES = 40_000
COMPILE_TRAIN_MIN_STEPS = 2_000


def _quiet_inductor() -> None:
    """inductor's C++ toolchain check warns 'No CUDA runtime is found' on every CPU-only compile;
    that is expected here, not something for the user to act on."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def _compile_pays(device: torch.device, work: int, minimum: int) -> bool:
    c = RUNTIME.compile
    return c == "on" or (c == "auto" and device.type == "cpu" and work >= minimum)


def compile_training(device: torch.device, steps: int) -> bool:
    return _compile_pays(device, steps, COMPILE_TRAIN_MIN_STEPS)


def compile_inference(device: torch.device, images: int) -> bool:
    return _compile_pays(device, images, COMPILE_INFER_MIN_IMAGES)


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str]:
    """The CPU feature flags the kernel reports (Linux); empty where there is no such file."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model(path: str = "/proc/cpuinfo") -> str:
    """The CPU's model name and its native bf16 flags, for benchmark records (figures differ by
    machine, e.g. with or without AMX)."""
    name = "unknown CPU"
    try:
        with open(path) as f:
            name = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name
            )
    except OSError:
        pass
    bf16 = sorted(cpu_flags(path) & {"amx_bf16", "avx512_bf16"})
    return f"{name} ({', '.join(bf16) or 'no native bf16'})"


def native_bf16(device: torch.device, flags: set[str] | None = None) -> bool:
    """Whether the device runs bf16 matrix work natively. On CPUs: AMX-BF16 or AVX512-BF16.
    torch's `get_cpu_capability()` says only "AVX512" on an AMX CPU (Sapphire Rapids), so the
    kernel's flags decide; the capability string is the fallback off Linux."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    flags = cpu_flags() if flags is None else flags
    if flags:
        return bool({"amx_bf16", "avx512_bf16"} & flags)
    cap = torch.backends.cpu.get_cpu_capability()
    return "AMX" in cap or "BF16" in cap


def configure(precision: str, compile: str, device: torch.device) -> str:
    """Set this process's precision and compile switches; returns the line to log, e.g.
    'precision: fp32 (this CPU has no native bf16: AVX2)'."""
    if precision == "fp16" and device.type != "cuda":
        raise UserError("precision=fp16 needs a CUDA device; use precision=bf16 or fp32 on CPU")
    RUNTIME.precision, RUNTIME.compile = precision, compile
    dt = autocast_dtype(device)
    name = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dt]
    why = "forced" if precision != "auto" else "auto"
    if precision == "auto" and dt == torch.bfloat16 and device.type == "cpu":
        why = "auto: this CPU has native bf16 (AMX/AVX512-BF16)"
    elif precision == "auto" and dt is None and device.type == "cpu":
        cap = torch.backends.cpu.get_cpu_capability()
        why = f"auto: this CPU has no native bf16 ({cap}), where bf16 runs ~10x slower"
    elif precision == "bf16" and not native_bf16(device):
        why = "forced; this device has no native bf16, expect it to be slow"
    how = {"on": "on", "off": "off", "auto": "auto (long runs and large sets only)"}[compile]
    return f"precision: {name} ({why}); channels_last (training: per family, engine.train_memory_format); compile {how}"


def has_depthwise_conv(model: nn.Module) -> bool:
    """Whether the model has depthwise convolutions (groups == in_channels > 1: EfficientNet,
    MobileNet, ConvNeXt families)."""
    return any(
        isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels
        for m in model.modules()
    )


def train_memory_format(model: nn.Module, device: torch.device) -> torch.memory_format:
    """channels_last for training, except for depthwise-conv models under bf16 on CPU: there
    channels-first trained faster, measured on two CPUs (`bench/memory_format.py --precision
    bf16`, efficientnet_small_b0: 75.3 vs 66.3 img/s on an AMD EPYC, 64.0 vs 59.6 on an AMX
    Xeon), while channels_last stays faster for them in inference and for the ResNets in both."""
    if (
        device.type == "cpu"
        and autocast_dtype(device) == torch.bfloat16
        and has_depthwise_conv(model)
    ):
        return torch.contiguous_format
    return torch.channels_last


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype, None for fp32. `auto`: bf16 where the hardware runs it natively; fp16
    (with a grad scaler) on CUDA GPUs without bf16; else fp32.

    On CPUs without AVX512-BF16/AMX, bf16 autocast is ~10x SLOWER than fp32 (measured on a
    2-core AVX2 machine: cifar_resnet20 training 472 -> 36 img/s), so `auto` uses it only when
    the CPU reports native support. With AMX (2-core Sapphire Rapids, channels_last, batch 256)
    it is 2.1x faster for cifar_resnet20 training and 2.5x for inference.
    """
    p = RUNTIME.precision
    if p != "auto":
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[p]
    if device.type == "cuda":
        return torch.bfloat16 if native_bf16(device) else torch.float16
    return torch.bfloat16 if native_bf16(device) else None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _stage_seed(seed: int, tag: str, epoch: int) -> int:
    return (
        seed * 1_000_003 + sum(ord(c) * 31**i for i, c in enumerate(tag)) + epoch * 7919
    ) % 2**31


_M64 = 0xFFFF_FFFF_FFFF_FFFF


def _mix(*xs: int) -> int:
    """A well-spread 63-bit seed from integers (splitmix64 steps); cheap enough per image."""
    h = 0x9E37_79B9_7F4A_7C15
    for x in xs:
        h = ((h ^ (x & _M64)) * 0xBF58_476D_1CE4_E5B9) & _M64
        h ^= h >> 31
        h = (h * 0x94D0_49BB_1331_11EB) & _M64
        h ^= h >> 29
    return h >> 1


def _seed_item(s: int) -> None:
    """Seed the generators augmentations draw from (Python random: timm RandAugment; torch CPU:
    torchvision crops and flips; numpy) for one image."""
    random.seed(s)
    np.random.seed(s & 0xFFFF_FFFF)
    torch.random.default_generator.manual_seed(s)


def _rng_state() -> dict[str, Any]:
    st: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": _np_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _np_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "gauss": float(gauss)}  # fmt: skip


def _set_rng_state(st: dict[str, Any]) -> None:
    random.setstate(_tuples(st["python"]))
    n = st["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _tuples(x: Any) -> Any:
    """random.setstate wants the tuples back that a round trip may have made lists."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


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
            _seed_item(s)
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
            load_rgb(path)
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
                               shuffle=True, seed=_mix(self.seed, k), drop_last=self.world > 1)  # fmt: skip
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
            yield [(r, _mix(self.seed, j, off + pos)) for pos, r in enumerate(rows)]


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
# checkpoints
CHECKPOINT_FORMAT = "noisystudent-train-state"
CHECKPOINT_VERSION = 1
# TrainConfig keys that may differ between a checkpoint and the run resuming it
_RUNTIME_TRAIN_KEYS = {"checkpoint_every_steps"}


def _identity(tc: TrainConfig, seed: int, tag: str, steps_per_epoch: int, n_l: int, n_u: int,
              extra: dict[str, Any] | None) -> dict[str, Any]:  # fmt: skip
    """What a checkpoint must match to be resumed: the stage, the recipe and the data sizes."""
    ident = {
        "format_version": CHECKPOINT_VERSION,
        "noisystudent_version": ".".join(__version__.split(".")[:2]),
        "stage": tag,
        "seed": seed,
        "steps_per_epoch": steps_per_epoch,
        "labeled_images": n_l,
        "unlabeled_images": n_u,
    }
    ident.update({k: v for k, v in asdict(tc).items() if k not in _RUNTIME_TRAIN_KEYS})
    ident.update(extra or {})
    return ident


def load_checkpoint(path: Path, identity: dict[str, Any]) -> dict[str, Any]:
    """Read a training checkpoint (torch.load weights_only=True: no code can run) and refuse one
    made for another model, class count, recipe or noisystudent version, saying what differs."""
    st = load_state(path)
    if not isinstance(st, dict) or st.get("format") != CHECKPOINT_FORMAT:
        raise UserError(
            f"'{path}' is not a noisystudent training checkpoint; delete it to restart that stage"
        )
    old = st.get("identity", {})
    diff = [
        f"{k}={old.get(k)!r} (this run: {identity.get(k)!r})"
        for k in sorted(set(old) | set(identity))
        if old.get(k) != identity.get(k)
    ]
    if diff:
        raise UserError(
            f"checkpoint '{path}' was made for a different run: {', '.join(diff[:5])}; "
            f"delete it to restart that stage, or use the settings it was made with"
        )
    return st


@dataclass
class TrainResult:
    epochs: int
    steps: int
    final_loss: float
    wall_s: float
    ema: nn.Module | None = None  # the weight-EMA model when tc.ema_decay is set


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
    identity: dict[str, Any] | None = None,
    extra_state: dict[str, Any] | None = None,
    checkpoint_every: int | None = None,
    batch_aug: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
) -> TrainResult:
    """Train `model` in place; checkpoint to out_dir/checkpoint.pt every `checkpoint_every` steps
    (default tc.checkpoint_every_steps; 0: epoch ends only) and at every epoch end; resume from
    there exactly (see the module docstring).

    labels: (N_l,) class indices of `labeled`; targets: (N_u, C) soft targets of `unlabeled`.
    An epoch is one pass over the unlabeled set when there is one (the labeled stream cycles),
    else one pass over the labeled set.
    identity: what else the checkpoint must match to be resumed (model name, classes, ...).
    extra_state: objects with state_dict()/load_state_dict() saved in the checkpoint beside the
    model (e.g. a weight EMA); their state is restored on resume.
    A non-finite loss stops training with an error naming the step; nothing after that step is
    saved, so the last checkpoint stays the last good one.
    batch_aug: noise applied to each step's whole uint8 batch on the device (batchaug), drawn
    from a generator seeded by the step and rank.
    """
    rank, world = dist.rank(), dist.world_size()
    if tc.sync_bn and world > 1:
        if device.type != "cuda":
            raise UserError("sync_bn=true needs CUDA devices (nccl); set it to false on CPU")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(device)
    fmt = train_memory_format(model, device)
    model.to(memory_format=fmt)
    # under torchrun: DDP averages gradients over ranks; `model` stays the bare module
    net = model
    if dist.is_distributed():
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    amp = autocast_dtype(device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    opt = build_optimizer(model, tc)
    every = tc.checkpoint_every_steps if checkpoint_every is None else checkpoint_every
    # batch sizes are per rank; each rank reads a disjoint 1/world of every stream
    n_l_rank = len(labeled) // world if world > 1 else len(labeled)
    bl = max(1, min(tc.batch_size, n_l_rank))
    lab_drop_last = n_l_rank >= bl
    if unlabeled is not None:
        n_u_rank = len(unlabeled) // world if world > 1 else len(unlabeled)
        bu = max(1, min(tc.batch_size * tc.ratio, n_u_rank))  # a tiny selection still trains
        steps_per_epoch = max(1, n_u_rank // bu)
        w_u = float(tc.ratio if tc.unlabeled_weight is None else tc.unlabeled_weight)
    else:
        steps_per_epoch = max(1, n_l_rank // bl)
    total = tc.epochs * steps_per_epoch
    warmup = int(tc.warmup_epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup))
    n_u = len(unlabeled) if unlabeled is not None else 0
    ident = _identity(tc, seed, tag, steps_per_epoch, len(labeled), n_u, identity)
    extra_state = dict(extra_state or {})
    ema = None
    if tc.ema_decay is not None:  # weight EMA (timm), checkpointed and resumed with the rest
        ema = ModelEmaV3(model, decay=tc.ema_decay, use_warmup=True)
        extra_state["ema"] = ema

    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = out_dir / "checkpoint.pt"
    start_epoch, start_i, t_used, loss_val = 0, 0, 0.0, float("nan")
    meters = {"loss_sum": 0.0, "correct": 0, "n_sum": 0, "seen": 0}
    if ckpt.is_file():
        st = load_checkpoint(ckpt, ident)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        scaler.load_state_dict(st["scaler"])
        for k, obj in extra_state.items():
            if k in st.get("extra", {}):
                obj.load_state_dict(st["extra"][k])
        _set_rng_state(st["rng"])
        pos = st["position"]
        start_epoch, start_i = int(pos["epoch"]), int(pos["step_in_epoch"])
        meters.update(st["meters"])
        t_used, loss_val = float(st.get("wall_s", 0.0)), float(st.get("last_loss", loss_val))
        if dist.is_main():
            run.log(stage=tag, event="resume", epoch=start_epoch, step=int(pos["step"]))

    labels = labels.to(device)
    if targets is not None:
        targets = targets.to(device)
    t0 = time.time()
    step = start_epoch * steps_per_epoch + start_i
    if compile_training(device, total - step):  # the steps left; state dicts stay `model`'s
        _quiet_inductor()
        net = torch.compile(net)
    # first non-finite loss: its step and value, kept on the device (no per-step host sync)
    bad_step = torch.full((), -1, dtype=torch.long, device=device)
    bad_loss = torch.zeros((), device=device)
    saved_step = step if ckpt.is_file() else None

    def check_finite() -> None:
        nonlocal bad_step
        if dist.is_distributed():  # a fault on any rank stops every rank at the same step
            b = bad_step.clone()
            torch.distributed.all_reduce(b, op=torch.distributed.ReduceOp.MAX)
            bad_step = b
        s = int(bad_step.item())
        if s >= 0:
            e, k = divmod(s - 1, steps_per_epoch)
            kept = (
                f"the last good checkpoint '{ckpt}' (step {saved_step}) is kept"
                if saved_step is not None
                else "no checkpoint was written yet"
            )
            raise UserError(
                f"{tag}: loss became {bad_loss.item()} at step {s} (epoch {e + 1}, step {k + 1} of "
                f"{steps_per_epoch}); lower the learning rate ({tc.lr}) or check the data; {kept}"
            )

    def save(epoch: int, step_in_epoch: int) -> None:
        nonlocal saved_step
        check_finite()  # never overwrite the last good checkpoint with a broken model
        if not dist.is_main():  # only rank 0 writes; every rank holds the same weights
            saved_step = step
            return
        state = {
            "format": CHECKPOINT_FORMAT,
            "identity": ident,
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict(),
            "extra": {k: obj.state_dict() for k, obj in extra_state.items()},
            "rng": _rng_state(),
            "position": {"epoch": epoch, "step_in_epoch": step_in_epoch, "step": step},
            "meters": {
                "loss_sum": float(loss_sum.item()),
                "correct": int(correct.item()),
                "n_sum": n_sum,
                "seen": seen,
            },
            "last_loss": loss_val,
            "wall_s": t_used + time.time() - t0,
        }
        save_state(ckpt, state)
        saved_step = step

    for epoch in range(start_epoch, tc.epochs):
        es = _stage_seed(seed, tag, epoch)
        i0 = start_i if epoch == start_epoch else 0
        model.train()
        lab_plan = _BatchPlan(
            len(labeled), bl, lab_drop_last, _mix(es, 0), i0, steps_per_epoch, rank, world
        )
        lab_it = _plan_loader(labeled, lab_plan, workers)
        unl_it = None
        if unlabeled is not None:
            unl_plan = _BatchPlan(
                len(unlabeled), bu, True, _mix(es, 1), i0, steps_per_epoch, rank, world
            )
            unl_it = _plan_loader(unlabeled, unl_plan, workers)
        loss_sum = torch.full((), float(meters["loss_sum"]), device=device)
        correct = torch.full((), int(meters["correct"]), device=device)  # labeled top-1 hits
        n_sum, seen = int(meters["n_sum"]), int(meters["seen"])
        meters = {"loss_sum": 0.0, "correct": 0, "n_sum": 0, "seen": 0}
        bar = tqdm(
            range(i0, steps_per_epoch),
            desc=f"{tag} epoch {epoch + 1}/{tc.epochs}",
            disable=not progress,
            leave=False,
        )
        for i in bar:
            xl, il = _drop_bad(*next(lab_it), labeled.images)
            yl = labels[il.to(device)]
            x = xl
            if unl_it is not None:
                xu, iu = _drop_bad(*next(unl_it), unlabeled.images)
                x = torch.cat([xl, xu])
                tu = targets[iu.to(device)]
            x = x.to(device, non_blocking=True)
            if batch_aug is not None:
                g = torch.Generator().manual_seed(
                    _mix(es, 3, i, rank) if world > 1 else _mix(es, 3, i)
                )
                x = batch_aug(x, g)
            x = x.contiguous(memory_format=fmt)
            # model noise of this step and rank (dropout, drop path)
            torch.manual_seed(_mix(es, 2, i, rank) if world > 1 else _mix(es, 2, i))
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                logits = net(x)
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
            if ema is not None:
                ema.update(model, step=step)
            first = ~torch.isfinite(loss.detach()) & (bad_step < 0)
            bad_step = torch.where(first, step, bad_step)
            bad_loss = torch.where(first, loss.detach(), bad_loss)
            loss_sum += loss.detach()
            correct += (logits[: len(xl)].detach().argmax(1) == yl).sum()
            n_sum += 1
            seen += len(xl)
            if (i + 1) % log_every == 0 or i + 1 == steps_per_epoch:
                check_finite()  # one host sync per `log_every` steps
                loss_val = (loss_sum / n_sum).item()
                bar.set_postfix(loss=f"{loss_val:.3f}")
                if dist.is_main():
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
            if i + 1 == steps_per_epoch:
                save(epoch + 1, 0)
            elif every > 0 and step % every == 0:
                save(epoch, i + 1)
    check_finite()
    return TrainResult(
        tc.epochs, total, loss_val, t_used + time.time() - t0, None if ema is None else ema.module
    )


@torch.no_grad()
def predict(
    model: nn.Module,
    ds: ViewDataset,
    batch: int,
    device: torch.device,
    workers: int = 0,
    progress: bool = False,
    desc: str = "predict",
    job_images: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Eval mode (no dropout, no stochastic depth, BN in inference mode) on the clean view.
    Yields (logits (n, C) float32 on CPU, dataset indices (n,)) batch by batch. Unreadable files
    are left out of their batch when ds.images.bad_log skips them, else an error names the file.
    job_images: the images of the whole job this call is part of (e.g. every shard of a
    pseudo-labeling pass), for the `compile: auto` decision; default len(ds). A compiled copy
    already made for these exact weights is reused whatever the size, so one job's calls all
    take the same numeric path."""
    model.to(device).eval()
    model.to(memory_format=torch.channels_last)
    amp = autocast_dtype(device)
    net, in_dtype = model, None
    n_job = len(ds) if job_images is None else job_images
    if compile_inference(device, n_job) or _cached_inference_net(model, device, amp):
        net, in_dtype = inference_net(model, device, amp)
        amp = None if in_dtype is not None else amp
    a = ds.raw_array()
    if a is not None:
        # decoded uint8 cache: slices of the array, no per-image work
        loader = (
            (
                torch.from_numpy(a[k : k + batch]).permute(0, 3, 1, 2),
                torch.arange(k, min(k + batch, len(a))),
            )
            for k in range(0, len(a), batch)
        )
        n_batches = math.ceil(len(a) / batch)
    else:
        loader = _loader(_Items(ds), batch, False, 0, workers, drop_last=False)
        n_batches = len(loader)
    for x, idx in tqdm(loader, desc=desc, disable=not progress, leave=False, total=n_batches):
        x, idx = _drop_bad(x, idx, ds.images)
        if len(idx) == 0:
            continue
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        n = len(x)
        if net is not model and n < batch:  # pad a short last batch: no recompile for its shape
            x = torch.cat([x, x.new_zeros((batch - n, *x.shape[1:]))])
            x = x.contiguous(memory_format=torch.channels_last)
        if in_dtype is not None and x.is_floating_point():  # uint8 goes in as it is
            x = x.to(in_dtype)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            logits = net(x)[:n]
        yield logits.float().cpu(), idx


# compiled inference copies, one per model, valid while the model's weights are unchanged
_INFERENCE_NETS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _weights_key(model: nn.Module, device: torch.device, amp: torch.dtype | None) -> tuple:
    """Changes whenever a parameter or buffer is replaced or modified in place (optimizer steps
    bump the tensors' version counters), so a stale compiled copy is never used."""
    ts = itertools.chain(model.parameters(), model.buffers())
    return (str(device), amp, tuple((t.data_ptr(), t._version) for t in ts))


class _Frozen:
    """Calls a compiled module with inductor's weight freezing on. torch.compile's
    `options={"freezing": True}` is not honoured (measured: 3,900 img/s, as without it, against
    8,400 with the global switch), and inductor compiles on the first call, so the switch is set
    around each call (a recompile for a new input shape is frozen too)."""

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


def evaluate(
    model: nn.Module,
    images: ImageSet,
    size: int,
    batch: int,
    device: torch.device,
    workers: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Top-1 / top-5 accuracy in percent, and the predictions (for a confusion matrix).
    Images skipped as unreadable (see ImageSet.bad_log) are left out: prediction -1, not in `n`."""
    ds = ViewDataset(images, size)
    labels = torch.from_numpy(images.labels)
    preds, top5_hits = torch.full((len(ds),), -1, dtype=torch.long), 0
    read = 0
    for logits, idx in predict(model, ds, batch, device, workers, progress, "evaluate"):
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
