"""The run directory: atomic file writes, the manifest of stages, metrics and checkpoints.

Layout (see README "Run directory"):

    config.yaml            fully resolved config
    manifest.json          per stage: status, inputs, outputs (with sizes), times
    metrics.jsonl          one JSON object per logged event (train loss, eval, ...)
    summary.json           one entry per iteration: model, params, accuracy, ...
    iter<i>/               everything of iteration i (model i; i = 0 is the first teacher)
        model.safetensors  final weights (EMA-free plain state dict), model.json beside it
        train/             last.safetensors + last_state.pt (resume), log of epochs
        eval.json          test top-1/top-5
        pseudo/            pseudo labels made BY model i (store format, see store.py)
        select/            selection of those pseudo labels, used to train model i+1
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import UserError

MANIFEST_VERSION = 1


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, writer: Callable[[Path], None]) -> Path:
    """Write `path` via `writer(tmp_path)`, fsync, then rename: readers never see a partial file.

    On any error the previous file (if any) is left untouched and the temporary file removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        writer(tmp_path)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"'{path}' is not valid JSON ({e.msg}); delete it and re-run") from None


def save_tensors(
    path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None
) -> Path:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda p: save_file(tensors, str(p), metadata=meta))


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"'{path}' not found")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise UserError(
            f"'{path}' is not a readable safetensors file ({e}); delete it and re-run"
        ) from None


def save_state(path: str | Path, state: dict[str, Any]) -> Path:
    """Optimizer/scheduler/RNG state for resume; read back with weights_only=True (no pickled code)."""
    return atomic_write(path, lambda p: torch.save(state, p))


def load_state(path: str | Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(
            f"'{path}' is not a loadable training state ({type(e).__name__}); delete it to restart that stage"
        ) from None


class RunDir:
    """A run directory and its manifest. Stages record status, inputs and outputs here."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.manifest_path = self.root / "manifest.json"
        self.metrics_path = self.root / "metrics.jsonl"

    def iter_dir(self, i: int) -> Path:
        return self.root / f"iter{i}"

    def model_path(self, i: int) -> Path:
        return self.iter_dir(i) / "model.safetensors"

    # manifest -----------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        if not self.manifest_path.exists():
            return {"version": MANIFEST_VERSION, "stages": {}}
        return read_json(self.manifest_path)

    def stage_done(self, name: str) -> bool:
        entry = self.manifest()["stages"].get(name)
        if not entry or entry.get("status") != "done":
            return False
        # A stage counts as done only while its outputs are all still there with their sizes.
        for rel, size in entry.get("outputs", {}).items():
            p = self.root / rel
            if not p.is_file() or p.stat().st_size != size:
                return False
        return True

    def mark(
        self,
        name: str,
        status: str,
        inputs: list[Path] | None = None,
        outputs: list[Path] | None = None,
        **extra: Any,
    ) -> None:
        m = self.manifest()
        entry = m["stages"].get(name, {})
        entry.update(status=status, time=time.strftime("%Y-%m-%dT%H:%M:%S"), **extra)
        if inputs is not None:
            entry["inputs"] = [self._rel(p) for p in inputs]
        if outputs is not None:
            entry["outputs"] = {self._rel(p): Path(p).stat().st_size for p in outputs}
        m["stages"][name] = entry
        write_json(self.manifest_path, m)

    def _rel(self, p: str | Path) -> str:
        p = Path(p)
        try:
            return str(p.resolve().relative_to(self.root.resolve()))
        except ValueError:
            return str(p)

    # metrics ------------------------------------------------------------------------------
    def log(self, **record: Any) -> None:
        record = {"time": round(time.time(), 3), **record}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
