"""The whole loop: teacher -> (pseudo-label -> select -> student) x iterations, with evaluation.

Every stage talks to the others through files in the run directory and is skipped when the
manifest says it is done, so re-running the same command resumes where a run stopped.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from . import distributed as dist
from .config import Config, config_differences
from .engine import configure, resolve_device
from .errors import UserError
from .models import check_student_sizes
from .rundir import RunDir, write_text
from .stages import (
    evaluate_stage,
    format_table,
    load_data,
    pseudo_label_stage,
    select_stage,
    train_stage,
    write_summary,
)


def open_run(cfg: Config) -> RunDir:
    """Create/reuse the run directory; refuse one made with a result-changing different config."""
    run = RunDir(cfg.run_dir).lock()  # one process per run dir; cleans up after a killed run
    path = Path(cfg.run_dir) / "config.yaml"
    new = cfg.to_dict()
    if path.is_file():
        old = yaml.safe_load(path.read_text()) or {}
        diff = config_differences(old, new)
        if diff:
            raise UserError(
                f"run directory '{cfg.run_dir}' was made with a different config "
                f"({', '.join(diff[:6])}); use a new run_dir or delete the old one"
            )
    if dist.is_main():
        write_text(path, yaml.safe_dump(new, sort_keys=False))
    return run


def run_pipeline(cfg: Config) -> dict[str, Any]:
    """Run (or resume) every stage; returns summary.json's content.

    Under torchrun (see distributed.py) every rank runs this: training and pseudo-labeling are
    shared by all ranks, everything else runs on rank 0 while the others wait at a barrier."""
    dist.init(resolve_device(cfg.device))
    line = configure(cfg.precision, cfg.compile, resolve_device(cfg.device))
    if dist.is_main():
        print(line)
    try:
        return _run_pipeline(cfg)
    finally:
        dist.shutdown()


def _run_pipeline(cfg: Config) -> dict[str, Any]:
    run = open_run(cfg)
    if dist.is_main():  # rank 0 fills the decode cache, the other ranks then read it
        data = load_data(cfg, run)
    dist.barrier()
    if not dist.is_main():
        data = load_data(cfg, run)
    params = check_student_sizes(cfg.models, len(data.classes), cfg.allow_smaller_student)
    say = print if dist.is_main() else (lambda *a, **k: None)
    say(
        f"run directory: {run.root}  |  {len(data.labeled)} labeled, {len(data.unlabeled)} "
        f"unlabeled, {len(data.test)} test images, {len(data.classes)} classes"
    )
    print("models: " + " -> ".join(f"{m} ({p:,})" for m, p in zip(cfg.models, params, strict=True)))
    last = len(cfg.models) - 1
    for i in range(len(cfg.models)):
        train_stage(cfg, run, data, i)  # every rank (DDP)
        dist.barrier()
        if dist.is_main():
            res = evaluate_stage(cfg, run, data, i)
            say(
                f"[iter {i}] {cfg.models[i]}: test top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%"
            )
            if cfg.robustness.enabled:  # corruption / flip / adversarial robustness (robustness/)
                from .robustness.stage import one_line, robustness_stage

                say(f"[iter {i}] robustness: {one_line(robustness_stage(cfg, run, data, i))}")
        dist.barrier()
        if i < last:
            pseudo_label_stage(cfg, run, data, i)  # every rank labels its own shards
            if dist.is_main():
                counts = select_stage(cfg, run, data, i)
                acc = counts["pseudo_label_acc"]
                say(
                    f"[iter {i}] pseudo labels: kept {counts['kept_unique']}/{counts['total']} images"
                    + (f", accuracy {acc:.2f}%" if acc is not None else "")
                    + f", {counts['selected_rows']} rows after balancing"
                )
            dist.barrier()
        if dist.is_main():
            write_summary(cfg, run)
    if cfg.finetune.enabled and dist.is_main():  # FixRes-style, on the final model
        from .finetune import finetune_stage

        ev = finetune_stage(cfg, run, last)
        say(
            f"[iter {last}] fine-tuned at {cfg.finetune.image_size} px: test top-1 {ev['top1']:.2f}%"
        )
    dist.barrier()
    if not dist.is_main():
        return {}
    summary = write_summary(cfg, run)
    print()
    print(format_table(summary))
    print(f"\nrun directory: {run.root}")
    write_run_report(cfg, run, data)
    return summary


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
