"""How this process computes: device, precision, compile and rank, decided once at start-up.

`start(cfg)` is the one start-up of every command (CLI stages, the pipeline, robustness): it joins
torchrun's process group when there is one, picks the device, checks the precision, prints one
line on rank 0 and returns a `Runtime` that the engine, labeling and robustness inference take
as an argument (no module-level switches).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from . import distributed as dist
from .errors import UserError

# `compile: auto` thresholds: compiling costs seconds up front (docs/method.md, "Performance:
# precision and compile" has the measurements), so it is used only on CPU and only for work
# long enough to win that time back: inference with weight freezing (conv + BN folded, weights
# prepacked) over many images; training over many steps, with a margin for larger models.
COMPILE_INFER_MIN_IMAGES = 40_000
COMPILE_TRAIN_MIN_STEPS = 2_000

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
COMPILE_MODES = ("auto", "on", "off")


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


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype, None for fp32. `auto`: bf16 where the hardware runs it natively; fp16
    (with a grad scaler) on CUDA GPUs without bf16; else fp32. On CPUs without AVX512-BF16/AMX
    bf16 is emulated and many times slower than fp32, so `auto` uses it only where the CPU
    reports native support (docs/method.md, "Performance: precision and compile")."""
    if precision != "auto":
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    if device.type == "cuda":
        return torch.bfloat16 if native_bf16(device) else torch.float16
    return torch.bfloat16 if native_bf16(device) else None


@dataclass(frozen=True)
class Runtime:
    """How this process computes. `rank`/`world` are torchrun's (0 of 1 without it)."""

    device: torch.device = torch.device("cpu")
    precision: str = "auto"  # "auto", "fp32", "bf16", "fp16"
    compile: str = "auto"  # "auto", "on", "off" (see compile_training / compile_inference)
    progress: bool = False  # progress bars / periodic progress lines
    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise UserError(f"precision '{self.precision}' is not one of {PRECISIONS}")
        if self.compile not in COMPILE_MODES:
            raise UserError(f"compile '{self.compile}' is not one of {COMPILE_MODES}")
        if self.precision == "fp16" and self.device.type != "cuda":
            raise UserError("precision=fp16 needs a CUDA device; use precision=bf16 or fp32 on CPU")

    @property
    def amp(self) -> torch.dtype | None:
        """The autocast dtype of this process (None: fp32)."""
        return autocast_dtype(self.device, self.precision)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _compile_pays(self, work: int, minimum: int) -> bool:
        c = self.compile
        return c == "on" or (c == "auto" and self.device.type == "cpu" and work >= minimum)

    def compile_training(self, steps: int) -> bool:
        return self._compile_pays(steps, COMPILE_TRAIN_MIN_STEPS)

    def compile_inference(self, images: int) -> bool:
        return self._compile_pays(images, COMPILE_INFER_MIN_IMAGES)

    def describe(self) -> str:
        """The start-up line, e.g. 'precision: fp32 (auto: this CPU has no native bf16 ...)'."""
        dt = self.amp
        name = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dt]
        why = "forced" if self.precision != "auto" else "auto"
        cpu = self.device.type == "cpu"
        if self.precision == "auto" and dt == torch.bfloat16 and cpu:
            why = "auto: this CPU has native bf16 (AMX/AVX512-BF16)"
        elif self.precision == "auto" and dt is None and cpu:
            cap = torch.backends.cpu.get_cpu_capability()
            why = f"auto: this CPU has no native bf16 ({cap}), where bf16 is emulated and slow"
        elif self.precision == "bf16" and not native_bf16(self.device):
            why = "forced; this device has no native bf16, expect it to be slow"
        how = {"on": "on", "off": "off", "auto": "auto (long runs and large sets only)"}
        return (
            f"precision: {name} ({why}); channels_last (training: per model family); "
            f"compile {how[self.compile]}"
        )


def start(
    device: str, precision: str, compile: str, progress: bool, announce: bool = True
) -> Runtime:
    """Join torchrun's process group (if any), resolve the device and make this process's
    Runtime; rank 0 prints its one-line description when `announce`."""
    dev = dist.init(resolve_device(device))
    rt = Runtime(dev, precision, compile, progress, dist.rank(), dist.world_size())
    if announce and rt.is_main:
        print(rt.describe())
    return rt


def from_config(cfg, announce: bool = True) -> Runtime:
    """`start` with the config's device, precision, compile and progress keys."""
    return start(cfg.device, cfg.precision, cfg.compile, cfg.progress, announce)
