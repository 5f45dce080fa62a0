"""Pseudo-label store at scale: bytes per image, selection throughput and peak memory.

    python bench/store_scale.py [--sizes 1000000 10000000] [--classes 1000] [--cache DIR]

For each size it writes a synthetic store (C classes, default top-k) with the project's own
shard writer (`store.write_shard` per shard, then `store.write_meta`: the path pseudo-labeling
takes), then, in a fresh subprocess per size (so peak RSS is that of the selection alone),
runs the select stage's selection with `select.mode: reference` (`stages.select.select_rows`:
the streaming `selection.reference_select_stream` over `PseudoLabelStore.iter_chunks`, a
histogram pass and a selection pass) and writes the selected rows as the stage does. Peak RSS
is the child's VmHWM (not ru_maxrss, which on Linux carries the parent's peak over into a
child started by vfork + exec). Writes bench/results/store_scale.json and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from noisystudent.errors import UserError
from noisystudent.rundir import write_json
from noisystudent.rundir.layout import SHARD_PREFIX, STORE_META
from noisystudent.runtime import cpu_model
from noisystudent.store import PseudoLabelStore, default_topk, shard_ranges, write_meta, write_shard

ROOT = Path(__file__).resolve().parent


def make_store(root: Path, n: int, c: int, seed: int = 0, shard: int = 1 << 20) -> float:
    """Synthetic teacher outputs written with the project's shard writer: top-k probabilities
    (a peaked, randomly tempered distribution) over distinct classes with a skewed class prior."""
    if (root / STORE_META).is_file():
        try:
            PseudoLabelStore.load(root)
            return 0.0  # cached from an earlier run
        except UserError:  # an older store version: rebuilt below (same shard names)
            (root / STORE_META).unlink()
    t0 = time.time()
    root.mkdir(parents=True, exist_ok=True)
    k = default_topk(c, None)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # Dirichlet.sample takes no generator: the global one, seeded
    prior = torch.distributions.Dirichlet(torch.full((c,), 0.5)).sample()
    shards = []
    for j, (a, b) in enumerate(shard_ranges(n, shard)):
        m = b - a
        top = torch.multinomial(prior, m, replacement=True, generator=g)
        offs = torch.randperm(c - 1, generator=g)[: k - 1] + 1  # k distinct classes per row
        idx = (top[:, None] + torch.cat([torch.zeros(1, dtype=torch.long), offs])[None]) % c
        logits = torch.randn(m, k, generator=g)
        logits[:, 0] += torch.rand(m, generator=g) * 8
        p = torch.softmax(logits, 1).sort(1, descending=True).values
        uids = [f"part{a // 1_000_000:04d}/img{r:09d}.jpg" for r in range(a, b)]
        shards.append(write_shard(root, j, a, p, idx, torch.arange(a, b), uids, c))
    write_meta(root, c, k, 1.0, {"model": "synthetic"}, shards)
    return time.time() - t0


def _vm_hwm_mb() -> float:
    """Peak resident memory of this process (VmHWM, Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def select_child(store_dir: str, out: str) -> None:
    """Run in a subprocess: select as the select stage does (select.mode reference, threshold
    0.3) and write the rows; print JSON with timing and peak RSS."""
    from noisystudent.config import SelectConfig
    from noisystudent.rundir import save_tensors
    from noisystudent.stages.select import select_rows

    store = PseudoLabelStore.load(store_dir)
    t0 = time.time()
    rows = select_rows(store, SelectConfig(threshold=0.3, mode="reference"), seed=0)
    save_tensors(Path(out), {"rows": rows})
    dt = time.time() - t0
    peak_mb = _vm_hwm_mb()
    print(
        json.dumps(
            {
                "entries": len(store),
                "selected": len(rows),
                "seconds": dt,
                "entries_per_s": len(store) / dt,  # store entries per second, both passes included
                "peak_rss_mb": peak_mb,
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/noisystudent/store_scale"))
    ap.add_argument("--out", default=str(ROOT / "results" / "store_scale.json"))
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return select_child(*args.child)

    c = args.classes
    k = default_topk(c, None)
    result: dict = {"classes": c, "k": k}
    for n in args.sizes:
        d = Path(args.cache) / f"n{n}_c{c}"
        build = make_store(d, n, c)
        files = list(d.glob(f"{SHARD_PREFIX}*"))
        label_bytes = sum(f.stat().st_size for f in files if f.suffix == ".safetensors")
        uid_bytes = sum(f.stat().st_size for f in files if f.suffix == ".uids")
        proc = subprocess.run(
            [sys.executable, __file__, "--child", str(d), str(d / "selected_rows.safetensors")],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        tag = f"{n // 1_000_000}M" if n % 1_000_000 == 0 else str(n)
        result[tag] = {
            "entries": n,
            "selected_rows": r["selected"],
            "entries_per_s": round(r["entries_per_s"]),
            "select_seconds": round(r["seconds"], 2),
            "peak_rss_mb": round(r["peak_rss_mb"], 1),
            "store_build_seconds": round(build, 1),
        }
        if "bytes_per_image" not in result:
            result["bytes_per_image"] = round(
                label_bytes / n, 2
            )  # probabilities + class indices + confidence + the row's int64 image index
            result["uid_bytes_per_image"] = round(
                uid_bytes / n, 2
            )  # the uid text, which any store needs
            result["reference_bytes_per_image"] = 4 * c  # the reference code's float32 full vector
            result["reduction_x"] = round(
                result["reference_bytes_per_image"] / result["bytes_per_image"], 1
            )
            result["reduction_x_with_uids"] = round(
                (4 * c + result["uid_bytes_per_image"])
                / (result["bytes_per_image"] + result["uid_bytes_per_image"]),
                1,
            )
        print(json.dumps({tag: result[tag]}), flush=True)
    tags = [t for t in result if t.endswith("M")]
    if len(tags) >= 2:
        result["peak_rss_ratio_largest_vs_smallest"] = round(
            result[tags[-1]]["peak_rss_mb"] / result[tags[0]]["peak_rss_mb"], 3
        )
    result["command"] = "python bench/store_scale.py " + " ".join(sys.argv[1:])
    result["cpu"], result["cores"] = cpu_model(), os.cpu_count()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json(Path(args.out), result)  # atomic: a killed run leaves the old figures
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
