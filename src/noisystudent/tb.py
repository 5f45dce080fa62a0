"""Optional TensorBoard scalars: metrics.jsonl re-written as event files (extra `tensorboard`).

    pip install "noisystudent[tensorboard]"
    tensorboard --logdir RUN_DIR/tensorboard

Tags are the names metrics.jsonl uses: `<stage>/<field>`, e.g. `iter0/train/loss`,
`iter0/train/train_acc`, `iter0/train/lr`, `iter0/evaluate/top1`,
`iter0/select/passed_filter_fraction`, `iter0/select/kept_unique_fraction`.
Training scalars are indexed by their optimizer `step`; one-off events (eval, select, ...) by
their iteration. The folder is rebuilt from metrics.jsonl each time (by the report, at the end of
every run), so it always matches the file and a resumed run never leaves duplicate points.
"""

from __future__ import annotations

from pathlib import Path

from .rundir import read_lines_json

# fields of a metrics.jsonl record that index or describe it rather than measure something
NOT_SCALARS = {"time", "stage", "event", "step", "epoch"}


def tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def _iteration(stage: str) -> int:
    head = stage.split("/", 1)[0]
    return int(head[4:]) if head.startswith("iter") and head[4:].isdigit() else 0


def export_scalars(metrics_path: str | Path, out_dir: str | Path) -> int | None:
    """metrics.jsonl -> TensorBoard event files in out_dir (its old event files are replaced).

    Returns the number of scalars written, or None when the `tensorboard` package is missing.
    """
    if not tensorboard_available():
        return None
    from torch.utils.tensorboard import SummaryWriter

    metrics_path, out_dir = Path(metrics_path), Path(out_dir)
    if not metrics_path.is_file():
        return 0
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("events.out.tfevents.*"):
        old.unlink()
    n = 0
    writer = SummaryWriter(log_dir=str(out_dir))
    try:
        for rec in read_lines_json(metrics_path)[0]:  # a line cut short by a killed run: skipped
            stage = str(rec.get("stage", ""))
            step = rec.get("step")
            if not isinstance(step, int):
                step = _iteration(stage)
            for key, value in rec.items():
                if key in NOT_SCALARS or isinstance(value, bool):
                    continue
                if not isinstance(value, (int, float)):
                    continue
                tag = f"{stage}/{key}" if stage else key
                writer.add_scalar(tag, value, global_step=step, walltime=rec.get("time"))
                n += 1
    finally:
        writer.close()
    return n
