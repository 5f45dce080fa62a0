"""The pseudo-label store: what a teacher said about every unlabeled image.

On-disk format (version 3), a directory:

    meta.json                 {"format": "noisystudent-pseudo-labels", "version": 3,
                               "num_classes": C, "k": k, "temperature": T, "count": N,
                               "teacher": {...}, "identity": {...},
                               "shards": [{"name", "start", "count"}, ...]}
    shard-00000.safetensors   topk_prob (n, k) float16  teacher probabilities softmax(logits/T),
                                                      sorted descending
                              topk_idx  (n, k) int16    their class indices (int32 if C > 32767)
                              max_prob  (n,)   float32  confidence (= topk_prob[:, 0] in fp32)
                              index     (n,)   int64    the row's image: its position in the
                                                      unlabeled ImageSet at labeling time
                              metadata: format, version, start, count and the identity strings
                              (teacher checkpoint sha256, unlabeled-data fingerprint)
    shard-00000.uids          n lines: the uid (relative path) of each row, in row order (for
                              people; programs join rows to images by `index`)

Shard j holds the rows [start, start + count) of the store: the images of its range of the
unlabeled set, in order, less any found unreadable (so `index` may skip positions, and a row's
index is its image's position, not start + its offset in the shard). k = C (the full vector)
when C <= 100, else 10 by default: the tail of the distribution carries little mass, and at
1,000 classes a row takes 52 bytes (44 + its 8-byte index) instead of the 4,000 of a float32
vector.
`meta.json` is written last, so a store without it is incomplete. Reads are memory-mapped
(safetensors): `iter_chunks` streams a store of any size in bounded memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .errors import UserError
from .rundir import atomic_write, read_json, save_tensors, write_json
from .rundir.layout import SHARD_PREFIX, STORE_META

FORMAT = "noisystudent-pseudo-labels"
VERSION = 3


def default_topk(num_classes: int, topk: int | None) -> int:
    if topk is not None:
        return max(1, min(topk, num_classes))
    return num_classes if num_classes <= 100 else 10


def index_dtype(num_classes: int) -> torch.dtype:
    return torch.int16 if num_classes <= 32767 else torch.int32


def shard_name(j: int) -> str:
    return f"{SHARD_PREFIX}{j:05d}"


def shard_ranges(n: int, shard_size: int) -> list[tuple[int, int]]:
    """Fixed contiguous row ranges [start, end): the same for any number of ranks."""
    return [(s, min(n, s + shard_size)) for s in range(0, n, shard_size)]


def top_k(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, C) probabilities -> their k largest (n, k) float32, descending, and class indices."""
    p, i = probs.float().topk(k, dim=-1)
    return p.cpu(), i.cpu()


def write_shard(
    root: str | Path,
    j: int,
    start: int,
    topk_prob: torch.Tensor,
    topk_idx: torch.Tensor,
    index: torch.Tensor,
    uids: list[str],
    num_classes: int,
    identity: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Write shard j from top-k probabilities (n, k), their class indices (n, k) and each row's
    image index (n,) int64 (its position in the unlabeled ImageSet); `start` (recorded in its
    metadata) is where the shard's range of the unlabeled set begins. Each file atomic, the .uids
    first, so a shard whose .safetensors exists is complete."""
    root = Path(root)
    name = shard_name(j)
    index = torch.as_tensor(index)
    n = len(uids)
    if index.shape != (n,) or topk_prob.shape[0] != n or topk_idx.shape != topk_prob.shape:
        raise ValueError(
            f"shard {j}: {n} uids, index {tuple(index.shape)}, topk_prob "
            f"{tuple(topk_prob.shape)}, topk_idx {tuple(topk_idx.shape)} do not match"
        )
    atomic_write(root / f"{name}.uids", lambda f: f.write_text("".join(u + "\n" for u in uids)))
    meta = {
        "format": FORMAT,
        "version": str(VERSION),
        "start": str(start),
        "count": str(n),
        **{key: str(v) for key, v in (identity or {}).items()},
    }
    save_tensors(
        root / f"{name}.safetensors",
        {
            "topk_prob": topk_prob.half(),
            "topk_idx": topk_idx.to(index_dtype(num_classes)),
            "max_prob": topk_prob[:, 0].float().contiguous(),
            "index": index.to(torch.int64),
        },
        meta,
    )
    return {"name": name, "start": start, "count": n}


def shard_metadata(path: str | Path) -> dict[str, str] | None:
    """The metadata of a shard file, or None when it is missing or unreadable."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:
        return None


def write_meta(
    root: str | Path,
    num_classes: int,
    k: int,
    temperature: float,
    teacher: dict[str, Any],
    shards: list[dict[str, Any]],
    identity: dict[str, str] | None = None,
) -> dict[str, Any]:
    shards = sorted(shards, key=lambda s: s["start"])
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "num_classes": num_classes,
        "k": k,
        "temperature": temperature,
        "count": sum(s["count"] for s in shards),
        "teacher": teacher,
        "identity": identity or {},
        "shards": shards,
    }
    write_json(Path(root) / STORE_META, meta)
    return meta


def store_files(root: str | Path, shards: list[dict[str, Any]]) -> list[Path]:
    root = Path(root)
    out = [root / STORE_META]
    for s in shards:
        out += [root / f"{s['name']}.safetensors", root / f"{s['name']}.uids"]
    return out


def _release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc). Streaming many chunks of varying sizes
    otherwise ratchets glibc's mmap threshold up and fragments the heap, so peak memory grows
    with the rows read (bench/store_scale.py measures it; figures in bench/README.md)."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
        except OSError:
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC: Any = None

# what to do about a store this version cannot read. The folder goes first: a re-run alone
# would find the pseudo-label stage done (its outputs unchanged) and skip it, and keep shards
# whose teacher and data still match.
_RELABEL = (
    "delete '{root}' and re-run `noisystudent pseudo-label` (or `noisystudent run`) to re-label"
)


def _tensor_names(path: Path) -> set[str] | None:
    """The tensors a shard file holds (reads its header only), or None when it is unreadable."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return set(f.keys())
    except Exception:
        return None


class PseudoLabelStore:
    """A complete store. Columns load lazily (memory-mapped safetensors); `iter_chunks` streams."""

    def __init__(self, root: str | Path, meta: dict[str, Any]):
        self.root, self.meta = Path(root), meta
        self._cache: dict[str, Any] = {}

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    def __len__(self) -> int:
        return int(self.meta["count"])

    @classmethod
    def load(cls, root: str | Path, expect: dict[str, str] | None = None) -> PseudoLabelStore:
        """Open a complete store; `expect` (e.g. teacher_sha256, data_fingerprint) must match the
        identity it was written with, else it is refused."""
        root = Path(root)
        mp = root / STORE_META
        if not mp.is_file():
            raise UserError(
                f"no complete pseudo-label store in '{root}' (meta.json missing); "
                f"run `noisystudent pseudo-label` first"
            )
        meta = read_json(mp)
        if meta.get("format") != FORMAT:
            raise UserError(
                f"'{root}' is not a pseudo-label store (meta.json format {meta.get('format')!r}, "
                f"expected {FORMAT!r}); {_RELABEL.format(root=root)}"
            )
        if meta.get("version") != VERSION:
            raise UserError(
                f"pseudo-label store '{root}' is version {meta.get('version')}; this noisystudent "
                f"reads version {VERSION}: {_RELABEL.format(root=root)}"
            )
        for key, want in (expect or {}).items():
            have = meta.get("identity", {}).get(key)
            if have != str(want):
                raise UserError(
                    f"pseudo-label store '{root}' was made with a different {key} "
                    f"({have} != {want}); delete it and re-run pseudo-label"
                )
        pos = 0
        for s in meta["shards"]:
            f = root / f"{s['name']}.safetensors"
            if not f.is_file() or not (root / f"{s['name']}.uids").is_file():
                raise UserError(
                    f"pseudo-label shard '{f}' is missing; delete '{root}' and re-run pseudo-label"
                )
            names = _tensor_names(f)
            if names is None:
                raise UserError(
                    f"pseudo-label shard '{f}' is unreadable; {_RELABEL.format(root=root)}"
                )
            if "index" not in names:
                raise UserError(
                    f"pseudo-label shard '{f}' has no `index` column (written by an older "
                    f"noisystudent); this noisystudent reads version {VERSION}: "
                    f"{_RELABEL.format(root=root)}"
                )
            if s["start"] != pos:
                raise UserError(
                    f"pseudo-label store '{root}' has a gap or overlap at row {pos}; re-run pseudo-label"
                )
            pos += s["count"]
        if pos != meta["count"]:
            raise UserError(
                f"pseudo-label store '{root}' is inconsistent ({pos} rows, {meta['count']} in meta.json)"
            )
        return cls(root, meta)

    # streaming -----------------------------------------------------------------------------
    def iter_chunks(
        self, fields: tuple[str, ...] = ("max_prob", "pred"), chunk: int = 1 << 20
    ) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """Yield (first row, {field: tensor}) over the whole store, at most `chunk` rows at a time,
        reading only those rows (memory-mapped). Fields: max_prob, pred, topk_prob, topk_idx,
        index."""
        for s in self.meta["shards"]:
            with safe_open(str(self.root / f"{s['name']}.safetensors"), framework="pt") as f:
                for a in range(0, s["count"], chunk):
                    b = min(s["count"], a + chunk)
                    out = {}
                    for name in fields:
                        if name == "pred":
                            out[name] = f.get_slice("topk_idx")[a:b][:, 0].long()
                        else:
                            out[name] = f.get_slice(name)[a:b]
                    yield s["start"] + a, out
            _release_free_memory()

    def _column(self, name: str) -> torch.Tensor:
        if name not in self._cache:
            parts = [c[name] for _, c in self.iter_chunks((name,))]
            empty = torch.zeros(0, dtype=torch.long if name in ("pred", "index") else None)
            self._cache[name] = torch.cat(parts) if parts else empty
        return self._cache[name]

    @property
    def max_prob(self) -> torch.Tensor:  # (N,) float32
        return self._column("max_prob")

    @property
    def pred(self) -> torch.Tensor:  # (N,) int64
        return self._column("pred")

    @property
    def topk_prob(self) -> torch.Tensor:  # (N, k) float16
        return self._column("topk_prob")

    @property
    def topk_idx(self) -> torch.Tensor:  # (N, k) int16/int32
        return self._column("topk_idx")

    @property
    def index(self) -> torch.Tensor:  # (N,) int64: each row's position in the unlabeled ImageSet
        return self._column("index")

    @property
    def uids(self) -> list[str]:
        if "uids" not in self._cache:
            u: list[str] = []
            for s in self.meta["shards"]:
                u += (self.root / f"{s['name']}.uids").read_text().splitlines()
            if len(u) != len(self):
                raise UserError(
                    f"pseudo-label store '{self.root}' has {len(u)} uids for {len(self)} rows; re-run pseudo-label"
                )
            self._cache["uids"] = u
        return self._cache["uids"]

    def dense(self, rows: torch.Tensor) -> torch.Tensor:
        """Full (len(rows), C) probability vectors for the given rows; a truncated top-k vector
        is renormalised to sum to 1."""
        p = self.topk_prob[rows].float()
        out = torch.zeros(len(rows), self.num_classes)
        out.scatter_(1, self.topk_idx[rows].long(), p)
        return out / out.sum(1, keepdim=True).clamp_min(1e-12)
