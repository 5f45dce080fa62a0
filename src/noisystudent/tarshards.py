"""Unlabeled images in WebDataset-style tar shards (`shard-000000.tar`, ...), read in place.

Millions of small files are slow on most file systems; at scale images travel as uncompressed
tar archives. Each image member becomes one item with uid `<archive path>/<member name>`
(relative to the unlabeled root). The archives are indexed once (member offsets, with the
standard library's `tarfile`), then every image is read by one seek + read: random access, so
the same sampler, sharding and decode cache work as for folders. Compressed archives (.tar.gz)
cannot be read by offset and are refused with a message.
"""

from __future__ import annotations

import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


@dataclass(frozen=True)
class TarMember:
    """One image inside an uncompressed tar archive. `os.fspath` gives the archive (so its size
    and mtime identify the data); `read()` gives the member's bytes."""

    archive: Path
    name: str
    offset: int
    size: int

    def __fspath__(self) -> str:
        return str(self.archive)

    def __str__(self) -> str:
        return f"{self.archive}::{self.name}"

    def read(self) -> bytes:
        with open(self.archive, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"archive truncated ({len(data)} of {self.size} bytes)")
        return data

    def open(self) -> io.BytesIO:
        return io.BytesIO(self.read())


def is_tar(p: Path) -> bool:
    return p.suffix == ".tar" or p.name.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar.xz"))


def index_tar(path: Path) -> list[TarMember]:
    """The image members of one uncompressed archive, in archive order."""
    if path.suffix != ".tar":
        raise UserError(
            f"'{path}' is a compressed archive; unlabeled tar shards must be plain .tar (WebDataset style)"
        )
    try:
        with tarfile.open(path, "r:") as tf:
            return [TarMember(path, m.name, m.offset_data, m.size) for m in tf
                    if m.isfile() and os.path.splitext(m.name)[1].lower() in IMAGE_EXTS]  # fmt: skip
    except (tarfile.TarError, OSError) as e:
        raise UserError(f"cannot read tar shard '{path}': {e}") from None


def scan_tars(root: Path, archives: list[Path]) -> tuple[list[str], list[TarMember]]:
    """uids and members of all image members of `archives` (sorted by path), uid relative to root."""
    uids, members = [], []
    for a in sorted(archives):
        rel = a.relative_to(root).as_posix() if a != root else a.name
        for m in index_tar(a):
            uids.append(f"{rel}/{m.name}")
            members.append(m)
    return uids, members
