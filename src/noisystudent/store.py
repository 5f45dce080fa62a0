"""The pseudo-label store: what a teacher said about every unlabeled image.

On-disk format (version 1), a directory:

    meta.json                 {"format": "noisystudent-pseudo-labels", "version": 1,
                               "num_classes": C, "k": k, "temperature": T, "count": N,
                               "teacher": {...}, "shards": [{"name", "count"}, ...]}
    shard-00000.safetensors   topk_prob (n, k) float16  teacher probabilities softmax(logits/T),
                                                      sorted descending
                              topk_idx  (n, k) int32    their class indices
                              max_prob  (n,)   float32  confidence (= topk_prob[:, 0] in fp32)
    shard-00000.uids          n lines: the uid (relative path) of each row, in row order

k = C (the full vector) when C <= 100, else 10 by default: the tail of the distribution carries
little mass and the store stays small for many classes. Rows are in the order the unlabeled set
was read. `meta.json` is written last, so a store without it is incomplete.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .rundir import atomic_write, load_tensors, read_json, save_tensors, write_json

FORMAT = "noisystudent-pseudo-labels"
VERSION = 1


def default_topk(num_classes: int, topk: int | None) -> int:
    if topk is not None:
        return max(1, min(topk, num_classes))
    return num_classes if num_classes <= 100 else 10


class StoreWriter:
    """Append batches of probabilities; flushes a shard every `shard_size` rows."""

    def __init__(
        self,
        root: str | Path,
        num_classes: int,
        k: int,
        temperature: float,
        teacher: dict[str, Any],
        shard_size: int = 65536,
    ):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "meta.json").unlink(missing_ok=True)
        self.num_classes, self.k, self.temperature = num_classes, k, temperature
        self.teacher = teacher
        self.shard_size = shard_size
        self.shards: list[dict[str, Any]] = []
        self._buf: list[tuple[torch.Tensor, torch.Tensor, list[str]]] = []
        self._n = 0

    def add(self, probs: torch.Tensor, uids: list[str]) -> None:
        """probs: (n, C) probabilities of one batch; uids: their n uids."""
        p, i = probs.float().topk(self.k, dim=-1)
        self._buf.append((p.cpu(), i.to(torch.int32).cpu(), list(uids)))
        self._n += len(uids)
        if self._n >= self.shard_size:
            self._flush()

    def _flush(self) -> None:
        if not self._buf:
            return
        p = torch.cat([b[0] for b in self._buf])
        i = torch.cat([b[1] for b in self._buf])
        uids = [u for b in self._buf for u in b[2]]
        name = f"shard-{len(self.shards):05d}"
        save_tensors(
            self.root / f"{name}.safetensors",
            {"topk_prob": p.half(), "topk_idx": i, "max_prob": p[:, 0].contiguous()},
        )
        atomic_write(self.root / f"{name}.uids", lambda f: f.write_text("\n".join(uids) + "\n"))
        self.shards.append({"name": name, "count": len(uids)})
        self._buf, self._n = [], 0

    def close(self) -> dict[str, Any]:
        self._flush()
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "num_classes": self.num_classes,
            "k": self.k,
            "temperature": self.temperature,
            "count": sum(s["count"] for s in self.shards),
            "teacher": self.teacher,
            "shards": self.shards,
        }
        write_json(self.root / "meta.json", meta)
        return meta

    def files(self) -> list[Path]:
        out = [self.root / "meta.json"]
        for s in self.shards:
            out += [self.root / f"{s['name']}.safetensors", self.root / f"{s['name']}.uids"]
        return out


@dataclass
class PseudoLabelStore:
    """A complete store, read into memory: uids, top-k probabilities and indices, confidence."""

    meta: dict[str, Any]
    uids: list[str]
    topk_prob: torch.Tensor  # (N, k) float16
    topk_idx: torch.Tensor  # (N, k) int32
    max_prob: torch.Tensor  # (N,) float32

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    @property
    def pred(self) -> torch.Tensor:
        return self.topk_idx[:, 0].long()

    @classmethod
    def load(cls, root: str | Path) -> PseudoLabelStore:
        root = Path(root)
        mp = root / "meta.json"
        if not mp.is_file():
            raise UserError(
                f"no complete pseudo-label store in '{root}' (meta.json missing); run `noisystudent pseudo-label` first"
            )
        meta = read_json(mp)
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise UserError(
                f"'{mp}' is format {meta.get('format')} v{meta.get('version')}; this noisystudent reads {FORMAT} v{VERSION}"
            )
        ps, ix, mx, uids = [], [], [], []
        for s in meta["shards"]:
            t = load_tensors(root / f"{s['name']}.safetensors")
            ps.append(t["topk_prob"])
            ix.append(t["topk_idx"])
            mx.append(t["max_prob"])
            uids += (root / f"{s['name']}.uids").read_text().splitlines()
        k, c = meta["k"], meta["num_classes"]
        empty = (
            torch.zeros(0, k, dtype=torch.float16),
            torch.zeros(0, k, dtype=torch.int32),
            torch.zeros(0),
        )
        store = cls(
            meta,
            uids,
            torch.cat(ps) if ps else empty[0],
            torch.cat(ix) if ix else empty[1],
            torch.cat(mx) if mx else empty[2],
        )
        if len(uids) != meta["count"] or len(store.max_prob) != meta["count"]:
            raise UserError(
                f"pseudo-label store '{root}' is inconsistent ({len(uids)} uids, {meta['count']} rows in meta); delete it and re-run pseudo-label"
            )
        if store.topk_idx.shape[1] != k or (len(uids) and int(store.topk_idx.max()) >= c):
            raise UserError(
                f"pseudo-label store '{root}' has class indices outside its {c} classes; delete it and re-run pseudo-label"
            )
        return store

    def dense(self, rows: torch.Tensor) -> torch.Tensor:
        """Full (len(rows), C) probability vectors for the given rows; a truncated top-k vector
        is renormalised to sum to 1."""
        p = self.topk_prob[rows].float()
        out = torch.zeros(len(rows), self.num_classes)
        out.scatter_(1, self.topk_idx[rows].long(), p)
        return out / out.sum(1, keepdim=True).clamp_min(1e-12)
