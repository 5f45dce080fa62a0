"""The run directory's layout: the ONE place a path inside a run directory is spelled.

    config.yaml            fully resolved config
    manifest.json          per stage: status, inputs, outputs (with size and sha256), times
    metrics.jsonl          one JSON object per logged event (train loss, eval, ...)
    summary.json           one entry per iteration: model, params, accuracy, ...
    lock                   pid and host of the process using the directory (rundir.lock)
    skipped_<set>.txt      uids of unreadable images that were skipped (when there are any)
    cache/                 uint8 decode cache of small images (unless data.cache_dir is set)
    report.html            the run report (report/), tensorboard/ its optional scalars
    iter<i>/               everything of iteration i (model i; i = 0 is the first teacher)
        model.safetensors  final weights (identity in the safetensors header), model.json beside
        train/checkpoint.pt  resume state (weights, optimizer, scheduler, scaler, RNG, position)
        eval.json          test top-1/top-5 and predictions
        pseudo/            pseudo labels made BY model i (store.py format), audit.json
        select/            selection of those pseudo labels (selected.safetensors, counts.json),
                           used to train model i+1
        robustness/        results.json, predictions.safetensors (robustness stage)
        finetune/          the FixRes fine-tune of model i: its own model, eval and train/
        eval_<set>.json    model i on another labeled set (`evaluate --test-dir`), its confusion
        export/            model i exported (`noisystudent export`): model.onnx / model.pt, each
                           with <file>.json beside it (classes, image size, the evaluation view)

Stages, the report, the CLI and the benchmarks ask `RunLayout` / `IterPaths` for a path; none
of them joins a file name onto a run directory itself. Stage names in the manifest ("iter0/train")
are spelled here too (`IterPaths.stage`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# inside a pseudo-label store folder (store.py reads and writes these names)
STORE_META = "meta.json"
SHARD_PREFIX = "shard-"
# inside the robustness suite's cache folder (robustness/cache.py)
CACHE_META = "meta.json"

_ITER = re.compile(r"iter(\d+)")


@dataclass(frozen=True)
class ModelPaths:
    """A trained model's files: weights, their description, its evaluation, its training state."""

    dir: Path

    @property
    def model(self) -> Path:
        return self.dir / "model.safetensors"

    @property
    def model_meta(self) -> Path:
        return self.dir / "model.json"

    @property
    def eval(self) -> Path:
        return self.dir / "eval.json"

    @property
    def train_dir(self) -> Path:
        return self.dir / "train"

    @property
    def checkpoint(self) -> Path:
        return self.train_dir / "checkpoint.pt"


@dataclass(frozen=True)
class IterPaths(ModelPaths):
    """Everything of iteration i: model i, the pseudo labels it made, their selection, its
    robustness results and its fine-tune."""

    i: int = 0

    def stage(self, what: str) -> str:
        """The manifest name of one of this iteration's stages, e.g. "iter0/train"."""
        return f"iter{self.i}/{what}"

    # pseudo labels made by model i
    @property
    def pseudo(self) -> Path:
        return self.dir / "pseudo"

    @property
    def pseudo_meta(self) -> Path:
        return self.pseudo / STORE_META

    @property
    def audit(self) -> Path:
        return self.pseudo / "audit.json"

    # their selection, which trains model i+1
    @property
    def select_dir(self) -> Path:
        return self.dir / "select"

    @property
    def selected(self) -> Path:
        return self.select_dir / "selected.safetensors"

    @property
    def counts(self) -> Path:
        return self.select_dir / "counts.json"

    # robustness of model i
    @property
    def robustness(self) -> Path:
        return self.dir / "robustness"

    @property
    def robustness_results(self) -> Path:
        return robustness_files(self.robustness)[0]

    @property
    def robustness_predictions(self) -> Path:
        return robustness_files(self.robustness)[1]

    # FixRes fine-tune of model i
    @property
    def finetune(self) -> ModelPaths:
        return ModelPaths(self.dir / "finetune")

    # model i on another labeled set, and model i exported (both made on request, not stages)
    def eval_on(self, name: str) -> Path:
        """Results of `evaluate --test-dir` on the set `name` (a file-name-safe word)."""
        return self.dir / f"eval_{name}.json"

    def export(self, suffix: str) -> Path:
        """The default file of `noisystudent export` (suffix ".onnx", ".pt"); its description
        is beside it, the same name with ".json" appended."""
        return self.dir / "export" / f"model{suffix}"


def robustness_files(folder: Path) -> tuple[Path, Path]:
    """(results, clean predictions) inside a robustness folder: a run's iter<i>/robustness, or
    the folder a user gives as `--reference DIR`."""
    folder = Path(folder)
    return folder / "results.json", folder / "predictions.safetensors"


@dataclass(frozen=True)
class RunLayout:
    """The files of one run directory."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def lock(self) -> Path:
        return self.root / "lock"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    def decode_cache(self, cache_dir: str | Path | None = None) -> Path:
        """The uint8 decode cache: data.cache_dir when set (shared between runs), else cache/."""
        return Path(cache_dir) if cache_dir else self.cache

    def robustness_cache(self, cache_dir: str | Path | None = None) -> Path:
        """The corrupted and perturbed test arrays of the robustness suite, beside the decodes."""
        return self.decode_cache(cache_dir) / "robustness"

    def skipped(self, what: str) -> Path:
        """Listing of the unreadable images of set `what` (labeled, unlabeled, test)."""
        return self.root / f"skipped_{what}.txt"

    def it(self, i: int) -> IterPaths:
        return IterPaths(self.root / f"iter{i}", i)

    def iterations(self) -> list[int]:
        """Iterations that have a folder on disk, in order."""
        if not self.root.is_dir():
            return []
        found = (_ITER.fullmatch(p.name) for p in self.root.iterdir() if p.is_dir())
        return sorted(int(m.group(1)) for m in found if m)
