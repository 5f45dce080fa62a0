"""FixRes-style fine-tuning of model i (paper sec. 3, "train-test resolution discrepancy";
Touvron et al. 2019): after training at a low resolution, fine-tune briefly at a higher one on
UNAUGMENTED labeled images with the shallow layers frozen (paper: 1.5 epochs). Frozen layers
keep their weights, but their BatchNorm statistics still adapt to the new resolution, which is
FixRes's point. Writes iter<i>/finetune/ (its own model, model.json, eval and train state)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..artifacts import load_model, model_meta, read_eval, save_model
from ..augment import ViewDataset
from ..checkpoint import Checkpoint
from ..config import Config, TrainConfig
from ..engine import TrainData, evaluate, train
from ..errors import UserError
from ..inputs import load_data
from ..models import freeze
from ..rundir import RunDir, write_json
from ..runtime import Runtime


def finetune_stage(cfg: Config, run: RunDir, i: int, rt: Runtime) -> dict[str, Any]:
    """Fine-tune model i at cfg.finetune.image_size; returns its eval."""
    ft, src = cfg.finetune, run.it(i)
    out, name = src.finetune, src.stage("finetune")
    if ft.image_size is None or ft.image_size <= cfg.data.image_size:
        raise UserError(
            f"finetune.image_size must be larger than data.image_size ({cfg.data.image_size})"
        )
    hi = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, image_size=ft.image_size))
    data = load_data(hi, run)  # decoded once at the new size (cached), also on a resume
    reads = data.read("labeled", "test")
    if run.stage_done(name, reads):
        return read_eval(out)
    model, _ = load_model(run, i, "model", cfg.models[i], data.classes)
    frozen = freeze(model.net, ft.freeze_blocks)
    run.mark(name, "running", inputs=[src.model])
    tc = TrainConfig(epochs=ft.epochs, batch_size=ft.batch_size, lr=ft.lr, warmup_epochs=0.0,
                     weight_decay=cfg.student.weight_decay, randaugment=None)  # fmt: skip
    labeled = ViewDataset(data.labeled, data.size)  # unaugmented: the clean view at the new size
    ident = {"model": cfg.models[i], "size": ft.image_size, "inputs": reads}
    ckpt = Checkpoint(out.checkpoint, ident, tc.checkpoint_every_steps, write=rt.is_main)
    if rt.is_main and ckpt.discard_if_inputs_changed():
        run.log(stage=name, event="restart", reason="images changed since the checkpoint")
    td = TrainData(labeled, torch.from_numpy(data.labeled.labels), workers=cfg.data.num_workers)
    res = train(model, td, tc, ckpt, run.logger(name), rt, cfg.seed, name)
    tcs = cfg.student if i > 0 else cfg.teacher
    meta = model_meta(cfg.models[i], i, data.classes, data.size, model, tcs.drop_rate,
                      tcs.drop_path_rate)  # fmt: skip
    meta.update(finetuned_from=str(src.model), frozen_params=frozen)
    outputs = save_model(out, model, meta)
    ev = evaluate(model, data.test, data.size, cfg.eval_batch_size, rt, cfg.data.num_workers)
    write_json(out.eval, ev)
    run.log(stage=name, event="eval", top1=ev["top1"], top5=ev["top5"], image_size=ft.image_size)
    run.mark(name, "done", outputs=outputs + [out.eval], data=reads, wall_s=round(res.wall_s, 2))
    return ev
