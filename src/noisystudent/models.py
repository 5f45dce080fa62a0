"""Models: any timm model by name, plus a built-in family for small (e.g. 32x32) images.

Built-in names (CIFAR-style, 3 stages, global pooling, dropout before the classifier, stochastic
depth rising linearly with block index to `drop_path_rate` at the last block):

    cifar_resnet{D}   He et al. 2016 ResNet for CIFAR, D = 6n + 2 (8, 14, 20, 32, 44, 56, 110)
    wrn{D}_{K}        Zagoruyko & Komodakis 2016 pre-activation WideResNet-D-K, D = 6n + 4

Every model is wrapped in `Classifier`, which takes images in [0, 1] (or uint8 0..255) and
normalises inside the model, so attacks and robustness code work in pixel space.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath

from .errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def drop_path_schedule(rate: float, n_blocks: int) -> list[float]:
    """Per-block stochastic-depth rate, rising linearly from 0 at the first block to `rate` at
    the last (paper sec. 3: survival probability 0.8 at the final layer for rate 0.2)."""
    if n_blocks <= 1:
        return [rate] * n_blocks
    return [rate * i / (n_blocks - 1) for i in range(n_blocks)]


class BasicBlock(nn.Module):
    """Post-activation ResNet block (CIFAR ResNet); `preact=True` gives the WRN block."""

    def __init__(self, cin: int, cout: int, stride: int, drop_path: float, preact: bool):
        super().__init__()
        self.preact = preact
        self.bn1 = nn.BatchNorm2d(cin if preact else cout)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)
            self.shortcut_bn = nn.Identity() if preact else nn.BatchNorm2d(cout)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.preact:
            o = F.relu(self.bn1(x))
            sc = x if self.shortcut is None else self.shortcut(o)
            o = self.conv2(F.relu(self.bn2(self.conv1(o))))
            return sc + self.drop_path(o)
        o = F.relu(self.bn1(self.conv1(x)))
        o = self.bn2(self.conv2(o))
        sc = x if self.shortcut is None else self.shortcut_bn(self.shortcut(x))
        return F.relu(sc + self.drop_path(o))


class SmallResNet(nn.Module):
    """Three-stage ResNet/WRN for small images. x: (N, 3, H, W) -> logits (N, num_classes)."""

    def __init__(
        self,
        blocks_per_stage: int,
        widths: tuple[int, int, int],
        num_classes: int,
        drop_rate: float,
        drop_path_rate: float,
        preact: bool,
        stem: int = 16,
    ):
        super().__init__()
        self.preact = preact
        self.stem = nn.Sequential(nn.Conv2d(3, stem, 3, 1, 1, bias=False))
        if not preact:
            self.stem.append(nn.BatchNorm2d(stem))
            self.stem.append(nn.ReLU(inplace=True))
        rates = drop_path_schedule(drop_path_rate, 3 * blocks_per_stage)
        blocks, cin, k = [], stem, 0
        for s, w in enumerate(widths):
            for b in range(blocks_per_stage):
                stride = 2 if (s > 0 and b == 0) else 1
                blocks.append(BasicBlock(cin, w, stride, rates[k], preact))
                cin, k = w, k + 1
        self.blocks = nn.Sequential(*blocks)
        self.final_bn = nn.BatchNorm2d(cin) if preact else nn.Identity()
        self.drop_rate = drop_rate
        self.num_features = cin
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        if self.preact:
            x = F.relu(self.final_bn(x))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        if self.drop_rate > 0:
            x = F.dropout(x, self.drop_rate, self.training)
        return self.fc(x)

    def get_classifier(self) -> nn.Module:
        """The classifier head (timm's name for it)."""
        return self.fc


# EfficientNet for small images as the reference code builds it for 32x32 data: the B0 stages
# with stride 1 (not 2) in stages 2 and 3, scaled by the B-size table; per-size dropout and
# stochastic depth 0.2 (method.md, "Settings from the reference code").
_EFFNET_SIZES = {  # width, depth, dropout
    "b0": (1.0, 1.0, 0.2), "b1": (1.0, 1.1, 0.2), "b2": (1.1, 1.2, 0.3), "b3": (1.2, 1.4, 0.3),
    "b4": (1.4, 1.8, 0.4), "b5": (1.6, 2.2, 0.4), "b6": (1.8, 2.6, 0.5), "b7": (2.0, 3.1, 0.5),
}  # fmt: skip
_EFFNET_SMALL_ARCH = [
    ["ds_r1_k3_s1_e1_c16_se0.25"],
    ["ir_r2_k3_s1_e6_c24_se0.25"],  # stride 1 (B0: 2)
    ["ir_r2_k5_s1_e6_c40_se0.25"],  # stride 1 (B0: 2)
    ["ir_r3_k3_s2_e6_c80_se0.25"],
    ["ir_r3_k5_s1_e6_c112_se0.25"],
    ["ir_r4_k5_s2_e6_c192_se0.25"],
    ["ir_r1_k3_s1_e6_c320_se0.25"],
]


def _efficientnet_small(size: str, num_classes: int, drop_rate: float | None,
                        drop_path_rate: float | None) -> nn.Module:  # fmt: skip
    """Built with timm's EfficientNet builder (decode_arch_def + EfficientNet), not re-written."""
    from functools import partial

    from timm.models._efficientnet_builder import decode_arch_def, round_channels
    from timm.models.efficientnet import EfficientNet

    width, depth, dropout = _EFFNET_SIZES[size]
    round_chs = partial(round_channels, multiplier=width, divisor=8)
    return EfficientNet(
        block_args=decode_arch_def(_EFFNET_SMALL_ARCH, depth), num_classes=num_classes,
        num_features=round_chs(1280), stem_size=32, round_chs_fn=round_chs, act_layer=nn.SiLU,
        drop_rate=dropout if drop_rate is None else drop_rate,
        drop_path_rate=0.2 if drop_path_rate is None else drop_path_rate,
    )  # fmt: skip


def _builtin(
    name: str, num_classes: int, drop_rate: float | None, drop_path_rate: float | None
) -> nn.Module | None:
    # defaults: no noise unless asked for (a teacher trained plainly, as the paper's baselines)
    dr = 0.0 if drop_rate is None else drop_rate
    dp = 0.0 if drop_path_rate is None else drop_path_rate
    m = re.fullmatch(r"efficientnet_small_(b[0-7])", name)
    if m:
        return _efficientnet_small(m.group(1), num_classes, drop_rate, drop_path_rate)
    m = re.fullmatch(r"cifar_resnet(\d+)", name)
    if m:
        depth = int(m.group(1))
        if depth < 8 or (depth - 2) % 6:
            raise UserError(
                f"model '{name}': cifar_resnet depth must be 6n+2 (8, 14, 20, 32, 44, 56, 110)"
            )
        return SmallResNet((depth - 2) // 6, (16, 32, 64), num_classes, dr, dp, preact=False)
    m = re.fullmatch(r"wrn(\d+)_(\d+)", name)
    if m:
        depth, k = int(m.group(1)), int(m.group(2))
        if depth < 10 or (depth - 4) % 6 or k < 1:
            raise UserError(
                f"model '{name}': WideResNet depth must be 6n+4 (10, 16, 22, 28, 40) and width >= 1"
            )
        return SmallResNet(
            (depth - 4) // 6, (16 * k, 32 * k, 64 * k), num_classes, dr, dp, preact=True
        )
    return None


# Names the unknown-model suggestions are drawn from: every built-in size people use plus timm's.
BUILTIN_NAMES = (
    [f"efficientnet_small_b{i}" for i in range(8)]
    + [f"cifar_resnet{d}" for d in (8, 14, 20, 32, 44, 56, 110)]
    + [f"wrn{d}_{k}" for d in (10, 16, 22, 28, 40) for k in (1, 2, 4, 8, 10)]
)
MODELS_LISTED = (
    "built-ins cifar_resnet{6n+2}, wrn{6n+4}_{k}, efficientnet_small_b0..b7 (docs/method.md, "
    '"9. Models"), or any name in timm.list_models()'
)


_BUILTIN_PATTERN = re.compile(r"efficientnet_small_b[0-7]|cifar_resnet\d+|wrn\d+_\d+")


def is_builtin(name: str) -> bool:
    """A built-in name (not timm's): no timm pretrained weights exist for it."""
    return bool(_BUILTIN_PATTERN.fullmatch(name))


def head_modules(net: nn.Module) -> list[str]:
    """The module names of a network's classifier head(s), e.g. ["fc"] or ["head.fc"]: what
    `get_classifier()` returns (timm's API; the built-ins have it too), found among its modules."""
    get = getattr(net, "get_classifier", None)
    heads = get() if callable(get) else None
    heads = heads if isinstance(heads, (tuple, list)) else [heads]
    ids = {id(h) for h in heads if isinstance(h, nn.Module)}
    return [n for n, m in net.named_modules() if n and id(m) in ids]


def is_known_model(name: str) -> bool:
    """A built-in name (its depth is checked when built) or a timm model name."""
    return bool(_BUILTIN_PATTERN.fullmatch(name)) or timm.is_model(name)


def unknown_model_message(name: str, key: str | None = None) -> str:
    """One line for a model name that is neither built in nor timm's: close matches only (none
    when nothing is close), and where the models are listed."""
    close = difflib.get_close_matches(name.lower(), BUILTIN_NAMES + timm.list_models(), n=3,
                                      cutoff=0.8)  # fmt: skip
    names = [repr(c) for c in close]
    names = ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else "".join(names)
    hint = f"did you mean {names}? " if close else ""
    where = f" (config key '{key}')" if key else ""
    return f"unknown model '{name}'{where}; {hint}the models are {MODELS_LISTED}"


class Classifier(nn.Module):
    """Normalisation + network. Input: (N, 3, H, W) in [0, 1] float, or uint8 in 0..255."""

    def __init__(self, net: nn.Module, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:  # float32, or the model's own dtype for a bf16 copy
            x = x.to(self.mean.dtype).div_(255.0)
        return self.net((x - self.mean) / self.std)


def create_model(
    name: str,
    num_classes: int,
    drop_rate: float | None = None,
    drop_path_rate: float | None = None,
    pretrained: bool = False,
) -> Classifier:
    """A built-in small-image model or any timm model by name (random init, nothing downloaded;
    `pretrained`: timm's own weights, its head re-made for `num_classes` by timm, timm models
    only). None for drop_rate/drop_path_rate keeps the model's own default."""
    net = _builtin(name, num_classes, drop_rate, drop_path_rate)
    if net is None:
        if not timm.is_model(name):
            raise UserError(unknown_model_message(name))
        kwargs = {"drop_rate": drop_rate, "drop_path_rate": drop_path_rate}
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        net = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    return Classifier(net)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_params(name: str, num_classes: int) -> int:
    """Parameter count without allocating weights (built on the meta device)."""
    with torch.device("meta"):
        return count_params(create_model(name, num_classes))


def check_student_sizes(names: list[str], num_classes: int, allow_smaller: bool) -> list[int]:
    """Paper: the student is equal-or-larger than its teacher. Refuse a smaller one unless allowed."""
    for i, n in enumerate(names):
        if not is_known_model(n):
            raise UserError(unknown_model_message(n, f"models[{i}]"))
    params = [model_params(n, num_classes) for n in names]
    for i in range(1, len(names)):
        if params[i] < params[i - 1] and not allow_smaller:
            raise UserError(
                f"student models[{i}] '{names[i]}' ({params[i]:,} params) is smaller than its teacher "
                f"'{names[i - 1]}' ({params[i - 1]:,}); use an equal-or-larger student or set "
                f"allow_smaller_student=true"
            )
    return params


def drop_path_rates(model: nn.Module) -> Iterator[float]:
    """The stochastic-depth rates of a model's DropPath layers, in block order (for tests)."""
    for m in model.modules():
        if isinstance(m, BasicBlock):
            yield m.drop_path.drop_prob if isinstance(m.drop_path, DropPath) else 0.0


# FixRes fine-tune (stages/finetune.py): which layers stay frozen
def shallow_modules(net: nn.Module, k: int) -> list[nn.Module]:
    """The stem plus the first k entries of `net.blocks` (residual blocks of the built-in
    models, stages of EfficientNet/timm models that have `.blocks`)."""
    if k <= 0:
        return []
    blocks = getattr(net, "blocks", None)
    if blocks is None:
        raise UserError(f"finetune.freeze_blocks={k} needs a model with `.blocks` "
                        f"({type(net).__name__} has none); set finetune.freeze_blocks=0")  # fmt: skip
    if k > len(blocks):
        raise UserError(f"finetune.freeze_blocks={k} but the model has {len(blocks)} blocks")
    stem = [
        m for name in ("stem", "conv_stem", "bn1") if (m := getattr(net, name, None)) is not None
    ]
    return stem + list(blocks)[:k]


def freeze(net: nn.Module, k: int) -> int:
    """Freeze the weights of the stem and the first k blocks; returns the frozen parameter count."""
    n = 0
    for m in shallow_modules(net, k):
        for p in m.parameters():
            p.requires_grad_(False)
            n += p.numel()
    return n


def key_differences(missing: list[str], unexpected: list[str], sizes: list[str],
                    tensors: dict, want: dict) -> str:  # fmt: skip
    """One line on how a file's tensors differ from a model's state dict: missing and unexpected
    key counts with the first few names, the first size mismatch with both shapes ("" if none).
    Used wherever weights from a file are refused (model files, pretrained weights)."""

    def first(keys: list[str]) -> str:
        more = f", ... ({len(keys) - 3} more)" if len(keys) > 3 else ""
        return ", ".join(keys[:3]) + more

    parts = []
    if missing:
        parts.append(f"{len(missing)} key(s) missing from the file ({first(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s) in the file ({first(unexpected)})")
    if sizes:
        k = sizes[0]
        parts.append(
            f"{len(sizes)} size mismatch(es), first '{k}': {list(tensors[k].shape)} in the file "
            f"vs {list(want[k].shape)} in the model"
        )
    return "; ".join(parts)
