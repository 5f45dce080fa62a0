"""The run directory as the report reads it: config, summary, metrics, images; never written.
Every path comes from the run's layout (rundir/layout.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..config import Config, load_config
from ..errors import UserError
from ..rundir import IterPaths, RunLayout, read_json, read_lines_json


@dataclass
class RunFiles:
    """What the sections read: the run's files, loaded once."""

    layout: RunLayout
    cfg: Config
    summary: list[dict[str, Any]]
    events: list[dict[str, Any]]
    bad_metric_lines: int
    data: Any = None  # inputs.Data, or None when the images could not be loaded
    data_error: str | None = None
    summary_error: str | None = None
    problems: list[str] = field(default_factory=list)  # section-level problems, for the caller

    @property
    def root(self):
        return self.layout.root

    @property
    def iterations(self) -> list[int]:
        """Iterations with a folder on disk, in order (a model may not be trained yet)."""
        return [i for i in self.layout.iterations() if i < len(self.cfg.models)]

    def it(self, i: int) -> IterPaths:
        return self.layout.it(i)

    def rows_match_images(self, store: Any) -> bool:
        """Whether a pseudo-label store's rows still point into the unlabeled set as loaded now:
        the store records the fingerprint of the set it labeled, and its `index` is only a
        position in that set (after files were added or removed it would name other images)."""
        if self.data is None:
            return False
        made_for = store.meta.get("identity", {}).get("data_fingerprint")
        return made_for == self.data.fingerprints.get("unlabeled")

    def hidden_labels(self, store: Any) -> np.ndarray:
        """(N,) hidden labels of the images of a store's rows; -1 where unknown (no images
        loaded, a set that changed since labeling, or an image without a label)."""
        if not self.rows_match_images(store):
            return np.full(len(store), -1, dtype=np.int64)
        from ..data import hidden_labels

        return hidden_labels(self.data.unlabeled, store.index).numpy()


def open_run_files(run_dir, cfg: Config | None, data: Any) -> RunFiles:
    layout = RunLayout(run_dir)
    root = layout.root
    if not root.exists():
        raise UserError(f"run directory '{root}' does not exist")
    if not root.is_dir():
        raise UserError(f"'{root}' is a file, not a run directory")
    if not layout.config.is_file():
        raise UserError(
            f"'{root}' is not a run directory (no {layout.config.name}); pass the run_dir of a "
            f"`noisystudent run` or `noisystudent demo`"
        )
    if cfg is None:
        try:
            cfg = load_config(root)
        except UserError as e:
            msg = str(e)
            raise UserError(msg if str(root) in msg else f"'{layout.config}': {msg}") from None
    events, bad = read_lines_json(layout.metrics)
    run = RunFiles(layout, cfg, [], events, bad, data)
    if layout.summary.is_file():
        try:
            s = read_json(layout.summary)
            if not isinstance(s, dict) or not isinstance(s.get("iterations"), list):
                raise UserError(
                    f"'{layout.summary}' has no 'iterations' list; delete it and re-run"
                )
            run.summary = s["iterations"]
        except UserError as e:
            run.summary_error = str(e)  # shown in the Iterations section
    if run.data is None:
        try:
            from ..inputs import load_data  # torch and timm: only when the images are needed
            from ..rundir import RunDir

            run.data = load_data(cfg, RunDir(root))
        except UserError as e:
            run.data_error = str(e)
    return run
