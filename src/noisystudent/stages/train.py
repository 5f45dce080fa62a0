"""Train model i: the supervised teacher (i = 0) or the noised student (i >= 1)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..artifacts import load_model, model_meta, save_model
from ..augment import ViewDataset, batch_train_view, train_transform
from ..checkpoint import Checkpoint
from ..config import Config, TrainConfig
from ..engine import NonFinite, TrainData, train
from ..errors import UserError
from ..inputs import Data
from ..losses import pseudo_targets
from ..models import count_params, create_model
from ..rundir import RunDir, load_tensors, sha256_file
from ..runtime import Runtime
from ..store import PseudoLabelStore
from ..warmstart import describe, pretrained_teacher
from .select import require_pseudo_labels


def train_view(tc: TrainConfig, data: Data, hflip: bool):
    """The student's input noise, for labeled and pseudo-labeled images alike: (per-image
    transform, batch noise or None). "reference": per-image crop (large images) + RandAugment
    on the whole batch; "timm": timm's per-image PIL RandAugment."""
    if tc.randaugment_semantics == "reference":
        return batch_train_view(data.size, data.small, hflip, tc.randaugment)
    return train_transform(data.size, data.small, hflip, tc.randaugment), None


def selected_images(cfg: Config, run: RunDir, data: Data, i: int):
    """The pseudo-labeled images model i trains on (the selection of model i-1's labels):
    (their positions in the unlabeled set, their soft targets, the files they came from)."""
    prev = run.it(i - 1)
    if not run.stage_done(prev.stage("select")):
        raise UserError(
            f"no selected pseudo labels at '{prev.select_dir}'; run "
            f"`noisystudent select --iteration {i - 1}` first"
        )
    require_pseudo_labels(run, data, i - 1)
    store = PseudoLabelStore.load(prev.pseudo)
    made_for = store.meta.get("identity", {}).get("data_fingerprint")
    if made_for != data.fingerprints["unlabeled"]:
        raise UserError(
            f"the pseudo labels in '{prev.pseudo}' were made for other unlabeled images; the "
            f"unlabeled data changed since labeling - re-run pseudo-label"
        )
    rows = load_tensors(prev.selected)["rows"].long()
    p = cfg.pseudo
    targets = pseudo_targets(store.dense(rows), p.mode, p.retemper, p.label_smoothing)
    return store.index[rows].numpy(), targets, [prev.selected, prev.pseudo_meta]


def initial_weights(cfg: Config, run: RunDir, data: Data, i: int, model, log) -> list[Path]:
    """student.init: "auto" starts from the teacher's weights when it has the student's
    architecture (an equal-size iteration), else from scratch. Returns the files read."""
    init = cfg.student.init
    if init == "auto":
        init = "teacher" if cfg.models[i - 1] == cfg.models[i] else "scratch"
        log(event="init", init=init)
    if init != "teacher":
        return []
    teacher, tmeta = load_model(run, i - 1, "teacher", cfg.models[i - 1], data.classes)
    if tmeta["name"] != cfg.models[i]:
        raise UserError(
            f"student.init=teacher needs the same architecture, but teacher is "
            f"'{tmeta['name']}' and student '{cfg.models[i]}'"
        )
    model.load_state_dict(teacher.state_dict())
    return [run.it(i - 1).model]


def _retry_hint(cfg: Config, i: int, tc: TrainConfig) -> str:
    """How to train again with a smaller step: a run directory keeps the config its stages were
    made with (open_run), so the retry gets its own."""
    # a tenth of the rate, or the default recipe's when the rate was far above it
    default = TrainConfig().lr
    key, lr = ("teacher" if i == 0 else "student") + ".lr", f"{min(tc.lr / 10, default):g}"
    return (
        f"to retry with a lower learning rate, add `run_dir={cfg.run_dir}-lr{lr} {key}={lr}` "
        f"to the command (a new run directory: this one keeps the config it was started with)"
    )


def train_stage(cfg: Config, run: RunDir, data: Data, i: int, rt: Runtime) -> None:
    paths, name = run.it(i), run.it(i).stage("train")
    # the images it reads: the labeled set, and for a student the pseudo-labeled ones
    reads = data.read("labeled") if i == 0 else data.read("labeled", "unlabeled")
    if run.stage_done(name, reads):
        return
    log = run.logger(name)
    tc = cfg.teacher if i == 0 else cfg.student
    torch.manual_seed(cfg.seed * 1000 + i)  # the initial weights are a function of the seed
    inputs: list[Path] = []
    warm = None  # teacher.pretrained: what was loaded (model.json, summary, metrics)
    if i == 0 and tc.pretrained is not None:
        model, warm, inputs = pretrained_teacher(cfg.models[i], data.classes, tc.drop_rate,
                                                 tc.drop_path_rate, tc.pretrained)  # fmt: skip
        log(event="init", init="pretrained", **warm)
        if rt.is_main:
            print(f"[iter {i}] {describe(warm, len(data.classes))}")
    else:
        model = create_model(cfg.models[i], len(data.classes), tc.drop_rate, tc.drop_path_rate)
    aug, batch_aug = train_view(tc, data, cfg.data.hflip)
    unl_ds, targets = None, None
    if i > 0:
        idx, targets, inputs = selected_images(cfg, run, data, i)
        unl_ds = ViewDataset(data.unlabeled.subset(idx), data.size, aug)
        inputs += initial_weights(cfg, run, data, i, model, log)
    lab_ds = ViewDataset(data.labeled, data.size, aug)
    run.mark(name, "running", inputs=inputs)
    # the checkpoint belongs to these inputs: one made from other images or other pseudo labels
    # (the data, the teacher or the selection changed since) cannot be resumed: training restarts
    ident = {"model": cfg.models[i], "classes": data.classes,
             "inputs": {**{run.manifest.rel(p): sha256_file(p) for p in inputs}, **reads}}  # fmt: skip
    ckpt = Checkpoint(paths.checkpoint, ident, tc.checkpoint_every_steps, write=rt.is_main)
    if ckpt.discard_if_inputs_changed():
        log(event="restart", reason="inputs changed since the checkpoint")
        print(f"[iter {i}] inputs changed since the last checkpoint: training restarts")
    if rt.is_main:
        print(
            f"[iter {i}] training {'teacher' if i == 0 else 'student'} {cfg.models[i]} "
            f"({count_params(model):,} params) on {len(data.labeled)} labeled"
            + (f" + {len(unl_ds)} pseudo-labeled images" if unl_ds is not None else " images")
        )
    labels = torch.from_numpy(data.labeled.labels)
    td = TrainData(lab_ds, labels, unl_ds, targets, batch_aug, cfg.data.num_workers)
    try:
        res = train(model, td, tc, ckpt, log, rt, cfg.seed, name)
    except NonFinite as e:
        raise UserError(f"{e}; {_retry_hint(cfg, i, tc)}") from None
    if not rt.is_main:  # under torchrun rank 0 writes the model (all ranks hold the same)
        return
    if res.ema is not None:  # the EMA weights are the model: evaluated, and labeling as teacher
        model = res.ema
    meta = model_meta(cfg.models[i], i, data.classes, data.size, model, tc.drop_rate,
                      tc.drop_path_rate, pretrained=warm)  # fmt: skip
    outputs = save_model(paths, model, meta)
    log(event="done", wall_s=res.wall_s, final_loss=res.final_loss)
    run.mark(name, "done", outputs=outputs, data=reads, wall_s=round(res.wall_s, 2))
