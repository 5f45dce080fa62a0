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
from . import distributed as dist
from .augment import ViewDataset, batch_train_view, train_transform
from .config import Config
from .data import (
    SMALL_IMAGE_MAX,
    BadImage,
    BadImageLog,
    ImageSet,
    decode_to_array,
    digits_sets,
    load_set,
)
from .engine import evaluate as run_eval
from .engine import resolve_device, train
from .errors import UserError
from .labeling import collect_shards, data_fingerprint, label_shards
from .losses import pseudo_targets
from .models import Classifier, count_params, create_model
from .rundir import (
    RunDir,
    load_state,
    load_tensors,
    read_json,
    save_tensors,
    sha256_file,
    tensors_metadata,
    write_json,
)
from .selection import class_counts, reference_select_stream, select_pseudo_labels
from .store import PseudoLabelStore, default_topk, shard_ranges, store_files, write_meta


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


def _bad_log(cfg: Config, run: RunDir, s: ImageSet, what: str) -> BadImageLog:
    """The policy for unreadable images of one set: unlabeled per data.on_bad_image, labeled and
    test per data.on_bad_labeled; skipped ones listed in <run_dir>/skipped_<what>.txt."""
    d = cfg.data
    option = "data.on_bad_image" if what == "unlabeled" else "data.on_bad_labeled"
    skip = (d.on_bad_image if what == "unlabeled" else d.on_bad_labeled) == "skip"
    listing = run.root / f"skipped_{what}.txt"
    return BadImageLog(what, len(s), skip, d.max_bad_fraction, listing, option)


def load_data(cfg: Config, run: RunDir) -> Data:
    """Labeled, unlabeled and test sets as the config describes; small images (<= 64 px)
    are decoded once into a uint8 cache, larger ones read per access.

    Unreadable images (not an image, truncated, corrupt): in the unlabeled set skipped, counted
    and listed in skipped_unlabeled.txt (data.on_bad_image=skip, the default); in labeled or test
    data an error naming the file (data.on_bad_labeled=skip skips them too). Skipping more than
    data.max_bad_fraction of a set stops the run. Small images are all checked here; large ones
    when first read (a DataLoader worker marks the file, the main process applies the policy)."""
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
    sets = {"labeled": lab, "test": test, "unlabeled": unl}
    for what, s in list(sets.items()):
        log = _bad_log(cfg, run, s, what)
        if small:
            cache = Path(d.cache_dir) if d.cache_dir else run.root / "cache"
            try:
                s = decode_to_array(s, size, cache, what, skip_bad=log.skip, progress=cfg.progress)
            except BadImage as e:
                raise UserError(
                    f"{e} ({what} data); fix or remove the file, or set {log.option}=skip to "
                    f"skip unreadable images"
                ) from None
            for u in s.skipped:
                log.add(u, write=False, check=False)
            log.write()  # also removes a listing a fixed set no longer needs
            log.check()
            if s.skipped:
                print(
                    f"skipped {len(s.skipped)} unreadable {what} images (listed in {log.listing})"
                )
        else:
            log.preload(set(s.uids))  # found by a previous, interrupted process
        s.bad_log = log
        if len(s) == 0:
            raise UserError(f"no readable images in {what} data '{getattr(d, what)}'")
        sets[what] = s
    return Data(sets["labeled"], sets["unlabeled"], sets["test"], size, small)


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


MODEL_FORMAT = "noisystudent-model"
MODEL_FORMAT_VERSION = "1"


def _minor(version: str) -> str:
    return ".".join(str(version).split(".")[:2])


def save_model(path: Path, model: Classifier, meta: dict[str, Any]) -> Path:
    """Final weights as safetensors (no code can ride along), with the model's identity in the
    safetensors header so a file is checked on its own, without its model.json."""
    header = {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "name": str(meta["name"]),
        "num_classes": str(meta["num_classes"]),
        "classes": json.dumps(meta["classes"]),
        "noisystudent_version": str(meta["noisystudent_version"]),
    }
    return save_tensors(path, model.state_dict(), meta=header)


def load_model(
    run: RunDir,
    i: int,
    role: str = "teacher",
    expect_name: str | None = None,
    expect_classes: list[str] | None = None,
) -> tuple[Classifier, dict[str, Any]]:
    """Model i's final weights. A missing checkpoint is an error, never a random model.

    Weights load from safetensors only. Refused, with a message saying what differs: a file
    without noisystudent's header (foreign), one from another noisystudent minor version or
    model-file format, one whose architecture or classes differ from what the caller expects
    (`expect_name`, `expect_classes`), one that disagrees with its model.json, and one changed
    since its stage recorded its sha256 in the manifest."""
    path, meta_path = run.model_path(i), run.iter_dir(i) / "model.json"
    if not path.is_file() or not meta_path.is_file():
        what = "train-teacher" if i == 0 else f"train-student --iteration {i}"
        raise UserError(
            f"no {role} checkpoint at '{path}'; run `noisystudent {what}` (or `noisystudent run`) first"
        )
    meta = read_json(meta_path)
    head = tensors_metadata(path)
    if head.get("format") != MODEL_FORMAT:
        raise UserError(
            f"'{path}' is not a noisystudent model file (no noisystudent identity in its "
            f"safetensors header); models are made by `noisystudent run` / train-teacher"
        )
    if head.get("format_version") != MODEL_FORMAT_VERSION or _minor(
        head.get("noisystudent_version", "?")
    ) != _minor(__version__):
        raise UserError(
            f"'{path}' was written by noisystudent {head.get('noisystudent_version')} (model "
            f"format {head.get('format_version')}); this is noisystudent {__version__} (format "
            f"{MODEL_FORMAT_VERSION}); retrain it with this version"
        )
    found = {
        "architecture": head.get("name"),
        "classes": json.loads(head.get("classes", "null")),
    }
    checks = [
        ("its model.json", {"architecture": meta.get("name"), "classes": meta.get("classes")}),
        ("this run", {"architecture": expect_name, "classes": expect_classes}),
    ]
    for against, want in checks:
        diff = [
            f"{k} {found[k]!r} vs {want[k]!r}"
            for k in found
            if want[k] is not None and want[k] != found[k]
        ]
        if diff:
            hint = "" if against == "this run" else " (files mixed up?)"
            raise UserError(
                f"{role} checkpoint '{path}' does not match {against}{hint}: {'; '.join(diff)}; "
                f"use the run directory it was made in, or retrain"
            )
    rec = run.output_record(path)
    if rec is not None and (
        path.stat().st_size != rec["size"] or sha256_file(path) != rec["sha256"]
    ):
        raise UserError(
            f"{role} checkpoint '{path}' changed after its training stage recorded it in "
            f"manifest.json (sha256 differs); restore it or re-run that training stage"
        )
    model = create_model(meta["name"], len(found["classes"]))
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
    # the train view, for labeled and pseudo-labeled images alike: crop/flip + RandAugment
    if tc.randaugment_semantics == "reference":  # per-image crop (large images) + batch noise
        aug, batch_aug = batch_train_view(data.size, data.small, cfg.data.hflip, tc.randaugment)
    else:  # timm's per-image PIL RandAugment
        aug, batch_aug = (
            train_transform(data.size, data.small, cfg.data.hflip, tc.randaugment),
            None,
        )
    if i > 0:
        sel_dir = run.iter_dir(i - 1) / "select"
        if not run.stage_done(_stage(i - 1, "select")):
            raise UserError(
                f"no selected pseudo labels at '{sel_dir}'; run `noisystudent select --iteration {i - 1}` first"
            )
        store = PseudoLabelStore.load(run.iter_dir(i - 1) / "pseudo")
        rows = load_tensors(sel_dir / "selected.safetensors")["rows"].long()
        targets = pseudo_targets(store.dense(rows), cfg.pseudo.mode, cfg.pseudo.retemper,
                                 cfg.pseudo.label_smoothing)  # fmt: skip
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
            aug,
        )
        inputs = [sel_dir / "selected.safetensors", run.iter_dir(i - 1) / "pseudo" / "meta.json"]
        # "auto": from the teacher's weights when it has the student's architecture (an
        # equal-size iteration), else from scratch
        init = tc.init
        if init == "auto":
            init = "teacher" if cfg.models[i - 1] == cfg.models[i] else "scratch"
            run.log(stage=name, event="init", init=init)
        if init == "teacher":
            teacher, tmeta = load_model(run, i - 1, "teacher", cfg.models[i - 1], data.classes)
            if tmeta["name"] != cfg.models[i]:
                raise UserError(
                    f"student.init=teacher needs the same architecture, but teacher is '{tmeta['name']}' and student '{cfg.models[i]}'"
                )
            model.load_state_dict(teacher.state_dict())
            inputs.append(run.model_path(i - 1))
    lab_ds = ViewDataset(data.labeled, data.size, aug)
    run.mark(name, "running", inputs=inputs)
    # The checkpoint belongs to these inputs: one made from other pseudo labels (the teacher or
    # the selection was re-run since) cannot be resumed, so training restarts.
    ident = {
        "model": cfg.models[i],
        "classes": data.classes,
        "inputs": {run._rel(p): sha256_file(p) for p in inputs},
    }
    ckpt = out / "train" / "checkpoint.pt"
    if ckpt.is_file() and load_state(ckpt).get("identity", {}).get("inputs") != ident["inputs"]:
        ckpt.unlink()
        run.log(stage=name, event="restart", reason="inputs changed since the checkpoint")
        print(f"[iter {i}] inputs changed since the last checkpoint: training restarts")
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
        identity=ident,
        batch_aug=batch_aug,
    )
    if not dist.is_main():  # under torchrun rank 0 writes the model (all ranks hold the same)
        return
    if res.ema is not None:  # the EMA weights are the model: evaluated, and labeling as teacher
        model = res.ema
    meta = model_meta(cfg, i, data, model)
    save_model(run.model_path(i), model, meta)
    write_json(out / "model.json", meta)
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
    model, _ = load_model(run, i, "model", cfg.models[i], data.classes)
    run.mark(name, "running")
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
    """Model i, without noise, labels every unlabeled image -> iter<i>/pseudo (store.py format).

    Sharded (labeling.py): fixed row ranges of cfg.pseudo.shard_size images, one shard file each;
    under torchrun every rank labels its own shards. A killed stage re-labels only the shards
    that are missing; shards from another teacher or other data are refused."""
    name = _stage(i, "pseudo-label")
    root = run.iter_dir(i) / "pseudo"
    if run.stage_done(name):
        return
    model, meta = load_model(run, i, "teacher", cfg.models[i], data.classes)
    run.mark(name, "running")
    c = len(data.classes)
    k = default_topk(c, cfg.pseudo.topk)
    n = len(data.unlabeled)
    ident = {
        "teacher_sha256": sha256_file(run.model_path(i)),
        "data_fingerprint": data_fingerprint(data.unlabeled),
        "k": str(k),
        "temperature": str(cfg.pseudo.temperature),
    }
    if dist.is_main():
        (root / "meta.json").unlink(missing_ok=True)
    dist.barrier()
    written = label_shards(model, data.unlabeled, data.size, root, c, k, cfg.pseudo.temperature,
                           ident, cfg.pseudo.shard_size, cfg.pseudo.batch_size, _device(cfg),
                           dist.rank(), dist.world_size(), cfg.data.num_workers, cfg.progress)  # fmt: skip
    n_shards = len(shard_ranges(n, cfg.pseudo.shard_size))
    if len(written) < len(range(dist.rank(), n_shards, dist.world_size())):
        run.log(stage=name, event="resume", relabeled_shards=written)
    dist.barrier()
    if not dist.is_main():
        return
    shards = collect_shards(root, n, cfg.pseudo.shard_size, ident)
    write_meta(root, c, k, cfg.pseudo.temperature,
               {"model": meta["name"], "iteration": i, "mode": cfg.pseudo.mode}, shards, ident)  # fmt: skip
    store = PseudoLabelStore.load(root, expect=ident)
    hidden = _hidden_labels(data, store.uids)
    known = hidden >= 0
    correct = int((store.pred[known] == hidden[known]).sum())
    audited = int(known.sum())
    audit = {"audited": audited, "accuracy": 100.0 * correct / audited if audited else None}
    write_json(root / "audit.json", audit)
    files = store_files(root, shards) + [root / "audit.json"]
    run.mark(name, "done", inputs=[run.model_path(i)], outputs=files)
    run.log(stage=name, event="pseudo-label", count=len(store), audit_acc=audit["accuracy"])


def _hidden_labels(data: Data, uids: list[str]) -> torch.Tensor:
    """Hidden labels of unlabeled images by uid (-1 where unknown), for auditing only."""
    label = dict(zip(data.unlabeled.uids, data.unlabeled.labels.tolist(), strict=True))
    return torch.tensor([label.get(u, -1) for u in uids], dtype=torch.long)


def select_stage(cfg: Config, run: RunDir, data: Data, i: int) -> dict[str, Any]:
    """Filter model i's pseudo labels by confidence and balance classes -> iter<i>/select."""
    name = _stage(i, "select")
    out = run.iter_dir(i) / "select"
    if run.stage_done(name):
        return read_json(out / "counts.json")
    store = PseudoLabelStore.load(run.iter_dir(i) / "pseudo")
    c = store.num_classes
    run.mark(name, "running")
    pred, conf = store.pred, store.max_prob
    s = cfg.select
    kept = conf >= s.threshold
    if s.mode == "reference":
        # two streaming passes over the store (histogram, then selection): bounded memory
        def chunks():
            return ((a, ch["max_prob"], ch["pred"]) for a, ch in store.iter_chunks())

        rows = torch.cat(list(reference_select_stream(chunks, c, s.per_class, s.threshold,
                                                      s.upsample, s.use_all, seed=cfg.seed + i)))  # fmt: skip
    else:
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
        fj = run.iter_dir(i) / "finetune" / "eval.json"
        if fj.is_file():  # FixRes fine-tune at a higher resolution
            rows[-1]["finetune_top1"] = json.loads(fj.read_text()).get("top1")
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
