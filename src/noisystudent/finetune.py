"""FixRes-style fine-tuning (paper sec. 3, "train-test resolution discrepancy"; Touvron et al.
2019): after training at a low resolution, fine-tune briefly at a higher one on UNAUGMENTED
labeled images with the shallow layers frozen (paper: 1.5 epochs). Frozen layers keep their
weights, but their BatchNorm statistics still adapt to the new resolution, which is FixRes's
point. Writes iter<i>/finetune/ (model.safetensors, model.json, eval.json, train/).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn as nn

from .augment import ViewDataset
from .config import Config, TrainConfig
from .engine import evaluate as run_eval
from .engine import resolve_device, train
from .errors import UserError
from .rundir import RunDir, read_json, write_json


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


def finetune_stage(cfg: Config, run: RunDir, i: int) -> dict[str, Any]:
    """Fine-tune model i at cfg.finetune.image_size -> iter<i>/finetune; returns its eval."""
    from .stages import _stage, load_data, load_model, model_meta, save_model

    ft = cfg.finetune
    name = _stage(i, "finetune")
    out = run.iter_dir(i) / "finetune"
    if run.stage_done(name):
        return read_json(out / "eval.json")
    if ft.image_size is None or ft.image_size <= cfg.data.image_size:
        raise UserError(
            f"finetune.image_size must be larger than data.image_size ({cfg.data.image_size})"
        )
    hi = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, image_size=ft.image_size))
    data = load_data(hi, run)
    model, _ = load_model(run, i, "model", cfg.models[i], data.classes)
    frozen = freeze(model.net, ft.freeze_blocks)
    run.mark(name, "running", inputs=[run.model_path(i)])
    tc = TrainConfig(epochs=ft.epochs, batch_size=ft.batch_size, lr=ft.lr, warmup_epochs=0.0,
                     weight_decay=cfg.student.weight_decay, randaugment=None)  # fmt: skip
    device = resolve_device(cfg.device)
    labeled = ViewDataset(data.labeled, data.size)  # unaugmented: the clean view at the new size
    res = train(model, labeled, torch.from_numpy(data.labeled.labels), tc, out / "train", run,
                tag=name, seed=cfg.seed, device=device, workers=cfg.data.num_workers,
                progress=cfg.progress, identity={"model": cfg.models[i], "size": ft.image_size})  # fmt: skip
    meta = {**model_meta(hi, i, data, model), "finetuned_from": str(run.model_path(i)),
            "frozen_params": frozen}  # fmt: skip
    save_model(out / "model.safetensors", model, meta)
    write_json(out / "model.json", meta)
    ev = run_eval(model, data.test, data.size, cfg.eval_batch_size, device, cfg.data.num_workers)
    write_json(out / "eval.json", ev)
    run.mark(name, "done", outputs=[out / "model.safetensors", out / "model.json", out / "eval.json"],
             wall_s=round(res.wall_s, 2))  # fmt: skip
    run.log(stage=name, event="eval", top1=ev["top1"], top5=ev["top5"], image_size=ft.image_size)
    return ev
