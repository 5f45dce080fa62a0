"""Corrupted and perturbed copies of a test set, generated once and cached as uint8 arrays.

Layout (one folder per dataset fingerprint x table x seed, like CIFAR-10-C):

    <root>/<fingerprint>-<table>-seed<seed>-v<VERSION>/
        meta.json                  table, seed, fingerprint, n, size, frost source, version
        labels.npy                 (N,) int64
        c/<corruption>.npy         (5 N, H, W, 3) uint8, severity-major (rows 0..N-1 = severity 1)
        p/<perturbation>.npy       (K, T, H, W, 3) uint8, the first K <= N images' sequences

Every corruption x severity and every perturbation draws from its own
`np.random.Generator(seed, index)`, so a file never depends on which others were generated.
Files are written atomically; a file that fails to load is regenerated, never trusted.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..progress import bar as progress_bar
from ..rundir import atomic_write, read_json, write_json
from ..rundir.layout import CACHE_META
from . import corruptions as C
from . import perturbations as P

VERSION = "1"


def _save_npy(path: Path, arr: np.ndarray) -> None:
    def write(p: Path) -> None:
        with open(p, "wb") as f:
            np.save(f, arr)

    atomic_write(path, write)


def dataset_fingerprint(images: np.ndarray, labels: np.ndarray) -> str:
    """Identity of an evaluation set: its uint8 pixels, shape and labels (sha1, 16 hex)."""
    h = hashlib.sha1(f"v1|{images.shape}|".encode())
    h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
    return h.hexdigest()[:16]


def subset_indices(n: int, subset: int | None, seed: int) -> np.ndarray:
    """`subset` images chosen with a fixed seed (sorted), or all of them."""
    if subset is None or subset >= n:
        return np.arange(n)
    if subset < 1:
        raise UserError(f"--subset must be >= 1, got {subset}")
    return np.sort(np.random.default_rng(seed).choice(n, subset, replace=False))


class SuiteCache:
    """The cached corruption/perturbation arrays of one evaluation set."""

    def __init__(
        self,
        root: str | Path,
        images: np.ndarray,
        labels: np.ndarray,
        table: str,
        seed: int,
        frost_dir: str | None = None,
        progress: bool = False,
    ):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
            raise UserError(f"robustness needs uint8 (N, H, W, 3) images, got {images.shape}")
        self.images, self.labels = images, np.asarray(labels, dtype=np.int64)
        self.table, self.seed, self.progress = table, seed, progress
        self.kind = P.choose_kind(images.shape[1])
        self.fingerprint = dataset_fingerprint(images, self.labels)
        self.dir = Path(root) / f"{self.fingerprint}-{table}-seed{seed}-v{VERSION}"
        self._frost_dir = frost_dir
        self._frost: C.FrostBank | None = None
        self.frost_source = "files" if frost_dir else "procedural"
        self.meta = {
            "version": VERSION,
            "table": table,
            "perturbation_params": self.kind,
            "seed": seed,
            "fingerprint": self.fingerprint,
            "n": len(images),
            "height": int(images.shape[1]),
            "width": int(images.shape[2]),
            "frost": self.frost_source,
            "uint8": "truncation",
        }
        meta_path = self.dir / CACHE_META
        if meta_path.is_file():
            old = read_json(meta_path)
            if old != self.meta:
                raise UserError(
                    f"robustness cache '{meta_path}' does not match this data/table/seed; "
                    "delete that folder to regenerate it"
                )
        else:
            write_json(meta_path, self.meta)
            _save_npy(self.dir / "labels.npy", self.labels)

    def _frost_bank(self) -> C.FrostBank:
        if self._frost is None:
            self._frost = C.FrostBank(self.table, self.images.shape[1:3], self._frost_dir)
        return self._frost

    def _load_or_make(self, path: Path, make) -> np.ndarray:
        if path.is_file():
            try:
                return np.load(path, mmap_mode="r")
            except Exception:
                path.unlink(missing_ok=True)  # damaged: rebuild
        arr = make()
        _save_npy(path, arr)
        return arr

    def corruption(self, name: str) -> np.ndarray:
        """(5 N, H, W, 3) uint8, severity-major."""
        ci = C.ALL.index(name)

        def make() -> np.ndarray:
            n = len(self.images)
            out = np.empty((5 * n,) + self.images.shape[1:], dtype=np.uint8)
            bank = self._frost_bank() if name == "frost" else None
            bar = progress_bar(None, f"corrupt {name}", 5 * n, self.progress)
            for s in range(1, 6):
                rng = np.random.default_rng([self.seed, ci, s])
                for k in range(n):
                    out[(s - 1) * n + k] = C.corrupt(
                        self.images[k], name, s, rng, self.table, frost_bank=bank
                    )
                bar.update(n)
            bar.close()
            return out

        return self._load_or_make(self.dir / "c" / f"{name}.npy", make)

    def perturbation(self, name: str, count: int | None = None) -> np.ndarray:
        """(count or N, T, H, W, 3) uint8: the first `count` images' sequences. One generator
        runs through the images in order, so a shorter file is a prefix of a longer one."""
        pi = P.TEST.index(name)
        n = len(self.images) if count is None else min(count, len(self.images))
        path = self.dir / "p" / f"{name}.npy"
        if path.is_file():
            try:
                arr = np.load(path, mmap_mode="r")
                if len(arr) >= n:
                    return arr[:n]
            except Exception:
                pass
            path.unlink(missing_ok=True)  # too short or damaged: rebuild

        def make() -> np.ndarray:
            t = P.frame_count(name, self.kind)
            out = np.empty((n, t) + self.images.shape[1:], dtype=np.uint8)
            rng = np.random.default_rng([self.seed, 100 + pi])
            it = progress_bar(range(n), f"perturb {name}", n, self.progress)
            for k in it:
                out[k] = P.sequence(self.images[k], name, rng, self.kind)
            return out

        return self._load_or_make(path, make)
