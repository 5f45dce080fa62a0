"""Identity of an image set as a stage read it, recorded in the manifest as one of the stage's
inputs, so that changed images re-run exactly the stages that read them.

"listing" (the default) covers what a change to a set touches without reading any image: every
image's uid (its path relative to the set's root, which names its class folder), its label,
its file's size and modification time, and for a set given as an index file or a tar archive
that file's own bytes. "content" hashes every image file's bytes instead of trusting sizes and
mtimes (a copy tool that keeps mtimes, a file system without them); it reads the whole set.
The built-in digits set lives in memory: its pixels and labels are hashed.

A fingerprint is "<mode>:<hex>", so one taken in the other mode never matches (the stage runs
again, with the same result).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from .data import ImageSet, IndexColumn, uid_strings

MODES = ("listing", "content")
_CHUNK = 1 << 20


def _file_digest(path: str | os.PathLike) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.digest()


def set_fingerprint(s: ImageSet, source: str | Path | None, mode: str = "listing") -> str:
    """The fingerprint of set `s`, read from `source` (its folder or index file; None for a set
    in memory). Images that are gone count as changed, never as an error here: reading them is
    the data loader's business."""
    if mode not in MODES:
        raise ValueError(f"fingerprint mode {mode!r} is not one of {MODES}")
    h = hashlib.blake2b(digest_size=16)
    h.update(f"v1|{len(s)}|{','.join(s.classes)}\n".encode())
    h.update(np.ascontiguousarray(s.labels, dtype=np.int64).tobytes())
    if source is not None and Path(source).is_file():  # an index file or one tar archive
        h.update(_file_digest(source))
    if s.array is not None:
        h.update(np.ascontiguousarray(s.array).tobytes())
        return f"{mode}:{h.hexdigest()}"
    seen: dict[str, str] = {}  # a tar archive's members share its file: one stat / hash each
    for uid, p in _entries(s):
        f = os.fspath(p)
        rec = seen.get(f)
        if rec is None:
            try:
                if mode == "content":
                    rec = _file_digest(f).hex()
                else:
                    st = os.stat(f)
                    rec = f"{st.st_size}|{st.st_mtime_ns}"
            except OSError:
                rec = "missing"
            if f != str(p):  # a tar member: its archive is hashed once
                seen[f] = rec
        h.update(f"{uid}|{rec}\n".encode())
    return f"{mode}:{h.hexdigest()}"


def _entries(s: ImageSet):
    """(uid, path) of every image. An index file's are sliced from one mapping of the file and
    joined to its root as strings: reading them back line by line (IndexColumn's random access)
    would cost more than the stat itself."""
    paths = s.paths
    if isinstance(paths, IndexColumn) and paths.root is not None:
        root = os.fspath(paths.root)
        for u in uid_strings(s):
            yield u, os.path.join(root, u)
        return
    yield from zip(s.uids, paths or [], strict=True)
