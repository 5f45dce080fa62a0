"""File writes that a kill or a full disk cannot tear, and the readers that go with them.

Every file of a run directory is written to a temporary file beside it, fsynced and renamed over
the old one (`atomic_write`): a kill or a full disk leaves either the old or the new file, never
a torn one. metrics.jsonl is the one file appended to (`append_line`): each event is a single
`write` of one line, so a kill leaves the line whole or absent; a torn last line (power loss) is
dropped when the directory is next locked (lock.clean_leftovers), and readers skip it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import UserError

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
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
        os.close(fd)
    except OSError as e:  # a read-only folder, a file in the way, a full disk, ...
        raise UserError(
            f"cannot write '{path}': {_why(e)}; make its folder writable (or free space) and re-run"
        ) from None
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


def _why(e: OSError) -> str:
    """An OSError in words: "the disk is full", or its strerror and the file it names."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full"
    what = e.strerror or str(e)
    return f"{what} ('{e.filename}')" if e.filename else what


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


def append_line(path: str | Path, line: str) -> None:
    """Append one line with one write (O_APPEND): a kill leaves the line whole or absent. A
    short write is continued; if the rest cannot be written (a full disk), the partial line is
    cut off again and a UserError names the file (the line is then not recorded)."""
    data = (line.rstrip("\n") + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(
            f"cannot append to '{path}': {_why(e)}; free space or fix the problem and re-run to "
            f"resume"
        ) from None
    written = 0
    try:
        start = os.fstat(fd).st_size
        while written < len(data):
            n = os.write(fd, data[written:])
            if n <= 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            written += n
    except OSError as e:
        if written:  # drop the partial line, so the next append starts on a line of its own
            try:
                os.ftruncate(fd, start)
            except OSError:
                pass
        part = f" (only {written} of {len(data)} bytes were written)" if written else ""
        raise UserError(
            f"cannot append to '{path}': {_why(e)}{part}; free space or fix the problem and "
            f"re-run to resume"
        ) from None
    finally:
        os.close(fd)


def read_lines_json(path: str | Path) -> tuple[list[dict[str, Any]], int]:
    """A JSON-lines file -> (records, number of unreadable lines). A line cut short by a killed
    run is skipped, never fatal; a missing file is empty."""
    path = Path(path)
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
