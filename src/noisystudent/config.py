"""Configuration: defaults < YAML file < command-line `key=value` overrides.

Every section is a dataclass, so the defaults and their reasons live next to each other, and an
unknown or mistyped key is an error naming the key (never silently ignored). The fully resolved
config is saved as `config.yaml` in the run directory.
"""

from __future__ import annotations

import dataclasses
import decimal
import difflib
import math
import re
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import UserError


@dataclass
class DataConfig:
    dataset: str = "folder"  # "folder" (class folders / split index files) or "digits" (built in)
    labeled: str | None = (
        None  # class-folder dir, or a `labeled.tsv` written by `noisystudent split`
    )
    unlabeled: str | None = None  # dir searched recursively, or an `unlabeled.tsv`
    test: str | None = None  # class-folder dir with the same classes as `labeled`
    image_size: int = 32  # training/eval resolution (square)
    hflip: bool = True  # random horizontal flip in training (off for digits: 2 vs 5)
    labels_per_class: int = 10  # digits only: labeled images per class
    cache_dir: str | None = None  # uint8 decode cache for small images; default: <run_dir>/cache
    num_workers: int = 0  # DataLoader workers (0: in the main process)
    on_bad_image: str = "skip"  # unlabeled set: "skip" unreadable files (and list them) or "error"
    on_bad_labeled: str = "error"  # labeled and test sets: "error" naming the file, or "skip"
    max_bad_fraction: float = 0.01  # skipping more than this fraction of a set stops the run
    # an image with more pixels is unreadable (the policy above); Pillow's own limit; null: none
    max_image_pixels: int | None = 89_478_485
    # how a stage tells that its images changed: "listing" (paths, sizes, modification times;
    # an index file's own bytes) or "content" (every file's bytes: where mtimes cannot be trusted)
    fingerprint: str = "listing"


@dataclass
class TrainConfig:
    """One model's training recipe; `teacher` and `student` each have one."""

    epochs: int = 30
    batch_size: int = 64  # labeled images per step
    optimizer: str = "sgd"  # "sgd" (nesterov momentum) or "adamw"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0  # linear warm-up, then cosine decay to 0
    label_smoothing: float = 0.0
    randaugment: str | None = (
        None  # timm RandAugment string, e.g. "rand-m9-n2"; None: crop/flip only
    )
    drop_rate: float | None = None  # dropout before the classifier; None: the model's default
    drop_path_rate: float | None = None  # stochastic depth at the last block; None: model default
    ratio: int = 3  # student only: unlabeled batch = ratio x labeled batch, one forward pass
    unlabeled_weight: float | None = None  # student only: weight of the unlabeled loss; None: ratio
    # student only: "scratch" (paper default), "teacher" (its teacher's weights: same
    # architecture only) or "auto" (teacher where the architectures match, else scratch)
    init: str = "scratch"
    checkpoint_every_steps: int = 500  # also at every epoch end; a kill loses at most this many
    # weight EMA used for evaluation and as the next teacher (reference code: 0.9999 at ImageNet
    # scale); None: off. timm's ModelEmaV3 with warm-up, so short runs are not stuck at init.
    ema_decay: float | None = None
    # "reference": RandAugment as the reference code applies it (every op, unclipped magnitude,
    # Cutout op, extra Cutout for small images); "timm": timm's semantics for the same string
    randaugment_semantics: str = "reference"
    sync_bn: bool = (
        False  # torchrun on GPUs: SyncBatchNorm across ranks (batch stats of the global batch)
    )
    # teacher only: the first teacher's initial weights. null: random (from the seed); true:
    # timm's own pretrained weights (timm model names; downloaded or from the Hugging Face
    # cache); or a weights file: safetensors, a torch state dict, a timm checkpoint, another
    # run's model.safetensors. The classifier head is re-made when the classes differ.
    pretrained: bool | str | None = None


def _default_teacher() -> TrainConfig:
    return TrainConfig()


def _default_student() -> TrainConfig:
    # Noise on the student only (paper sec. 2): RandAugment, dropout, stochastic depth.
    # drop_path 0.2: paper "survival probability 0.8 at the final layer".
    return TrainConfig(randaugment="rand-m9-n2", drop_rate=0.3, drop_path_rate=0.2)


@dataclass
class PseudoConfig:
    mode: str = "soft"  # "soft": softmax(logits / T); "hard": one-hot argmax
    temperature: float = 1.0  # reference scripts use T = 1
    # training-time re-tempering of the stored soft labels: p^(1/T) renormalised (1: as stored)
    retemper: float = 1.0
    label_smoothing: float = 0.1  # hard labels only: the reference code smooths them by 0.1
    topk: int | None = (
        None  # probabilities stored per image; None: all classes when <= 100, else 10
    )
    batch_size: int = 256
    shard_size: int = 65536  # rows per store shard: the unit of resume and of work per rank


@dataclass
class SelectConfig:
    threshold: float = 0.3  # paper: drop images whose max probability is below 0.3
    balance: bool = True  # equalise per-class counts (keep top-K most confident / duplicate)
    per_class: int | None = None  # K; None: mean per-class count after filtering
    # "simple": the paper's text (top-K most confident per class, duplicate to fill);
    # "reference": the reference code's histogram thresholds + fractional copies (scales).
    mode: str = "simple"
    upsample: bool = True  # reference mode: off caps the copy count at 1
    use_all: bool = False  # reference mode: every image above the threshold once


@dataclass
class FinetuneConfig:
    """FixRes-style fine-tune of the final model at a higher resolution (off by default)."""

    enabled: bool = False
    image_size: int | None = None  # must exceed data.image_size
    epochs: int = 2  # paper: 1.5 epochs (over ImageNet's labeled set)
    lr: float = 0.005
    batch_size: int = 64
    freeze_blocks: int = 0  # K: the stem and the first K blocks keep their weights


@dataclass
class RobustnessConfig:
    """`noisystudent robustness` and the pipeline's per-iteration robustness stage (protocols
    in docs/robustness.md)."""

    enabled: bool = (
        False  # pipeline: evaluate every model after training (off: the demo stays fast)
    )
    subset: int | None = None  # test images used (seeded choice); None: the whole test set
    seed: int = 0  # corruption/perturbation RNG, subset choice, PGD random start
    table: str = "auto"  # corruption parameters: auto (by image size), cifar32, tiny64, imagenet224
    reference: str = "0"  # iteration normalising mCE/mFR and filtering hard images; or a
    #   results.json path, or "none". Default: the iteration-0 teacher (paper: with vs without NS)
    corruptions: bool = True
    perturbations: bool = True
    perturbation_subset: int | None = None  # sequences used (first K of the subset); None: all
    adversarial: bool = True
    fgsm_eps: list[float] = field(default_factory=lambda: [0.0, 2.0, 4.0, 8.0, 16.0])  # /255
    pgd_eps: float = 16.0  # paper: PGD-10 at eps 16/255, step eps/4, random start
    pgd_steps: int = 10
    hard_dir: str | None = None  # optional class-folder set of natural "hard" images
    frost_dir: str | None = None  # frost1..frost5 images; None: procedural frost textures


@dataclass
class Config:
    run_dir: str = "runs/default"
    seed: int = 0
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", ...
    # One model per iteration: models[0] is the first teacher, models[i] the i-th student.
    models: list[str] = field(
        default_factory=lambda: ["cifar_resnet8", "cifar_resnet14", "cifar_resnet20"]
    )
    allow_smaller_student: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TrainConfig = field(default_factory=_default_teacher)
    student: TrainConfig = field(default_factory=_default_student)
    pseudo: PseudoConfig = field(default_factory=PseudoConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    robustness: RobustnessConfig = field(default_factory=RobustnessConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    eval_batch_size: int = 256
    progress: bool = True  # tqdm progress bars
    # "auto": bf16 autocast where the CPU/GPU runs it natively, fp16 + grad scaler on CUDA GPUs
    # without bf16, else fp32; "fp32" forces full precision; "bf16"/"fp16" force those
    precision: str = "auto"
    # torch.compile: "auto" compiles only where it pays for its compile time on CPU (training
    # runs of >= 2,000 steps, inference over >= 40,000 images; runtime.py has the thresholds,
    # docs/method.md "Performance: precision and compile" the reasons); "on" always (training
    # and inference, CPU and CUDA); "off" never. true/false are read as on/off.
    compile: str = "auto"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Keys that change how fast or how loudly a run goes, not what it computes: a run directory may
# be resumed with different values for these. (`compile` changes floating-point rounding only:
# a compiled or frozen model sums in another order, and the frozen inference copy holds bf16
# weights where autocast would cast them per op.)
RUNTIME_KEYS = {
    "run_dir",
    "device",
    "progress",
    "data.num_workers",
    "eval_batch_size",
    "pseudo.batch_size",
    "compile",
}
# Robustness settings never change training, so a run may be resumed with other values.
RUNTIME_KEYS |= {f"robustness.{f.name}" for f in fields(RobustnessConfig)}
# How often a checkpoint is written changes no result (resume is exact), so it may change too.
RUNTIME_KEYS |= {"teacher.checkpoint_every_steps", "student.checkpoint_every_steps"}
# How changed images are detected changes no result (a switch re-runs the stages that read them).
RUNTIME_KEYS |= {"data.fingerprint"}

CHOICES = {
    "data.dataset": ("folder", "digits"),
    "data.on_bad_image": ("skip", "error"),
    "data.on_bad_labeled": ("error", "skip"),
    "data.fingerprint": ("listing", "content"),
    "teacher.optimizer": ("sgd", "adamw"),
    "student.optimizer": ("sgd", "adamw"),
    "teacher.init": ("scratch", "teacher"),
    "student.init": ("scratch", "teacher", "auto"),
    "pseudo.mode": ("soft", "hard"),
    "teacher.randaugment_semantics": ("reference", "timm"),
    "student.randaugment_semantics": ("reference", "timm"),
    "select.mode": ("simple", "reference"),
    "robustness.table": ("auto", "cifar32", "tiny64", "imagenet224"),
    "precision": ("auto", "fp32", "bf16", "fp16"),
    "compile": ("auto", "on", "off"),
}
# YAML booleans accepted for these string keys (compile: true -> "on")
_BOOL_WORDS = {"compile": ("off", "on")}


# A decimal number as people write it (1e6, 1E-3, 5e-4, -1e2, .5, 3.): YAML 1.1 reads one with an
# exponent but no dot or no exponent sign as a string, so numeric keys accept these strings too.
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert one value against its annotated type; raise UserError naming the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if isinstance(value, bool) and bool in inner:  # e.g. `bool | str | None`: true/false
            return value
        inner = [a for a in inner if a is not bool] or inner
        return _coerce(value, inner[0], key)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise UserError(f"config key '{key}' must be a list, got {value!r}")
        return [_coerce(v, args[0], key) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"config key '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            d = decimal.Decimal(value.strip())  # exact: "1e3" is 1000, "1.5e0" is not an integer
            if d.adjusted() < 19 and d == d.to_integral_value():
                return int(d)
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise UserError(f"config key '{key}' must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            value = float(value.strip())  # YAML 1.1 reads 1e6, 5e-4 (no dot or sign) as strings
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"config key '{key}' must be a number, got {value!r}")
        if not math.isfinite(value):
            raise UserError(f"config key '{key}' must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if value is None:
            raise UserError(f"config key '{key}' must be a string, got null")
        return str(value)
    return value


def _unknown_key(key: str, valid: list[str]) -> UserError:
    close = difflib.get_close_matches(key.split(".")[-1], valid, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return UserError(f"unknown config key '{key}'{hint}; valid keys here: {', '.join(valid)}")


def _apply(obj: Any, updates: dict[str, Any], prefix: str = "") -> None:
    if not isinstance(updates, dict):
        raise UserError(f"config section '{prefix.rstrip('.') or '<top>'}' must be a mapping")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in fields(obj)]
    for name, value in updates.items():
        key = prefix + str(name)
        if name not in names:
            raise _unknown_key(key, names)
        tp = hints[name]
        if _is_dataclass_type(tp):
            _apply(getattr(obj, name), value, key + ".")
            continue
        if key in _BOOL_WORDS and isinstance(value, bool):
            value = _BOOL_WORDS[key][value]
        value = _coerce(value, tp, key)
        if key in CHOICES and value not in CHOICES[key]:
            raise UserError(f"config key '{key}' must be one of {CHOICES[key]}, got {value!r}")
        setattr(obj, name, value)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["teacher.epochs=5", "models=[resnet8,resnet14]"]` -> nested dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"override '{item}' must look like key=value (e.g. teacher.epochs=5)")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else None
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


_SEED_END = 2**53  # seeds are integers in [0, 2**53): torch, numpy and the hashes all take them
# Valid ranges of the numeric keys, checked when a config is loaded (out of range, a value would
# crash a stage later or give nonsense): key -> (low, high, interval, note). A bound of None is
# unbounded; interval "[]", "[)", "(]" or "()" says which ends are allowed; an optional key set to
# null is not checked; every entry of a list is.
RANGES: dict[str, tuple[float | None, float | None, str, str]] = {
    "seed": (0, _SEED_END, "[)", ""),
    "data.image_size": (8, None, "[]", ""),
    "data.labels_per_class": (1, None, "[]", ""),
    "data.num_workers": (0, None, "[]", " (0: load in the main process)"),
    "data.max_bad_fraction": (0, 1, "[]", ""),
    **{
        f"{role}.{name}": rng
        for role in ("teacher", "student")
        for name, rng in {
            "epochs": (1, None, "[]", ""),
            "batch_size": (1, None, "[]", ""),
            "lr": (0, None, "[]", " (0: the weights stay as initialised)"),
            "momentum": (0, 1, "[)", ""),
            "weight_decay": (0, None, "[]", ""),
            "warmup_epochs": (0, None, "[]", " (0: no warm-up)"),
            "label_smoothing": (0, 1, "[)", ""),
            "drop_rate": (0, 1, "[)", " (null: the model's default)"),
            "drop_path_rate": (0, 1, "[)", " (null: the model's default)"),
            "ratio": (1, None, "[]", ""),
            "unlabeled_weight": (0, None, "[]", " (null: the ratio)"),
            "checkpoint_every_steps": (0, None, "[]", " (0: at epoch ends only)"),
            "ema_decay": (0, 1, "[)", " (null: no EMA)"),
        }.items()
    },
    "pseudo.temperature": (0, None, "(]", ""),
    "pseudo.retemper": (0, None, "(]", " (1: as stored)"),
    "pseudo.label_smoothing": (0, 1, "[)", ""),
    "pseudo.topk": (1, None, "[]", " (null: all classes up to 100, else 10)"),
    "pseudo.batch_size": (1, None, "[]", ""),
    "pseudo.shard_size": (1, None, "[]", ""),
    "select.threshold": (0, 1, "[]", ""),
    "select.per_class": (1, None, "[]", " (null: the mean per-class count)"),
    "robustness.subset": (1, None, "[]", " (null: the whole test set)"),
    "robustness.seed": (0, _SEED_END, "[)", ""),
    "robustness.perturbation_subset": (1, None, "[]", " (null: all)"),
    "robustness.fgsm_eps": (0, None, "[]", " (units of 1/255)"),
    "robustness.pgd_eps": (0, None, "[]", " (units of 1/255)"),
    "robustness.pgd_steps": (1, None, "[]", ""),
    "finetune.epochs": (1, None, "[]", ""),
    "finetune.lr": (0, None, "(]", ""),
    "finetune.batch_size": (1, None, "[]", ""),
    "finetune.freeze_blocks": (0, None, "[]", " (0: nothing frozen)"),
    "eval_batch_size": (1, None, "[]", ""),
}
# keys that are also command-line options, named with the key in an error
_OPTION_NAMES = {"robustness.subset": "--subset", "robustness.seed": "--seed"}


def _bound(b: float) -> str:
    return "2**53" if b == _SEED_END else f"{b:g}"


def _check_range(cfg: Config, key: str, lo: float | None, hi: float | None, interval: str,
                 note: str) -> None:  # fmt: skip
    """Raise UserError naming the key, its value and the valid range if `key` is outside it."""
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    for v in value if isinstance(value, list) else [value]:
        if v is None:
            continue
        ok = (lo is None or (v >= lo if interval[0] == "[" else v > lo)) and (
            hi is None or (v <= hi if interval[1] == "]" else v < hi)
        )
        if ok:
            continue
        if hi is None:
            want = f"{'>=' if interval[0] == '[' else '>'} {_bound(lo)}"
        else:
            want = f"in {interval[0]}{_bound(lo)}, {_bound(hi)}{interval[1]}"
        what = "entries" if isinstance(value, list) else ""
        opt = f" ({_OPTION_NAMES[key]})" if key in _OPTION_NAMES else ""
        raise UserError(
            f"config key '{key}'{opt}{' ' + what if what else ''} must be {want}, got {v!r}{note}"
        )


def _validate(cfg: Config) -> None:
    if len(cfg.models) < 1:
        raise UserError("config key 'models' needs at least one model (the first teacher)")
    for key, (lo, hi, interval, note) in RANGES.items():
        _check_range(cfg, key, lo, hi, interval, note)
    for key in ("teacher", "student"):
        t: TrainConfig = getattr(cfg, key)
        if t.randaugment is not None and not str(t.randaugment).startswith("rand"):
            raise UserError(
                f"config key '{key}.randaugment' must be a timm RandAugment string like "
                f"'rand-m9-n2', got {t.randaugment!r}"
            )
    _validate_pretrained(cfg)
    pairs = list(zip(cfg.models, cfg.models[1:], strict=False))
    if cfg.student.init == "teacher" and any(t != s for t, s in pairs):
        t, s = next((t, s) for t, s in pairs if t != s)
        raise UserError(
            f"student.init=teacher needs the same architecture, but teacher is '{t}' and student "
            f"'{s}'; use student.init=auto (from the teacher only where they match) or scratch"
        )
    ft = cfg.finetune
    if ft.enabled and (ft.image_size is None or ft.image_size <= cfg.data.image_size):
        raise UserError(
            f"config key 'finetune.image_size' must be larger than data.image_size "
            f"({cfg.data.image_size}) when finetune.enabled is true, got {ft.image_size!r}"
        )


def _validate_pretrained(cfg: Config) -> None:
    """teacher.pretrained: false means null; only the first teacher has it; true only for timm."""
    if cfg.teacher.pretrained is False or cfg.teacher.pretrained == "":
        cfg.teacher.pretrained = None
    if cfg.student.pretrained is False or cfg.student.pretrained == "":
        cfg.student.pretrained = None
    if cfg.student.pretrained is not None:
        raise UserError(
            "config key 'student.pretrained' is not used: only the first teacher starts from "
            "pretrained weights (teacher.pretrained); students start from scratch or from their "
            "teacher (student.init)"
        )
    if cfg.teacher.pretrained is True:
        from .models import is_builtin  # lazy: models imports timm

        if is_builtin(cfg.models[0]):
            raise UserError(
                f"teacher.pretrained=true loads timm's own pretrained weights, which exist only "
                f"for timm models, and models[0] '{cfg.models[0]}' is a built-in model; give a "
                f"weights file (teacher.pretrained=PATH) or a timm model name"
            )


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    base: dict[str, Any] | None = None,
    flags: dict[str, Any] | None = None,
) -> Config:
    """Build a Config: defaults, then `base` (a preset such as the demo's), then the YAML file
    (if any; a run directory stands for its saved config), then `key=value` overrides, then
    `flags` ({"robustness.subset": 100, ...}: command-line options given as config keys)."""
    cfg = Config()
    if base:
        _apply(cfg, base)
    if path is not None:
        path = Path(path)
        if path.is_dir():
            from .rundir.layout import RunLayout  # a leaf module: no import cycle

            path = RunLayout(path).config
        if not path.is_file():
            raise UserError(f"config file '{path}' not found; pass a YAML file or a run directory")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(
                f"config file '{path}' is not valid YAML: {str(e).splitlines()[0]}"
            ) from None
        _apply(cfg, data)
    if overrides:
        _apply(cfg, parse_overrides(overrides))
    if flags:
        _apply(cfg, _nest(flags))
    _validate(cfg)
    return cfg


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{"a.b": 1} -> {"a": {"b": 1}}."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *parents, last = key.split(".")
        node = out
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = value
    return out


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Keys (dotted) whose values differ and that can change results. A key the older config
    `a` lacks (it was saved before the key existed) counts as holding today's default."""
    fa, fb = flatten(a), flatten(b)
    defaults = flatten(Config().to_dict())
    keys = sorted(set(fa) | set(fb))
    return [k for k in keys
            if fa.get(k, defaults.get(k)) != fb.get(k, defaults.get(k)) and k not in RUNTIME_KEYS]  # fmt: skip
