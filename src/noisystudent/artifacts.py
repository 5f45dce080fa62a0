"""What stages leave in a run directory for others to read: the model file and the small JSON
results (eval, selection counts, summary). Stages, the report, robustness, the CLI and the
benchmarks all read them through here; where each file lives is rundir/layout.py's business.

The model file is safetensors (no code can ride along) with noisystudent's identity in its
header (format, version, architecture, classes, image size), so a file is checked on its own
and tells how to feed it (files without the image size in it use model.json's); model.json
beside it describes the model for people and tools.
"""

from __future__ import annotations

import json
import time
from typing import Any

from . import __version__
from .errors import UserError
from .models import Classifier, count_params, create_model, key_differences
from .rundir import (
    ModelPaths,
    RunDir,
    load_tensors,
    read_json,
    save_tensors,
    sha256_file,
    tensors_metadata,
    write_json,
)

MODEL_FORMAT = "noisystudent-model"
MODEL_FORMAT_VERSION = "1"


def _minor(version: str) -> str:
    return ".".join(str(version).split(".")[:2])


def model_meta(name: str, iteration: int, classes: list[str], image_size: int, model: Classifier,
               drop_rate: float | None, drop_path_rate: float | None,
               pretrained: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """model.json's content. `pretrained`: what a warm-started teacher was initialised from
    (teacher.pretrained: source, tensors loaded, head keys re-initialised); absent otherwise."""
    meta = {
        "name": name,
        "iteration": iteration,
        "num_classes": len(classes),
        "classes": classes,
        "image_size": image_size,
        "params": count_params(model),
        "drop_rate": drop_rate,
        "drop_path_rate": drop_path_rate,
        "noisystudent_version": __version__,
    }
    if pretrained is not None:
        meta["pretrained"] = pretrained
    return meta


def save_model(paths: ModelPaths, model: Classifier, meta: dict[str, Any]) -> list:
    """Write the weights (identity in the safetensors header) and model.json; returns both paths."""
    header = {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "name": str(meta["name"]),
        "num_classes": str(meta["num_classes"]),
        "classes": json.dumps(meta["classes"]),
        "image_size": str(meta["image_size"]),
        "noisystudent_version": str(meta["noisystudent_version"]),
    }
    save_tensors(paths.model, model.state_dict(), meta=header)
    write_json(paths.model_meta, meta)
    return [paths.model, paths.model_meta]


def _missing_hint(i: int) -> str:
    what = "train-teacher" if i == 0 else f"train-student --iteration {i}"
    return f"run `noisystudent {what}` (or `noisystudent run`) first"


def load_model(run: RunDir, i: int, role: str = "teacher", expect_name: str | None = None,
               expect_classes: list[str] | None = None, paths: ModelPaths | None = None,
               ) -> tuple[Classifier, dict[str, Any]]:  # fmt: skip
    """Model i's final weights (or those at `paths`, e.g. its fine-tune). A missing file is an
    error, never a random model.

    Refused, with a message saying what differs: a file without noisystudent's header (foreign),
    one from another noisystudent minor version or model-file format, one whose architecture or
    classes differ from what the caller expects (`expect_name`, `expect_classes`), one that
    disagrees with its model.json, and one changed since its stage recorded its sha256 in the
    manifest."""
    p = run.it(i) if paths is None else paths
    path = p.model
    if not path.is_file() or not p.model_meta.is_file():
        raise UserError(f"no {role} checkpoint at '{path}'; {_missing_hint(i)}")
    meta = read_json(p.model_meta)
    head = _header(path)
    found = {"architecture": head.get("name"), "classes": json.loads(head.get("classes", "null"))}
    if "image_size" in head:  # files written before the header carried it: model.json's
        found["image_size"] = int(head["image_size"])
    mine = {"architecture": meta.get("name"), "classes": meta.get("classes"),
            "image_size": meta.get("image_size")}  # fmt: skip
    checks = [
        ("its model.json", mine),
        ("this run", {"architecture": expect_name, "classes": expect_classes}),
    ]
    for against, want in checks:
        diff = [f"{k} {found[k]!r} vs {want[k]!r}" for k in found
                if want.get(k) is not None and want[k] != found[k]]  # fmt: skip
        if diff:
            hint = "" if against == "this run" else " (files mixed up?)"
            raise UserError(
                f"{role} checkpoint '{path}' does not match {against}{hint}: {'; '.join(diff)}; "
                f"use the run directory it was made in, or retrain"
            )
    meta = {**meta, "image_size": found.get("image_size", meta.get("image_size"))}
    rec = run.manifest.output_record(path)
    if rec is not None and (
        path.stat().st_size != rec["size"] or sha256_file(path) != rec["sha256"]
    ):
        raise UserError(
            f"{role} checkpoint '{path}' changed after its training stage recorded it in the "
            f"manifest (sha256 differs); restore it or re-run that training stage"
        )
    model = create_model(meta["name"], len(found["classes"]))
    tensors = load_tensors(path)
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        raise UserError(
            f"checkpoint '{path}' does not fit model '{meta['name']}' with "
            f"{meta['num_classes']} classes: {_state_dict_differences(model, tensors, e)}; "
            f"use the run directory it was made in, or retrain"
        ) from None
    return model, meta


def _state_dict_differences(model: Classifier, tensors: dict, err: Exception) -> str:
    """What differs between a model and the tensors of a file, on one line: missing and
    unexpected key counts with the first few names, the first size mismatch with both shapes."""
    want = model.state_dict()
    missing = [k for k in want if k not in tensors]
    unexpected = [k for k in tensors if k not in want]
    sizes = [k for k in want if k in tensors and tuple(tensors[k].shape) != tuple(want[k].shape)]

    return key_differences(missing, unexpected, sizes, tensors, want) or " ".join(str(err).split())


def _header(path) -> dict[str, str]:
    """The model file's safetensors header, refused unless it is noisystudent's, this version's."""
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
    return head


# --------------------------------------------------------------------------------------------
# small results
def read_optional(path) -> dict[str, Any]:
    """A result file's content, {} while the stage that writes it has not run."""
    return read_json(path) if path.is_file() else {}


def read_model_meta(run: RunDir, i: int) -> dict[str, Any]:
    return read_optional(run.it(i).model_meta)


def read_eval(paths: ModelPaths) -> dict[str, Any]:
    """A model's eval.json (top1, top5, n, predictions, labels), {} if not evaluated yet."""
    return read_optional(paths.eval)


def read_counts(run: RunDir, i: int) -> dict[str, Any]:
    """iter<i>'s selection counts (which trained model i+1), {} before selection."""
    return read_optional(run.it(i).counts) if i >= 0 else {}


def read_summary(run: RunDir) -> dict[str, Any]:
    return read_optional(run.paths.summary)


def summary_rows(run: RunDir, models: list[str]) -> list[dict[str, Any]]:
    """One row per trained model, from what the run directory holds."""
    rows = []
    stages = run.manifest.read()["stages"]
    for i, name in enumerate(models):
        meta = read_model_meta(run, i)
        if not meta:
            break
        ev, counts = read_eval(run.it(i)), read_counts(run, i - 1) if i > 0 else {}
        row = {
            "iteration": i,
            "role": "teacher" if i == 0 else "student",
            "model": name,
            "params": meta["params"],
            "test_top1": ev.get("top1"),
            "test_top5": ev.get("top5"),
            "pseudo_label_acc": counts.get("pseudo_label_acc"),
            "passed_filter_fraction": counts.get("passed_filter_fraction"),
            "kept_unique_fraction": counts.get("kept_unique_fraction"),
            "wall_s": stages.get(run.it(i).stage("train"), {}).get("wall_s"),
        }
        if meta.get("pretrained"):  # a warm-started teacher: where its weights came from
            row["pretrained"] = meta["pretrained"]
        ft = read_eval(run.it(i).finetune)
        if ft:  # FixRes fine-tune at a higher resolution
            row["finetune_top1"] = ft.get("top1")
        rows.append(row)
    return rows


def write_summary(run: RunDir, models: list[str]) -> dict[str, Any]:
    """summary.json from what the run directory holds: one entry per trained model."""
    summary = {
        "run_dir": str(run.root),
        "iterations": summary_rows(run, models),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_json(run.paths.summary, summary)
    return summary
