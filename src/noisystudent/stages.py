"""The pipeline's stages. Each reads its inputs from, and writes its outputs into, the run
directory, records itself in the manifest, and returns quickly when already done.

Iteration i trains model i: i = 0 is the first teacher (labeled data only), i >= 1 a student
trained on labeled data plus the pseudo labels model i-1 made (iter<i-1>/select).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .augment import ViewDataset, train_transform
from .config import Config
from .data import SMALL_IMAGE_MAX, ImageSet, decode_to_array, digits_sets, load_set
from .engine import evaluate as run_eval
from .engine import predict, resolve_device, train
from .errors import UserError
from .losses import hard_labels
from .models import Classifier, count_params, create_model
from .rundir import RunDir, load_tensors, read_json, save_tensors, write_json, write_text
from .selection import class_counts, select_pseudo_labels
from .store import PseudoLabelStore, StoreWriter, default_topk


# --------------------------------------------------------------------------------------------
# data
@dataclass
class Data:
    labeled: ImageSet
    unlabeled: ImageSet
    test: ImageSet
    size: int
    small: bool

    @property
    def classes(self) -> list[str]:
        return self.labeled.classes


def load_data(cfg: Config, run: RunDir) -> Data:
    """Labeled, unlabeled and test sets as the config describes; small images (<= 64 px)
    are decoded once into a uint8 cache."""
    d, size = cfg.data, cfg.data.image_size
    if d.dataset == "digits":
        lab, unl, test = digits_sets(size, d.labels_per_class, seed=cfg.seed)
        return Data(lab, unl, test, size, small=True)
    for key in ("labeled", "unlabeled", "test"):
        if getattr(d, key) is None:
            raise UserError(
                f"config key 'data.{key}' is not set; give a folder (or data.dataset=digits)"
            )
    lab = load_set(d.labeled, "labeled")
    test = load_set(d.test, "test")
    if test.classes != lab.classes:
        only_l = sorted(set(lab.classes) - set(test.classes))
        only_t = sorted(set(test.classes) - set(lab.classes))
        raise UserError(
            f"test classes differ from labeled classes (only in labeled: {only_l}, only in "
            f"test: {only_t}); data.test must have the same class folders as data.labeled"
        )
    unl = load_set(d.unlabeled, "unlabeled", lab.classes)
    small = size <= SMALL_IMAGE_MAX
    if small:
        cache = Path(d.cache_dir) if d.cache_dir else run.root / "cache"
        lab = decode_to_array(lab, size, cache, "labeled", skip_bad=False, progress=cfg.progress)
        test = decode_to_array(test, size, cache, "test", skip_bad=False, progress=cfg.progress)
        unl = decode_to_array(
            unl, size, cache, "unlabeled", skip_bad=d.on_bad_image == "skip", progress=cfg.progress
        )
        if unl.skipped:
            write_text(run.root / "skipped_unlabeled.txt", "\n".join(unl.skipped) + "\n")
            print(
                f"skipped {len(unl.skipped)} unreadable unlabeled images (listed in "
                f"{run.root / 'skipped_unlabeled.txt'})"
            )
        if len(unl) == 0:
            raise UserError(f"no readable images in unlabeled data '{d.unlabeled}'")
    return Data(lab, unl, test, size, small)


# --------------------------------------------------------------------------------------------
# models on disk
def model_meta(cfg: Config, i: int, data: Data, model: Classifier) -> dict[str, Any]:
    tc = cfg.teacher if i == 0 else cfg.student
    return {
        "name": cfg.models[i],
        "iteration": i,
        "num_classes": len(data.classes),
        "classes": data.classes,
        "image_size": data.size,
        "params": count_params(model),
        "drop_rate": tc.drop_rate,
        "drop_path_rate": tc.drop_path_rate,
        "noisystudent_version": __version__,
    }


def load_model(run: RunDir, i: int, role: str = "teacher") -> tuple[Classifier, dict[str, Any]]:
    """Model i's final weights. A missing checkpoint is an error, never a random model."""
    path, meta_path = run.model_path(i), run.iter_dir(i) / "model.json"
    if not path.is_file() or not meta_path.is_file():
        what = "train-teacher" if i == 0 else f"train-student --iteration {i}"
        raise UserError(
            f"no {role} checkpoint at '{path}'; run `noisystudent {what}` (or `noisystudent run`) first"
        )
    meta = read_json(meta_path)
    model = create_model(meta["name"], meta["num_classes"])
    try:
        model.load_state_dict(load_tensors(path))
    except RuntimeError as e:
        raise UserError(
            f"checkpoint '{path}' does not fit model '{meta['name']}' with {meta['num_classes']} classes: {str(e).splitlines()[0]}"
        ) from None
    return model, meta


def _device(cfg: Config) -> torch.device:
    return resolve_device(cfg.device)


def _stage(i: int, what: str) -> str:
    return f"iter{i}/{what}"


# --------------------------------------------------------------------------------------------
# stages
def train_stage(cfg: Config, run: RunDir, data: Data, i: int) -> None:
    """Train model i: the supervised teacher (i = 0) or the noised student (i >= 1)."""
    name = _stage(i, "train")
    if run.stage_done(name):
        return
    tc = cfg.teacher if i == 0 else cfg.student
    num_classes = len(data.classes)
    torch.manual_seed(cfg.seed * 1000 + i)  # the initial weights are a function of the seed
    model = create_model(cfg.models[i], num_classes, tc.drop_rate, tc.drop_path_rate)
    out = run.iter_dir(i)
    inputs: list[Path] = []
    unl_ds, targets = None, None
    if i > 0:
        sel_dir = run.iter_dir(i - 1) / "select"
        if not (sel_dir / "selected.safetensors").is_file():
            raise UserError(
                f"no selected pseudo labels at '{sel_dir}'; run `noisystudent select --iteration {i - 1}` first"
            )
        store = PseudoLabelStore.load(run.iter_dir(i - 1) / "pseudo")
        rows = load_tensors(sel_dir / "selected.safetensors")["rows"].long()
        targets = store.dense(rows)
        if cfg.pseudo.mode == "hard":
            targets = hard_labels(targets)
        pos = {u: k for k, u in enumerate(data.unlabeled.uids)}
        try:
            img_idx = np.asarray([pos[store.uids[r]] for r in rows.tolist()], dtype=np.int64)
        except KeyError as e:
            raise UserError(
                f"pseudo label for {e} has no image in the unlabeled set; the unlabeled data changed since labeling - re-run pseudo-label"
            ) from None
        unl_ds = ViewDataset(
            data.unlabeled.subset(img_idx),
            data.size,
            train_transform(data.size, data.small, cfg.data.hflip, tc.randaugment),
        )
        inputs = [sel_dir / "selected.safetensors", run.iter_dir(i - 1) / "pseudo" / "meta.json"]
        if tc.init == "teacher":
            teacher, tmeta = load_model(run, i - 1)
            if tmeta["name"] != cfg.models[i]:
                raise UserError(
                    f"student.init=teacher needs the same architecture, but teacher is '{tmeta['name']}' and student '{cfg.models[i]}'"
                )
            model.load_state_dict(teacher.state_dict())
            inputs.append(run.model_path(i - 1))
    lab_ds = ViewDataset(
        data.labeled,
        data.size,
        train_transform(data.size, data.small, cfg.data.hflip, tc.randaugment),
    )
    run.mark(name, "running", inputs=inputs)
    print(
        f"[iter {i}] training {'teacher' if i == 0 else 'student'} {cfg.models[i]} "
        f"({count_params(model):,} params) on {len(data.labeled)} labeled"
        + (f" + {len(unl_ds)} pseudo-labeled images" if unl_ds is not None else " images")
    )
    res = train(
        model,
        lab_ds,
        torch.from_numpy(data.labeled.labels),
        tc,
        out / "train",
        run,
        tag=name,
        seed=cfg.seed,
        device=_device(cfg),
        unlabeled=unl_ds,
        targets=targets,
        workers=cfg.data.num_workers,
        progress=cfg.progress,
    )
    save_tensors(run.model_path(i), model.state_dict())
    write_json(out / "model.json", model_meta(cfg, i, data, model))
    run.mark(
        name, "done", outputs=[run.model_path(i), out / "model.json"], wall_s=round(res.wall_s, 2)
    )
    run.log(stage=name, event="done", wall_s=res.wall_s, final_loss=res.final_loss)


def evaluate_stage(cfg: Config, run: RunDir, data: Data, i: int) -> dict[str, Any]:
    """Top-1/top-5 of model i on the test set -> iter<i>/eval.json."""
    name = _stage(i, "evaluate")
    path = run.iter_dir(i) / "eval.json"
    if run.stage_done(name):
        return read_json(path)
    model, _ = load_model(run, i, role="model")
    res = run_eval(
        model,
        data.test,
        data.size,
        cfg.eval_batch_size,
        _device(cfg),
        cfg.data.num_workers,
        cfg.progress,
    )
    write_json(path, res)
    run.mark(name, "done", inputs=[run.model_path(i)], outputs=[path])
    run.log(stage=name, event="eval", top1=res["top1"], top5=res["top5"])
    return res


def pseudo_label_stage(cfg: Config, run: RunDir, data: Data, i: int) -> None:
    """Model i, without noise, labels every unlabeled image -> iter<i>/pseudo (store.py format)."""
    name = _stage(i, "pseudo-label")
    root = run.iter_dir(i) / "pseudo"
    if run.stage_done(name):
        return
    model, meta = load_model(run, i)
    if meta["num_classes"] != len(data.classes):
        raise UserError(
            f"teacher '{run.model_path(i)}' has {meta['num_classes']} classes, the data {len(data.classes)}"
        )
    k = default_topk(len(data.classes), cfg.pseudo.topk)
    writer = StoreWriter(
        root,
        len(data.classes),
        k,
        cfg.pseudo.temperature,
        teacher={"model": meta["name"], "iteration": i, "mode": cfg.pseudo.mode},
    )
    ds = ViewDataset(data.unlabeled, data.size)  # clean eval view: no augmentation
    hidden = torch.from_numpy(data.unlabeled.labels)
    correct = audited = 0
    for logits, idx in predict(
        model,
        ds,
        cfg.pseudo.batch_size,
        _device(cfg),
        cfg.data.num_workers,
        cfg.progress,
        f"pseudo-label iter{i}",
    ):
        probs = torch.softmax(logits / cfg.pseudo.temperature, dim=1)
        writer.add(probs, [data.unlabeled.uids[j] for j in idx.tolist()])
        h = hidden[idx]
        known = h >= 0
        correct += (probs.argmax(1)[known] == h[known]).sum().item()
        audited += int(known.sum())
    writer.close()
    audit = {"audited": audited, "accuracy": 100.0 * correct / audited if audited else None}
    write_json(root / "audit.json", audit)
    run.mark(
        name, "done", inputs=[run.model_path(i)], outputs=writer.files() + [root / "audit.json"]
    )
    run.log(stage=name, event="pseudo-label", count=len(ds), audit_acc=audit["accuracy"])


def select_stage(cfg: Config, run: RunDir, data: Data, i: int) -> dict[str, Any]:
    """Filter model i's pseudo labels by confidence and balance classes -> iter<i>/select."""
    name = _stage(i, "select")
    out = run.iter_dir(i) / "select"
    if run.stage_done(name):
        return read_json(out / "counts.json")
    store = PseudoLabelStore.load(run.iter_dir(i) / "pseudo")
    c = store.num_classes
    pred, conf = store.pred, store.max_prob
    s = cfg.select
    kept = conf >= s.threshold
    rows = select_pseudo_labels(
        conf, pred, c, s.threshold, s.balance, s.per_class, seed=cfg.seed + i
    )
    if len(rows) == 0:
        raise UserError(
            f"no pseudo label reaches select.threshold={s.threshold} (max confidence "
            f"{conf.max().item() if len(conf) else 0:.3f}); lower the threshold"
        )
    uniq = torch.unique(rows)
    # audit against hidden labels, where the unlabeled images have them
    pos = {u: k for k, u in enumerate(data.unlabeled.uids)}
    hidden = torch.tensor(
        [
            data.unlabeled.labels[pos[store.uids[r]]] if store.uids[r] in pos else -1
            for r in uniq.tolist()
        ],
        dtype=torch.long,
    )
    known = hidden >= 0
    acc = (
        100.0 * (pred[uniq][known] == hidden[known]).float().mean().item() if known.any() else None
    )
    counts = {
        "classes": data.classes,
        "before": class_counts(pred, c).tolist(),
        "after_filter": class_counts(pred[kept], c).tolist(),
        "after": class_counts(pred[rows], c).tolist(),
        "total": len(store.uids),
        "kept_unique": len(uniq),
        "selected_rows": len(rows),
        "kept_fraction": len(uniq) / max(1, len(store.uids)),
        "pseudo_label_acc": acc,
        "threshold": s.threshold,
        "balance": s.balance,
    }
    save_tensors(out / "selected.safetensors", {"rows": rows})
    write_json(out / "counts.json", counts)
    run.mark(
        name,
        "done",
        inputs=[run.iter_dir(i) / "pseudo" / "meta.json"],
        outputs=[out / "selected.safetensors", out / "counts.json"],
    )
    run.log(stage=name, event="select", kept_fraction=counts["kept_fraction"], pseudo_label_acc=acc)
    return counts


# --------------------------------------------------------------------------------------------
# summary
def write_summary(cfg: Config, run: RunDir) -> dict[str, Any]:
    """summary.json from what the run directory holds: one entry per trained model."""
    rows = []
    stages = run.manifest()["stages"]
    for i, name in enumerate(cfg.models):
        mj, ej = run.iter_dir(i) / "model.json", run.iter_dir(i) / "eval.json"
        if not mj.is_file():
            break
        meta = json.loads(mj.read_text())
        ev = json.loads(ej.read_text()) if ej.is_file() else {}
        sel = run.iter_dir(i - 1) / "select" / "counts.json"
        counts = json.loads(sel.read_text()) if i > 0 and sel.is_file() else {}
        rows.append(
            {
                "iteration": i,
                "role": "teacher" if i == 0 else "student",
                "model": name,
                "params": meta["params"],
                "test_top1": ev.get("top1"),
                "test_top5": ev.get("top5"),
                "pseudo_label_acc": counts.get("pseudo_label_acc"),
                "kept_fraction": counts.get("kept_fraction"),
                "wall_s": stages.get(_stage(i, "train"), {}).get("wall_s"),
            }
        )
    summary = {
        "run_dir": str(run.root),
        "iterations": rows,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_json(run.root / "summary.json", summary)
    return summary


def format_table(summary: dict[str, Any]) -> str:
    """The end-of-run table: iteration, model, parameters, test top-1, pseudo-label acc, kept."""

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}%"

    head = ("iter", "model", "params", "test top-1", "pseudo-label acc", "kept fraction")
    rows = [
        (
            str(r["iteration"]),
            r["model"],
            f"{r['params']:,}",
            pct(r["test_top1"]),
            pct(r["pseudo_label_acc"]),
            "-" if r["kept_fraction"] is None else f"{r['kept_fraction']:.3f}",
        )
        for r in summary["iterations"]
    ]
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=False)]

    def fmt(cells):
        return "  ".join(
            c.ljust(w) if j == 1 else c.rjust(w)
            for j, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([fmt(head)] + [fmt(r) for r in rows])
