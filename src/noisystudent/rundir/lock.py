"""One process per run directory: an flock on RUN_DIR/lock, and cleaning up after a killed one."""

from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

from .. import distributed as dist
from ..errors import UserError
from .io import TMP_SUFFIX

_HELD: dict[str, int] = {}  # resolved run dir -> fd of its lock file, held by this process

# How long a lock whose recorded owner is dead (same host) is waited for: the descriptor can
# still be open in a child the owner forked before it was killed.
STALE_WAIT_S = 10.0


def _forget_locks_in_child() -> None:
    """After a fork, in the child: close its copies of the lock descriptors (never LOCK_UN,
    which would release the parent's lock: both copies share one open file description). An
    flock is released once every descriptor of its open file description is closed, so a
    killed owner's forked children (DataLoader workers) no longer keep the directory locked."""
    while _HELD:
        try:
            os.close(_HELD.popitem()[1])
        except OSError:
            pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_locks_in_child)


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


def _dead_owner(owner: dict[str, Any]) -> bool:
    """The recorded owner is a process of this host that no longer runs."""
    pid = owner.get("pid")
    return (
        isinstance(pid, int)
        and owner.get("host") in (None, socket.gethostname())
        and pid != os.getpid()
        and not _pid_alive(pid)
    )


def _flock_when_free(fd: int, seconds: float) -> bool:
    import fcntl

    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)


def take_lock(root: Path, lock_path: Path) -> None:
    """Take the directory for this process, or refuse with the owner's pid.

    The lock is an flock on `lock_path` (the kernel drops it when its process dies, however it
    dies), and the file names the owner's pid and host for the message. Children forked by the
    owner do not hold it (`_forget_locks_in_child`); should it still be held while its recorded
    owner is dead (same host: descriptors inherited some other way), it is waited for up to
    STALE_WAIT_S. A lock file left by a dead process is taken over. Re-locking from the same
    process is a no-op. Under torchrun only rank 0 writes to the run directory, so only it
    locks."""
    if dist.rank() != 0:
        return
    key = str(root.resolve())
    if key in _HELD:
        try:  # still the same lock file (not deleted and re-made under us)?
            if os.fstat(_HELD[key]).st_ino == os.stat(lock_path).st_ino:
                return
        except OSError:
            pass
        os.close(_HELD.pop(key))
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _flock_or_refuse(fd, root, lock_path)
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
        os.fsync(fd)
    except BaseException:
        os.close(fd)  # not taken (refused, or the lock file cannot be written)
        raise
    _HELD[key] = fd


def _flock_or_refuse(fd: int, root: Path, lock_path: Path) -> None:
    try:
        import fcntl
    except ImportError:  # no fcntl (Windows): the pid in the file
        _check_pid_owner(root, lock_path)
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        if not (_dead_owner(_read_owner(lock_path)) and _flock_when_free(fd, STALE_WAIT_S)):
            raise UserError(_in_use(root, lock_path)) from None
    except OSError:  # a filesystem without flock: fall back to the pid in the file
        _check_pid_owner(root, lock_path)


def _in_use(root: Path, lock_path: Path) -> str:
    owner = _read_owner(lock_path)  # again: it may have changed hands while we waited
    pid, host = owner.get("pid", "?"), owner.get("host", "?")
    if _dead_owner(owner):
        return (
            f"run directory '{root}' is still locked by processes left by process {pid} on "
            f"{host}, which is no longer running (e.g. its DataLoader workers); wait for them to "
            f"exit or stop them (`fuser -v {lock_path}` lists them), then re-run"
        )
    return (
        f"run directory '{root}' is in use by process {pid} on {host} (since "
        f"{owner.get('since', '?')}); wait for it to finish or stop it, or use another run_dir"
    )


def _check_pid_owner(root: Path, lock_path: Path) -> None:
    owner = _read_owner(lock_path)
    pid = owner.get("pid")
    same_host = owner.get("host") in (None, socket.gethostname())
    if isinstance(pid, int) and pid != os.getpid() and same_host and _pid_alive(pid):
        raise UserError(
            f"run directory '{root}' is in use by process {pid}; wait for it to finish "
            f"or stop it, or use another run_dir"
        )


def drop_lock(root: Path) -> None:
    fd = _HELD.pop(str(root.resolve()), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock


_RUST_TMP = re.compile(r"\.tmp[A-Za-z0-9]{6}")


def clean_leftovers(root: Path, metrics_path: Path) -> list[Path]:
    """Remove temporaries a killed process left behind, atomic_write's (`.name.XXXX.tmp`) and
    safetensors' own (its Rust writer stages through `.tmpXXXXXX` before renaming), and drop a
    torn last line of metrics.jsonl. Only safe while holding the lock."""
    removed = []
    for p in root.rglob(".*"):
        if p.is_file() and (p.name.endswith(TMP_SUFFIX) or _RUST_TMP.fullmatch(p.name)):
            p.unlink(missing_ok=True)
            removed.append(p)
    if metrics_path.is_file():
        with open(metrics_path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)  # drop the torn record
                os.fsync(f.fileno())
    return removed
