"""The whole loop: teacher -> (pseudo-label -> select -> student) x iterations, with evaluation;
and the multi-stage commands built on the same stages (one stage, robustness).

Every stage talks to the others through files in the run directory and is skipped when the
manifest says it is done, so re-running the same command resumes where a run stopped. Under
torchrun (distributed.py) every rank runs these functions: training and pseudo-labeling are
shared by all ranks, everything else runs on rank 0 while the others wait at a barrier; only
rank 0 prints.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from . import distributed as dist
from .artifacts import read_model_meta, write_summary
from .config import Config
from .errors import UserError
from .inputs import Data, load_data
from .models import check_student_sizes, is_known_model, unknown_model_message
from .robustness.table import format_table as robustness_table
from .robustness.table import one_line
from .rundir import RunDir, open_run, read_json
from .runtime import Runtime, from_config
from .stages import (
    evaluate_stage,
    finetune_stage,
    pseudo_label_stage,
    robustness_stage,
    select_stage,
    train_stage,
)


def _say(rt: Runtime):
    return print if rt.is_main else (lambda *a, **k: None)


def open_data(cfg: Config, run: RunDir, rt: Runtime) -> Data:
    """The run's images on every rank: rank 0 fills the decode cache, the others then read it."""
    data = load_data(cfg, run) if rt.is_main else None
    dist.barrier()
    return data if data is not None else load_data(cfg, run)


def run_pipeline(cfg: Config) -> dict[str, Any]:
    """Run (or resume) every stage; returns summary.json's content ({} on ranks other than 0)."""
    check_model_names(cfg)
    rt = from_config(cfg)
    try:
        return _run_pipeline(cfg, rt)
    finally:
        dist.shutdown()


def _run_pipeline(cfg: Config, rt: Runtime) -> dict[str, Any]:
    run = open_run(cfg)
    data = open_data(cfg, run, rt)
    params = check_student_sizes(cfg.models, len(data.classes), cfg.allow_smaller_student)
    say = _say(rt)
    say(
        f"run directory: {run.root}  |  {len(data.labeled)} labeled, {len(data.unlabeled)} "
        f"unlabeled, {len(data.test)} test images, {len(data.classes)} classes"
    )
    say("models: " + " -> ".join(f"{m} ({p:,})" for m, p in zip(cfg.models, params, strict=True)))
    last = len(cfg.models) - 1
    for i in range(len(cfg.models)):
        train_stage(cfg, run, data, i, rt)  # every rank (DDP)
        dist.barrier()
        if rt.is_main:
            res = evaluate_stage(cfg, run, data, i, rt)
            say(
                f"[iter {i}] {cfg.models[i]}: test top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%"
            )
            if cfg.robustness.enabled:  # corruption / flip / adversarial robustness
                say(f"[iter {i}] robustness: {one_line(robustness_stage(cfg, run, data, i, rt))}")
        dist.barrier()
        if i < last:
            pseudo_label_stage(cfg, run, data, i, rt)  # every rank labels its own shards
            if rt.is_main:
                say(f"[iter {i}] pseudo labels: {selection_line(select_stage(cfg, run, data, i))}")
            dist.barrier()
        if rt.is_main:
            write_summary(run, cfg.models)
    if cfg.finetune.enabled and rt.is_main:  # FixRes-style, on the final model
        ev = finetune_stage(cfg, run, last, rt)
        say(
            f"[iter {last}] fine-tuned at {cfg.finetune.image_size} px: test top-1 {ev['top1']:.2f}%"
        )
    dist.barrier()
    if not rt.is_main:
        return {}
    summary = write_summary(run, cfg.models)
    print()
    print(format_table(summary))
    print(f"\nrun directory: {run.root}")
    write_run_report(cfg, run, data)
    return summary


def selection_line(counts: dict[str, Any]) -> str:
    acc = counts["pseudo_label_acc"]
    return (
        f"{counts['passed_filter']}/{counts['total']} passed the filter, "
        f"{counts['kept_unique']} unique images kept"
        + (f", accuracy {acc:.2f}%" if acc is not None else "")
        + f", {counts['selected_rows']} rows after balancing"
    )


def trained_line(run: RunDir, i: int) -> str:
    """What `train-teacher` / `train-student` made."""
    meta = read_model_meta(run, i)
    wall = run.manifest.entry(run.it(i).stage("train")).get("wall_s")
    return (
        f"[iter {i}] {meta['name']} ({meta['params']:,} params) trained"
        + (f" in {wall:.0f} s" if isinstance(wall, (int, float)) else "")
        + f": {run.it(i).model}; `noisystudent evaluate --iteration {i}` gives its test accuracy"
    )


def pseudo_line(run: RunDir, i: int) -> str:
    """What `pseudo-label` made: where, how many, and their accuracy where labels are known."""
    paths = run.it(i)
    n = read_json(paths.pseudo_meta)["count"]
    audit = read_json(paths.audit)
    acc = audit.get("accuracy")
    return f"[iter {i}] pseudo labels of {n:,} unlabeled images: {paths.pseudo}" + (
        f" (accuracy {acc:.2f}% on the {audit['audited']:,} with a known label)"
        if acc is not None
        else ""
    )


def check_model_names(cfg: Config) -> None:
    """Every entry of `models` is a known model, before anything is written: a typo in any of
    them is reported by every command, and leaves no run directory behind."""
    for k, name in enumerate(cfg.models):
        if not is_known_model(name):
            raise UserError(unknown_model_message(name, f"models[{k}]"))


def run_stage(cmd: str, cfg: Config, i: int) -> None:
    """One stage (`noisystudent train-teacher`, `pseudo-label`, ...). Under torchrun, training and
    pseudo-labeling use every rank; the other stages run on rank 0 only."""
    if not 0 <= i < len(cfg.models):
        raise UserError(f"--iteration {i} is outside models[0..{len(cfg.models) - 1}]")
    if cmd == "train-student" and i < 1:
        raise UserError("train-student needs --iteration >= 1 (iteration 0 is the teacher)")
    check_model_names(cfg)
    rt = from_config(cfg)
    try:
        run = open_run(cfg)
        data = open_data(cfg, run, rt)
        if cmd in ("select", "evaluate") and not rt.is_main:
            return
        if cmd in ("train-teacher", "train-student"):
            j = 0 if cmd == "train-teacher" else i
            train_stage(cfg, run, data, j, rt)
            if rt.is_main:
                print(trained_line(run, j))
        elif cmd == "pseudo-label":
            pseudo_label_stage(cfg, run, data, i, rt)
            if rt.is_main:
                print(pseudo_line(run, i))
        elif cmd == "select":
            print(f"[iter {i}] pseudo labels: {selection_line(select_stage(cfg, run, data, i))}")
        elif cmd == "evaluate":
            res = evaluate_stage(cfg, run, data, i, rt)
            print(f"{cfg.models[i]}: test top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%")
        if rt.is_main:
            write_summary(run, cfg.models)
    finally:
        dist.shutdown()


def run_robustness(cfg: Config, iterations: list[int] | None) -> list[dict[str, Any]]:
    """`noisystudent robustness`: evaluate the listed iterations of a run (default: every
    trained model); print the table."""
    from .stages.robustness import validate

    validate(cfg.robustness)  # before open_run saves the options into config.yaml
    for i in iterations or []:
        if not 0 <= i < len(cfg.models):
            raise UserError(f"--iteration {i} is outside models[0..{len(cfg.models) - 1}]")
    rt = from_config(cfg)
    run = open_run(cfg)
    if iterations is None:
        iterations = [i for i in range(len(cfg.models)) if run.it(i).model.is_file()]
        if not iterations:
            raise UserError(f"no trained model in '{cfg.run_dir}'; run `noisystudent run` first")
    data = load_data(cfg, run)
    results = [robustness_stage(cfg, run, data, i, rt) for i in iterations]
    print()
    print(robustness_table([(f"iter{r['iteration']} {r['model']}", r) for r in results]))
    for r in results:
        print(f"results: {run.it(r['iteration']).robustness_results}")
    return results


def format_table(summary: dict[str, Any]) -> str:
    """The end-of-run table: iteration, model, parameters, test top-1, pseudo-label accuracy,
    and the two selection shares (passed the confidence filter; unique images kept)."""

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}%"

    def frac(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    head = ("iter", "model", "params", "test top-1", "pseudo-label acc", "passed filter",
            "kept unique")  # fmt: skip
    rows = [
        (
            str(r["iteration"]),
            r["model"],
            f"{r['params']:,}",
            pct(r["test_top1"]),
            pct(r["pseudo_label_acc"]),
            frac(r.get("passed_filter_fraction")),
            frac(r.get("kept_unique_fraction")),
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


def write_run_report(cfg: Config, run: RunDir, data: Any = None) -> Path | None:
    """report.html for the run (report/). The results are on disk already, so a report that
    fails is a clear warning naming the command to retry, never an error that loses the run."""
    try:
        from .report import build_report  # matplotlib is imported only here

        rep = build_report(run.root, cfg, data)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else ""
        print(
            f"noisystudent: warning: the run report could not be written ({type(e).__name__}: "
            f"{msg}); the results are in {run.root}; retry with `noisystudent report {run.root}`",
            file=sys.stderr,
        )
        return None
    for problem in rep.problems:
        print(f"noisystudent: warning: report section {problem}", file=sys.stderr)
    print(f"report: {rep.path}")
    return rep.path
