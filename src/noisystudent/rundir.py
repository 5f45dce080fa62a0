"""The run directory: atomic file writes, the manifest of stages, metrics, checkpoints, the lock.

Layout (see README "Run directory"):

    config.yaml            fully resolved config
    manifest.json          per stage: status, inputs, outputs (with size and sha256), times
    metrics.jsonl          one JSON object per logged event (train loss, eval, ...)
    summary.json           one entry per iteration: model, params, accuracy, ...
    lock                   pid and host of the process using the directory (see `RunDir.lock`)
    skipped_<set>.txt      uids of unreadable images that were skipped (when there are any)
    iter<i>/               everything of iteration i (model i; i = 0 is the first teacher)
        model.safetensors  final weights (plain state dict; identity in the safetensors metadata),
                           model.json beside it
        train/checkpoint.pt  resume state (weights, optimizer, scheduler, scaler, RNG, position)
        eval.json          test top-1/top-5
        pseudo/            pseudo labels made BY model i (store format, see store.py)
        select/            selection of those pseudo labels, used to train model i+1

Crash safety: every file is written to a temporary file, fsynced and renamed over the old one
(`atomic_write`), so a kill or a full disk leaves either the old or the new file, never a torn
one. metrics.jsonl is the one file appended to: each event is a single `write` of one line; a torn
last line (power loss) is dropped when the directory is next locked, and readers skip it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import UserError


def _rank() -> int:
    from .distributed import rank

    return rank()


MANIFEST_VERSION = 1
TMP_SUFFIX = ".tmp"  # atomic_write's temporary files: .<name>.<random>.tmp beside the target


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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, writer: Callable[[Path], None]) -> Path:
    """Write `path` via `writer(tmp_path)`, fsync, then rename: readers never see a partial file.

    On any error (a full disk, a kill signal turned into an exception) the previous file, if
    any, is left untouched and the temporary file removed; an OSError becomes a UserError naming
    the file. A SIGKILL can leave the temporary file behind: `RunDir.lock` removes those.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        writer(tmp_path)
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; use the user's usual mode
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        full = _disk_full(e, path.parent)  # before the partial file is removed and frees space
        tmp_path.unlink(missing_ok=True)
        if full or (isinstance(e, OSError) and not isinstance(e, UserError)):
            what = "the disk is full" if full else (getattr(e, "strerror", None) or str(e))
            raise UserError(
                f"cannot write '{path}': {what}; the previous version of the file (if any) is "
                f"intact - free space or fix the problem and re-run to resume"
            ) from None
        raise
    return path


def _disk_full(e: BaseException, folder: Path) -> bool:
    """Did this write fail for lack of space? torch.save and safetensors report it as their own
    RuntimeError/SafetensorError, so also look at the message and at the free space left."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if not isinstance(e, Exception) or isinstance(e, UserError):
        return False
    if "No space left" in str(e) or "os error 28" in str(e):
        return True
    try:
        st = os.statvfs(folder)
        return st.f_bavail * st.f_frsize < (16 << 20)  # under 16 MiB free: call it full
    except (OSError, AttributeError):
        return False


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


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def save_tensors(
    path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None
) -> Path:
    """A safetensors file whose bytes depend only on its content (see `_sort_metadata`), so equal
    weights give an equal sha256 in every process."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}

    def write(p: Path) -> None:
        save_file(tensors, str(p), metadata=meta)
        if meta:
            _sort_metadata(p)

    return atomic_write(path, write)


def _sort_metadata(path: Path) -> None:
    """safetensors writes its metadata map in a per-process random (hash) order; rewrite the
    header in place with the metadata keys sorted. Same content, same length: only the order of
    bytes inside the header changes."""
    with open(path, "rb+") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
        header = json.loads(raw)
        if "__metadata__" in header:
            header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        new = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(new) > n:  # cannot happen for the same content; keep the file as written
            return
        f.seek(8)
        f.write(new + b" " * (n - len(new)))


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """A safetensors file (plain tensors; the format cannot carry code)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"'{path}' not found")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types
        raise UserError(
            f"'{path}' is not a readable safetensors file ({e}); delete it and re-run"
        ) from None


def tensors_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata in a safetensors header ({} when it has none)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise UserError(
            f"'{path}' is not a readable safetensors file ({e}); delete it and re-run"
        ) from None


def save_state(path: str | Path, state: dict[str, Any]) -> Path:
    """Optimizer/scheduler/RNG state for resume; read back with weights_only=True (no pickled code)."""
    return atomic_write(path, lambda p: torch.save(state, p))


def load_state(path: str | Path) -> dict[str, Any]:
    """torch.load(weights_only=True): tensors, numbers, strings and containers only. A pickle that
    names any other callable (the way a malicious file runs code) is refused before anything in it
    is called."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        unsafe = "weights_only" in str(e) or "Unsupported global" in str(e)
        why = "it contains pickled code or objects, refused" if unsafe else type(e).__name__
        raise UserError(
            f"'{path}' is not a loadable training state ({why}); delete it to restart that stage"
        ) from None


# --------------------------------------------------------------------------------------------
# the lock: one process per run directory
_HELD: dict[str, int] = {}  # resolved run dir -> fd of its lock file, held by this process


def release_locks() -> None:
    """Release every run-dir lock this process holds (the CLI does so when a command ends, so
    a library or test calling `cli.main` twice in one process is not locked out by itself)."""
    while _HELD:
        os.close(_HELD.popitem()[1])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _read_owner(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        return {}


class RunDir:
    """A run directory and its manifest. Stages record status, inputs and outputs here."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.manifest_path = self.root / "manifest.json"
        self.metrics_path = self.root / "metrics.jsonl"
        self.lock_path = self.root / "lock"

    def iter_dir(self, i: int) -> Path:
        return self.root / f"iter{i}"

    def model_path(self, i: int) -> Path:
        return self.iter_dir(i) / "model.safetensors"

    # lock ---------------------------------------------------------------------------------
    def lock(self) -> RunDir:
        """Take the directory for this process, or refuse with the owner's pid.

        The lock is an flock on `lock` (the kernel drops it when its process dies, however it
        dies), and the file names the owner's pid and host for the message. A lock file left by a
        dead process is taken over. Re-locking from the same process is a no-op. Once locked,
        leftovers of a killed writer are cleaned: temporary files of `atomic_write` and a torn
        last line of metrics.jsonl.
        """
        if int(os.environ.get("RANK", "0")) != 0:
            return self  # under torchrun only rank 0 writes to the run dir, so only it locks
        key = str(self.root.resolve())
        if key in _HELD:
            try:  # still the same lock file (not deleted and re-made under us)?
                if os.fstat(_HELD[key]).st_ino == os.stat(self.lock_path).st_ino:
                    return self
            except OSError:
                pass
            os.close(_HELD.pop(key))
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl

            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read_owner(self.lock_path)
                os.close(fd)
                raise UserError(
                    f"run directory '{self.root}' is in use by process {owner.get('pid', '?')} on "
                    f"{owner.get('host', '?')} (since {owner.get('since', '?')}); wait for it to "
                    f"finish or stop it, or use another run_dir"
                ) from None
            except OSError:  # a filesystem without flock: fall back to the pid in the file
                self._check_pid_owner()
        except ImportError:  # no fcntl (Windows): the pid in the file
            self._check_pid_owner()
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
        os.fsync(fd)
        _HELD[key] = fd
        self.clean_leftovers()
        return self

    def _check_pid_owner(self) -> None:
        owner = _read_owner(self.lock_path)
        pid = owner.get("pid")
        same_host = owner.get("host") in (None, socket.gethostname())
        if isinstance(pid, int) and pid != os.getpid() and same_host and _pid_alive(pid):
            raise UserError(
                f"run directory '{self.root}' is in use by process {pid}; wait for it to finish "
                f"or stop it, or use another run_dir"
            )

    def unlock(self) -> None:
        fd = _HELD.pop(str(self.root.resolve()), None)
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the flock

    def clean_leftovers(self) -> list[Path]:
        """Remove temporaries a killed process left behind, atomic_write's (`.name.XXXX.tmp`) and
        safetensors' own (its Rust writer stages through `.tmpXXXXXX` before renaming), and
        drop a torn last line of metrics.jsonl. Only safe while holding the lock."""
        removed = []
        rust_tmp = re.compile(r"\.tmp[A-Za-z0-9]{6}")
        for p in self.root.rglob(".*"):
            if p.is_file() and (p.name.endswith(TMP_SUFFIX) or rust_tmp.fullmatch(p.name)):
                p.unlink(missing_ok=True)
                removed.append(p)
        if self.metrics_path.is_file():
            with open(self.metrics_path, "rb+") as f:
                data = f.read()
                if data and not data.endswith(b"\n"):
                    f.truncate(data.rfind(b"\n") + 1)  # drop the torn record
                    os.fsync(f.fileno())
        return removed

    # manifest -----------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        if not self.manifest_path.exists():
            return {"version": MANIFEST_VERSION, "stages": {}}
        return read_json(self.manifest_path)

    def verify_outputs(self, name: str) -> list[str]:
        """Problems with stage `name`'s recorded outputs (missing, size or sha256 differs)."""
        entry = self.manifest()["stages"].get(name) or {}
        problems = []
        for rel, rec in entry.get("outputs", {}).items():
            p = self.root / rel
            size, digest = (rec, None) if isinstance(rec, int) else (rec["size"], rec["sha256"])
            if not p.is_file():
                problems.append(f"{rel} is missing")
            elif p.stat().st_size != size:
                problems.append(f"{rel} has {p.stat().st_size} bytes, manifest says {size}")
            elif digest is not None and sha256_file(p) != digest:
                problems.append(f"{rel} differs from the manifest (sha256)")
        return problems

    def stale_inputs(self, name: str) -> list[str]:
        """Inputs of stage `name` that changed since it ran (another teacher, other pseudo labels):
        its outputs no longer follow from them."""
        entry = self.manifest()["stages"].get(name) or {}
        out = []
        for rel, digest in entry.get("input_sha256", {}).items():
            p = self.root / rel
            if not p.is_file() or sha256_file(p) != digest:
                out.append(rel)
        return out

    def stage_done(self, name: str) -> bool:
        """Done = marked done AND every output still there with its recorded size and sha256
        AND every input it read unchanged since."""
        entry = self.manifest()["stages"].get(name)
        if not entry or entry.get("status") != "done":
            return False
        return not self.verify_outputs(name) and not self.stale_inputs(name)

    def output_record(self, path: str | Path) -> dict[str, Any] | None:
        """The manifest's {size, sha256} for a file some stage wrote, or None."""
        rel = self._rel(path)
        for entry in self.manifest()["stages"].values():
            rec = entry.get("outputs", {}).get(rel)
            if isinstance(rec, dict):
                return rec
        return None

    def mark(
        self,
        name: str,
        status: str,
        inputs: list[Path] | None = None,
        outputs: list[Path] | None = None,
        **extra: Any,
    ) -> None:
        """Record a stage's status. With status "done", the outputs are written and fsynced
        already (atomic_write); their sizes and sha256 are recorded here, so a later check sees
        any output that went missing or changed. Under torchrun only rank 0 writes it."""
        if _rank() != 0:
            return
        m = self.manifest()
        entry = m["stages"].get(name, {})
        entry.update(status=status, time=time.strftime("%Y-%m-%dT%H:%M:%S"), **extra)
        if inputs is not None:
            entry["inputs"] = [self._rel(p) for p in inputs]
            entry["input_sha256"] = {
                self._rel(p): sha256_file(p) for p in inputs if Path(p).is_file()
            }
        if outputs is not None:
            recs = {}
            for p in outputs:
                p = Path(p)
                if not p.is_file():
                    raise UserError(f"stage {name}: output '{p}' was not written; re-run the stage")
                recs[self._rel(p)] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
            entry["outputs"] = recs
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
        """Append one event to metrics.jsonl as ONE write of one line (O_APPEND): a kill leaves the
        line whole or absent; a torn line after power loss is dropped on the next lock."""
        if _rank() != 0:  # under torchrun only rank 0 writes the log
            return
        record = {"time": round(time.time(), 3), **record}
        line = (json.dumps(record) + "\n").encode()
        fd = os.open(self.metrics_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)

    def metrics(self) -> list[dict[str, Any]]:
        """All complete events in metrics.jsonl, in order (a torn line is skipped). After a resume,
        steps between the last checkpoint and the kill appear twice: the later record wins."""
        if not self.metrics_path.is_file():
            return []
        out = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out
