"""The run directory as the report reads it: config, summary, metrics, images; never written."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config, load_config
from ..errors import UserError
from ..rundir import RunDir, read_json


@dataclass
class RunFiles:
    """What the sections read: the run's files, loaded once."""

    root: Path
    cfg: Config
    summary: list[dict[str, Any]]
    events: list[dict[str, Any]]
    bad_metric_lines: int
    data: Any = None  # stages.Data, or None when the images could not be loaded
    data_error: str | None = None
    summary_error: str | None = None
    problems: list[str] = field(default_factory=list)  # section-level problems, for the caller
    _pos: dict[str, int] | None = field(default=None, repr=False)

    @property
    def iterations(self) -> list[int]:
        """Iterations with a directory on disk, in order (a model may not be trained yet)."""
        return [i for i in range(len(self.cfg.models)) if (self.root / f"iter{i}").is_dir()]

    def iter_dir(self, i: int) -> Path:
        return self.root / f"iter{i}"

    def unlabeled_pos(self) -> dict[str, int]:
        """uid -> index in the unlabeled set (built once; empty when the images are unavailable)."""
        if self._pos is None:
            uids = self.data.unlabeled.uids if self.data is not None else []
            self._pos = {u: k for k, u in enumerate(uids)}
        return self._pos

    def hidden_labels(self, uids: list[str]) -> np.ndarray:
        """(N,) hidden labels of the unlabeled images with these uids; -1 where unknown."""
        out = np.full(len(uids), -1, dtype=np.int64)
        pos = self.unlabeled_pos()
        if not pos:
            return out
        labels = self.data.unlabeled.labels
        for j, u in enumerate(uids):
            k = pos.get(u)
            if k is not None:
                out[j] = labels[k]
        return out


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], int]:
    """metrics.jsonl -> (records, number of unreadable lines). A line cut short by a killed run
    is skipped, never fatal."""
    if not path.is_file():
        return [], 0
    out, bad = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(rec, dict):
            out.append(rec)
        else:
            bad += 1
    return out, bad


def open_run_files(run_dir: str | Path, cfg: Config | None, data: Any) -> RunFiles:
    root = Path(run_dir)
    if not root.exists():
        raise UserError(f"run directory '{root}' does not exist")
    if not root.is_dir():
        raise UserError(f"'{root}' is a file, not a run directory")
    if not (root / "config.yaml").is_file():
        raise UserError(
            f"'{root}' is not a run directory (no config.yaml); pass the run_dir of a "
            f"`noisystudent run` or `noisystudent demo`"
        )
    if cfg is None:
        try:
            cfg = load_config(root)
        except UserError as e:
            msg = str(e)
            raise UserError(
                msg if str(root) in msg else f"'{root / 'config.yaml'}': {msg}"
            ) from None
    events, bad = read_metrics(root / "metrics.jsonl")
    run = RunFiles(root, cfg, [], events, bad, data)
    summary_path = root / "summary.json"
    if summary_path.is_file():
        try:
            s = read_json(summary_path)
            if not isinstance(s, dict) or not isinstance(s.get("iterations"), list):
                raise UserError(f"'{summary_path}' has no 'iterations' list; delete it and re-run")
            run.summary = s["iterations"]
        except UserError as e:
            run.summary_error = str(e)  # shown in the Iterations section
    if run.data is None:
        try:
            from ..stages import load_data  # torch and timm: only when the images are needed

            run.data = load_data(cfg, RunDir(root))
        except UserError as e:
            run.data_error = str(e)
    return run
