"""The run directory: the only interface between stages.

    io        atomic writes and the json/safetensors/state readers and writers
    lock      one process per run directory
    manifest  what each stage read and wrote (done / verify / forget)
    layout    where every file lives (the only place a path inside a run directory is spelled)

`RunDir` ties them together for one directory; `open_run` is how a command gets one.
"""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path
from typing import Any

import yaml

from .. import distributed as dist
from ..config import Config, config_differences
from ..errors import UserError
from .io import (
    append_line,
    atomic_write,
    load_state,
    load_tensors,
    read_json,
    read_lines_json,
    save_state,
    save_tensors,
    sha256_file,
    tensors_metadata,
    write_json,
    write_text,
)
from .layout import IterPaths, ModelPaths, RunLayout
from .lock import clean_leftovers, drop_lock, release_locks, take_lock
from .manifest import Manifest

__all__ = [
    "IterPaths",
    "Manifest",
    "ModelPaths",
    "RunDir",
    "RunLayout",
    "atomic_write",
    "load_state",
    "load_tensors",
    "open_run",
    "read_json",
    "read_lines_json",
    "release_locks",
    "save_state",
    "save_tensors",
    "sha256_file",
    "tensors_metadata",
    "write_json",
    "write_text",
]


class RunDir:
    """A run directory: its layout, its manifest, its lock and its event log."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.paths = RunLayout(self.root)
        self.manifest = Manifest(self.root, self.paths.manifest)

    def it(self, i: int) -> IterPaths:
        return self.paths.it(i)

    # lock ---------------------------------------------------------------------------------
    def lock(self) -> RunDir:
        """Take the directory for this process (see lock.take_lock); once locked, leftovers of
        a killed writer are cleaned: temporary files and a torn last line of metrics.jsonl."""
        take_lock(self.root, self.paths.lock)
        if dist.rank() == 0:
            clean_leftovers(self.root, self.paths.metrics)
        return self

    def unlock(self) -> None:
        drop_lock(self.root)

    # manifest shortcuts -------------------------------------------------------------------
    def stage_done(self, name: str, data: dict[str, str] | None = None) -> bool:
        """Whether stage `name` is done with these inputs (`data`: fingerprints of the image
        sets it reads, see inputs.Data.read). A stage that was done but is stale says why in one
        line ("labeled data changed since iter0/train ran: running it again")."""
        if self.manifest.entry(name).get("status") != "done":
            return False
        why = self.manifest.stale(name, data)
        if why is not None and dist.is_main():
            print(f"{why}: running {name} again")
        return why is None

    def mark(self, name: str, status: str, inputs=None, outputs=None, data=None,
             **extra: Any) -> None:  # fmt: skip
        self.manifest.mark(name, status, inputs, outputs, data, **extra)

    # metrics ------------------------------------------------------------------------------
    def log(self, **record: Any) -> None:
        """Append one event to metrics.jsonl (one write of one line). Under torchrun only rank 0
        writes the log."""
        if dist.rank() != 0:
            return
        append_line(self.paths.metrics, json.dumps({"time": round(time.time(), 3), **record}))

    def logger(self, stage: str):
        """A log callable for one stage: `log(event=..., **fields)`."""
        return lambda **record: self.log(stage=stage, **record)

    def metrics(self) -> list[dict[str, Any]]:
        """All complete events in metrics.jsonl, in order (a torn line is skipped). After a
        resume, steps between the last checkpoint and the kill appear twice: the later wins."""
        return read_lines_json(self.paths.metrics)[0]


def open_run(cfg: Config) -> RunDir:
    """Create/reuse the run directory and lock it; refuse one made with a result-changing
    different config; save the resolved config in it.

    A directory in which no stage has started yet (a start that failed, e.g. on a mistyped
    model name) is not bound to its config.yaml: the new config replaces it. Every problem
    with the folder itself (a file, under a file, not writable) is one UserError naming it."""
    root = Path(cfg.run_dir)
    try:
        if root.exists() and not root.is_dir():
            raise UserError(f"run_dir '{root}' is a file; give a folder (new or an earlier run)")
        run = RunDir(root)
        if dist.is_main() and not os.access(root, os.W_OK | os.X_OK):  # e.g. a read-only mount
            raise _not_writable(root)
        run.lock()  # one process per run dir; cleans up after a killed run
    except OSError as e:
        raise UserError(_unusable(root, e)) from None
    new = cfg.to_dict()
    path = run.paths.config
    if path.is_file():
        old = yaml.safe_load(path.read_text()) or {}
        diff = config_differences(old, new)
        if diff and _started(run):
            raise UserError(
                f"run directory '{cfg.run_dir}' was made with a different config "
                f"({', '.join(diff[:6])}); use a new run_dir or delete the old one"
            )
        if diff and dist.is_main():
            print(
                f"run directory '{cfg.run_dir}': no stage has run yet, so its config.yaml is "
                f"replaced ({', '.join(diff[:6])})"
            )
    if dist.is_main():
        write_text(path, yaml.safe_dump(new, sort_keys=False))
    return run


def _started(run: RunDir) -> bool:
    """Has any stage started in this run directory: recorded in the manifest (running or done),
    or left a file in an iteration folder (a checkpoint, a model)?"""
    if run.manifest.read().get("stages"):
        return True
    for i in run.paths.iterations():
        if any(p.is_file() for p in run.it(i).dir.rglob("*")):
            return True
    return False


def _not_writable(root: Path) -> OSError:
    try:
        read_only = bool(os.statvfs(root).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        read_only = False
    code = errno.EROFS if read_only else errno.EACCES
    return OSError(code, os.strerror(code), str(root))


def _unusable(root: Path, e: OSError) -> str:
    """Why the folder `root` cannot be a run directory, in one line with what to do."""
    if isinstance(e, (NotADirectoryError, FileExistsError)):
        return f"run_dir '{root}' lies under a file; give a folder path"
    where = f": '{e.filename}'" if e.filename and str(e.filename) != str(root) else ""
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return (
            f"run_dir '{root}' is not writable ({e.strerror or e}{where}); give a folder you "
            f"can write to, or fix its permissions"
        )
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"cannot use run_dir '{root}': the disk is full; free space or use another folder"
    return f"cannot use run_dir '{root}' ({e.strerror or e}{where}); give a folder you can write to"
