"""Image-set fingerprinting at scale: what `data.fingerprint` costs every command at start-up.

    python bench/fingerprint.py [--files 50000] [--index-entries 1000000] [--cache DIR]
    python bench/fingerprint.py --quick     # 2,000 files, 20,000 entries: a smoke run

Drives the code every command runs when it loads its data (inputs.load_data): `data.load_set`
(the scan) and `fingerprints.set_fingerprint(set, spec, mode)` on

  (a) a class-folder set of --files tiny real PNGs (8x8, 10 class folders), fingerprinted in
      "listing" mode (one stat per file) and "content" mode (every file's bytes hashed);
  (b) an index file of --index-entries lines (written with `data.write_index`, as
      `noisystudent split` does) over as many empty files: load_set (one pass over the index
      for line offsets and labels) and set_fingerprint in listing mode (the index file's bytes
      hashed, then one stat per listed file, its path read back from the index) timed apart.

Both sets are generated once under --cache (default /tmp/ns-bench-fp, outside the repository)
and reused while complete; the 1M empty files need about a million free inodes, checked first
(`df -i`). Fingerprint and scan timings are the best of --reps (3) on a warm page cache; set-up
(generation) runs once and is 0 when reused. Writes bench/results/fingerprint.json (a --quick
run writes <cache>/fingerprint-quick.json instead, unless --out is given) and prints a table.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from noisystudent.data import load_set, write_index
from noisystudent.fingerprints import set_fingerprint
from noisystudent.rundir import write_json
from noisystudent.runtime import cpu_model

ROOT = Path(__file__).resolve().parent
DEFAULT_CACHE = Path("/tmp/ns-bench-fp")
CLASSES = [f"class{c}" for c in range(10)]
PER_DIR = 10_000  # index entries per block; a block's files spread over the 10 class folders
DONE = "complete.txt"  # marker: the set under this folder was written in full (its size inside)


def _complete(d: Path, n: int) -> bool:
    m = d / DONE
    return m.is_file() and m.read_text().strip() == str(n)


def make_folder(d: Path, n: int, seed: int = 0) -> float:
    """n 8x8 RGB PNGs (random pixels, so every file's bytes differ) in 10 class folders, the
    layout data.scan_class_folders reads. Returns the seconds it took (0: reused)."""
    if _complete(d, n):
        return 0.0
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    for c in CLASSES:
        (d / c).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        a = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(a).save(d / CLASSES[i % len(CLASSES)] / f"{i:07d}.png")
    (d / DONE).write_text(f"{n}\n")
    return time.perf_counter() - t0


def _index_uid(i: int) -> str:
    return f"{CLASSES[i % len(CLASSES)]}/{i // PER_DIR:04d}/{i:07d}.png"


def free_inodes(path: Path) -> int | None:
    """Free inodes of the file system holding `path` (what `df -i` shows as IFree); None where
    the file system does not count them (f_files == 0, e.g. btrfs)."""
    while not path.exists():
        path = path.parent
    st = os.statvfs(path)
    return st.f_favail if st.f_files else None


def _index_folders(n: int) -> list[str]:
    return [f"{c}/{k:04d}" for c in CLASSES for k in range((n + PER_DIR - 1) // PER_DIR)]


def check_inodes(cache: Path, need: int) -> None:
    """Refuse, before any file is made, when the file system cannot hold `need` more inodes."""
    free = free_inodes(cache)
    if free is not None and free < need:
        raise SystemExit(
            f"bench/fingerprint.py: the sets need about {need:,} free inodes on the file system "
            f"of '{cache}', which has {free:,} (df -i); give --cache on another file system, or "
            f"fewer --index-entries / --files"
        )


def index_path(d: Path) -> Path:
    return d / "index.tsv"


def make_index(d: Path, n: int) -> float:
    """n empty files under d/images and an index file listing them all (data.write_index, the
    writer `noisystudent split` uses). Returns the seconds it took (0: reused)."""
    if _complete(d, n) and index_path(d).is_file():
        return 0.0
    t0 = time.perf_counter()
    images = d / "images"
    for f in _index_folders(n):
        (images / f).mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT
    for i in range(n):
        os.close(os.open(images / _index_uid(i), flags, 0o644))

    def rows() -> Iterator[tuple[str, str]]:
        for i in range(n):
            yield _index_uid(i), CLASSES[i % len(CLASSES)]

    write_index(index_path(d), images, CLASSES, rows())
    (d / DONE).write_text(f"{n}\n")
    return time.perf_counter() - t0


def best_of(reps: int, fn: Callable[[], object]) -> tuple[float, object]:
    """(the fastest of `reps` calls, in seconds; the last call's result)."""
    times, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def _row(seconds: float, n: int) -> dict:
    return {"seconds": round(seconds, 4), "us_per_entry": round(seconds / n * 1e6, 3)}


def bench_folder(folder: Path, n: int, reps: int) -> dict:
    """(a): scan the class folders, fingerprint the set in both modes, as load_data does."""
    t_scan, s = best_of(reps, lambda: load_set(folder, "labeled"))
    assert len(s) == n, f"{folder} holds {len(s)} images, expected {n}"
    t_list, fp_list = best_of(reps, lambda: set_fingerprint(s, folder, "listing"))
    t_cont, fp_cont = best_of(reps, lambda: set_fingerprint(s, folder, "content"))
    assert fp_list != fp_cont
    return {
        "files": n,
        "classes": len(CLASSES),
        "bytes": sum(os.path.getsize(p) for p in s.paths),
        "load_set": _row(t_scan, n),
        "fingerprint_listing": _row(t_list, n),
        "fingerprint_content": _row(t_cont, n),
    }


def bench_index(index: Path, n: int, reps: int) -> dict:
    """(b): read the index file (load_set), then fingerprint it in listing mode, timed apart."""
    t_read, s = best_of(reps, lambda: load_set(index, "labeled"))
    assert len(s) == n, f"{index} lists {len(s)} images, expected {n}"
    t_list, _ = best_of(reps, lambda: set_fingerprint(s, index, "listing"))
    return {
        "entries": n,
        "index_bytes": index.stat().st_size,
        "load_set": _row(t_read, n),
        "fingerprint_listing": _row(t_list, n),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where the sets are made")
    ap.add_argument("--files", type=int, help="class-folder set size (default 50,000)")
    ap.add_argument("--index-entries", type=int, help="index file lines (default 1,000,000)")
    ap.add_argument("--reps", type=int, default=3, help="timings: best of this many")
    ap.add_argument(
        "--out", type=Path, help="results file (default bench/results/fingerprint.json)"
    )
    ap.add_argument("--quick", action="store_true", help="2,000 files, 20,000 entries (smoke run)")
    args = ap.parse_args()
    files = args.files or (2_000 if args.quick else 50_000)
    entries = args.index_entries or (20_000 if args.quick else 1_000_000)
    if files < len(CLASSES) or entries < 1 or args.reps < 1:
        ap.error(f"--files must be >= {len(CLASSES)}, --index-entries and --reps >= 1")
    default_out = (
        args.cache / "fingerprint-quick.json"
        if args.quick
        else ROOT / "results" / "fingerprint.json"
    )
    out = args.out or default_out
    cache = args.cache.resolve()

    folder = cache / f"folder-{files}"
    idx_dir = cache / f"index-{entries}"
    need = 10_000  # a margin for everyone else on the file system
    if not _complete(folder, files):
        need += files + len(CLASSES)
    if not _complete(idx_dir, entries):
        need += entries + len(_index_folders(entries)) + len(CLASSES)
    check_inodes(cache, need)
    print(f"set-up under {cache} (reused when complete)", flush=True)
    setup_folder = make_folder(folder, files)
    setup_index = make_index(idx_dir, entries)
    index = index_path(idx_dir)

    res: dict = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(),
        "reps": args.reps,
        "cache": str(cache),
        "quick": args.quick,
    }
    res["class_folders"] = {"setup_seconds": round(setup_folder, 2), "reused": not setup_folder,
                            **bench_folder(folder, files, args.reps)}  # fmt: skip
    res["index_file"] = {"setup_seconds": round(setup_index, 2), "reused": not setup_index,
                         **bench_index(index, entries, args.reps)}  # fmt: skip
    write_json(out, res)

    a, b = res["class_folders"], res["index_file"]
    rows = [("class folders", files, "load_set (scan)", a["load_set"]),
            ("class folders", files, "fingerprint listing", a["fingerprint_listing"]),
            ("class folders", files, "fingerprint content", a["fingerprint_content"]),
            ("index file", entries, "load_set (read the index)", b["load_set"]),
            ("index file", entries, "fingerprint listing", b["fingerprint_listing"])]  # fmt: skip
    print(f"\nCPU: {res['cpu']}, {res['cores']} cores; best of {args.reps}, warm page cache")
    print("| set | entries | step | seconds | us/entry |\n|---|---:|---|---:|---:|")
    for what, n, step, r in rows:
        print(f"| {what} | {n:,} | {step} | {r['seconds']:.3f} | {r['us_per_entry']:.2f} |")
    print(
        f"set-up: class folders {setup_folder:.1f} s, index {setup_index:.1f} s (0: reused)\n"
        f"wrote {out}"
    )


if __name__ == "__main__":
    main()
