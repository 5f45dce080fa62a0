"""Sharded pseudo-labeling: the teacher, without noise, labels fixed row ranges of the unlabeled
set, one store shard per range (store.py format).

The ranges are `store.shard_ranges(N, shard_size)`, the same for any number of processes; under
torchrun rank r labels shards r, r + world, r + 2*world, ... (disjoint, contiguous, no padding
duplicates). A shard file is complete once written (atomic), and records the teacher
checkpoint's sha256 and the data fingerprint: a re-run skips the shards already there, so a
killed job re-labels only the missing ones; a shard made by another teacher or for other data
is refused rather than mixed in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .augment import ViewDataset
from .data import ImageSet
from .engine import predict
from .errors import UserError
from .runtime import Runtime
from .store import (
    VERSION,
    _release_free_memory,
    shard_metadata,
    shard_name,
    shard_ranges,
    top_k,
    write_shard,
)

# malloc_trim every this many batches within a shard: without it the heap of freed decode
# buffers grows with the rows labeled, so a long pass peaks higher than a short one
# (bench/store_scale.py; bench/README.md).
TRIM_EVERY_BATCHES = 32


def check_shard(root: Path, j: int, start: int, count: int, identity: dict[str, str]) -> bool:
    """True if shard j is complete and was made for this identity and range; False if it must
    be labeled (again): absent, unreadable, of an older store format, or made by another teacher
    or for other images (the stage's inputs changed since: it is deleted here)."""
    path = root / f"{shard_name(j)}.safetensors"
    if not path.is_file():
        return False
    md = shard_metadata(path)
    if (
        md is None
        or not (root / f"{shard_name(j)}.uids").is_file()
        or md.get("version") != str(VERSION)
    ):
        path.unlink(missing_ok=True)  # unreadable, or an older store format: re-label it
        return False
    if any(md.get(key) != str(want) for key, want in identity.items()):
        path.unlink(missing_ok=True)
        (root / f"{shard_name(j)}.uids").unlink(missing_ok=True)
        return False
    if md.get("start") != str(start) or md.get("rows_in_range") != str(count):
        raise UserError(
            f"pseudo-label shard '{path}' covers other rows (shard size changed); delete '{root}' and re-run"
        )
    return True


def label_shards(
    model: nn.Module,
    images: ImageSet,
    size: int,
    root: Path,
    num_classes: int,
    k: int,
    temperature: float,
    identity: dict[str, str],
    shard_size: int,
    batch: int,
    rt: Runtime,
    workers: int = 0,
) -> list[int]:
    """Label this rank's missing shards; returns the shard numbers it wrote. Each shard's rows
    are predicted on the clean eval view (ViewDataset without transform) in eval mode."""
    root.mkdir(parents=True, exist_ok=True)
    written = []
    ranges = shard_ranges(len(images), shard_size)
    for j in range(rt.rank, len(ranges), rt.world):
        a, b = ranges[j]
        if check_shard(root, j, a, b - a, identity):
            continue
        sub = images.subset(np.arange(a, b))
        ps, ix, rows = [], [], []
        for logits, idx in predict(
            model,
            ViewDataset(sub, size),
            batch,
            rt,
            workers,
            f"pseudo-label shard {j + 1}/{len(ranges)}",
            job_images=len(images) // rt.world,  # compile: auto decides once for this rank's work
        ):
            p, i = top_k(torch.softmax(logits / temperature, dim=1), k)
            ps.append(p)
            ix.append(i)
            rows.append(idx)
            if len(rows) % TRIM_EVERY_BATCHES == 0:
                _release_free_memory()  # decode buffers: else the heap grows with a shard's rows
        # images skipped as unreadable leave the shard; the index (and the uids) say which
        # images the rows are: predict yields positions in `sub`, the range starts at image a
        r = torch.cat(rows).long() if rows else torch.zeros(0, dtype=torch.long)
        p = torch.cat(ps) if ps else torch.zeros(0, k)
        i = torch.cat(ix) if ix else torch.zeros(0, k, dtype=torch.long)
        uids = [sub.uids[t] for t in r.tolist()]
        ident = {**identity, "rows_in_range": str(b - a)}
        write_shard(root, j, a, p, i, a + r, uids, num_classes, ident)
        written.append(j)
        del sub, ps, ix, rows, r, p, i, uids
        _release_free_memory()  # glibc keeps freed decode buffers otherwise (see store.py)
    return written


def collect_shards(
    root: Path, n: int, shard_size: int, identity: dict[str, str]
) -> list[dict[str, Any]]:
    """The shard entries for meta.json, after every rank finished (all must be present)."""
    out, pos = [], 0
    for j, (a, b) in enumerate(shard_ranges(n, shard_size)):
        if not check_shard(root, j, a, b - a, identity):
            raise UserError(
                f"pseudo-label shard {j} is missing in '{root}' after labeling; re-run pseudo-label"
            )
        md = shard_metadata(root / f"{shard_name(j)}.safetensors") or {}
        cnt = int(md.get("count", b - a))
        out.append({"name": shard_name(j), "start": pos, "count": cnt, "range": [a, b]})
        pos += cnt
    return out
