"""`noisystudent evaluate RUN_DIR --test-dir FOLDER`: a trained model on any labeled set with the
run's classes (class folders, or an index file), with its confusion matrix.

Read-only with respect to the run: no lock, no check of the command's config against the saved
one (the set is not the run's data.test, which is the point), nothing recorded in the manifest,
the metrics log or the run's own eval.json. The results go to their own file, iter<i>/
eval_<set>.json (rundir/layout.py), <set> being the folder's name made file-name safe. Images
are read with the run's evaluation view and evaluated with its precision and compile policy
(engine.evaluate), so the run's own test folder given here reproduces its eval.json.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from .data import BadImageLog, load_set, uid_strings
from .engine import evaluate
from .errors import UserError
from .export import load_trained
from .rundir import write_json
from .runtime import from_config

WHAT = "--test-dir"


def set_name(folder: Path) -> str:
    """A file-name-safe word for the set: the folder's name (an index file's stem)."""
    p = Path(folder).resolve()
    base = p.stem if p.is_file() else p.name
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", base).strip("._-") or "set"


def confusion(labels: np.ndarray, preds: np.ndarray, n: int) -> np.ndarray:
    """Counts (n, n): rows the true class, columns the predicted one; unread images (-1) out."""
    y, yhat = np.asarray(labels, np.int64), np.asarray(preds, np.int64)
    known = (y >= 0) & (yhat >= 0)
    cm = np.zeros((n, n), dtype=np.int64)
    np.add.at(cm, (y[known], yhat[known]), 1)
    return cm


def _classes_differ(spec: Path, found: list[str], want: list[str]) -> str:
    only_set = sorted(set(found) - set(want))
    only_model = sorted(set(want) - set(found))

    def short(xs: list[str], k: int = 20) -> str:
        return str(xs[:k])[:-1] + (f", ... ({len(xs) - k} more)]" if len(xs) > k else "]")

    if not only_set and not only_model:
        return (
            f"{WHAT} '{spec}' lists the model's classes in another order ({short(found)} vs "
            f"{short(want)}); give its classes in the model's order"
        )
    return (
        f"{WHAT} '{spec}' has other classes than the model: {len(found)} classes {short(found)} "
        f"vs the model's {len(want)} {short(want)} (only in the folder: {short(only_set)}, only "
        f"in the model: {short(only_model)}); give one sub-folder per class of the run"
    )


def evaluate_set(config: str, overrides: list[str] | None, iteration: int | None,
                 folder: str | Path) -> dict[str, Any]:  # fmt: skip
    """Evaluate model `iteration` (default: the last trained) of a run on `folder`; write
    iter<i>/eval_<set>.json and print one line. Returns what was written."""
    t = load_trained(config, overrides, iteration)
    spec = Path(folder)
    if not spec.exists():
        raise UserError(
            f"{WHAT} '{spec}' does not exist; give a folder with one sub-folder of images per "
            f"class (or an index file)"
        )
    s = load_set(spec, WHAT)
    classes = list(t.meta["classes"])
    if s.classes != classes:
        raise UserError(_classes_differ(spec, s.classes, classes))
    unknown = np.flatnonzero(s.labels < 0)
    if len(unknown):
        raise UserError(
            f"{WHAT} index '{spec}' has {len(unknown)} rows whose class is not in its '# "
            f"classes:' line (first: '{s.uids[int(unknown[0])]}'); fix the index"
        )
    d = t.cfg.data
    s.max_pixels = d.max_image_pixels
    # unreadable images: the policy of the run's labeled and test data; no listing file is
    # written into the run, the skipped ones are in the results instead
    s.bad_log = BadImageLog(WHAT, len(s), d.on_bad_labeled == "skip", d.max_bad_fraction,
                            None, "data.on_bad_labeled")  # fmt: skip
    rt = from_config(t.cfg)
    size = int(t.meta["image_size"])
    res = evaluate(t.model, s, size, t.cfg.eval_batch_size, rt, d.num_workers)
    cm = confusion(np.asarray(res["labels"]), np.asarray(res["predictions"]), len(classes))
    rows = cm.sum(1)
    out = {
        "test_dir": str(spec.resolve()),
        "iteration": t.i,
        "model": t.meta["name"],
        "image_size": size,
        "top1": res["top1"],
        "top5": res["top5"],
        "n": res["n"],
        "skipped": list(s.bad_log.uids),
        "classes": classes,
        "confusion": {
            "rows": "true class",
            "columns": "predicted class",
            "order": "classes",
            "counts": cm.tolist(),
        },
        "per_class_top1": {
            c: (100.0 * int(cm[k, k]) / int(rows[k]) if rows[k] else None)
            for k, c in enumerate(classes)
        },
        "uids": list(uid_strings(s)),
        "predictions": res["predictions"],
        "labels": res["labels"],
    }
    path = t.run.it(t.i).eval_on(set_name(spec))
    write_json(path, out)
    skipped = f", {len(out['skipped'])} unreadable skipped" if out["skipped"] else ""
    print(
        f"[iter {t.i}] {t.meta['name']} on {spec}: top-1 {res['top1']:.2f}%  top-5 "
        f"{res['top5']:.2f}%  ({res['n']} images{skipped}); results: {path}"
    )
    return out
