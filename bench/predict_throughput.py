"""`noisystudent predict` throughput against the bare model, and its peak memory at 10k vs 100k
images.

    python bench/predict_throughput.py [--model cifar_resnet20] [--batch-size 256]
                                       [--workers 0] [--precision auto] [--reps 2]
                                       [--sizes 10000 100000] [--quick]
                                       [--data TAR] [--cache DIR] [--out JSON]

Images: the CIFAR-10 test set as JPEG files (../shared/data/cifar10-jpg.tar.gz, extracted once
under ~/.cache/noisystudent/cifar10 as bench/cifar10_ssl.py does), listed in an index file
(`noisystudent split` format) repeated to the size asked for. The model: --model randomly
initialised (throughput does not depend on the weights), saved with artifacts.save_model into
a temporary run directory whose config sets the precision, `compile: off` (so 10k and 100k
images take the same numeric path; `compile: auto` would compile from 40,000 images on), the
batch size and the reading workers. Each measurement runs in a fresh process:

  predict   `noisystudent predict RUN INDEX --out FILE.csv` (cli.main in that process): its
            images/s from its own last line (the streaming loop: reading and decoding every
            JPEG, the eval view, the model, top-1 rows written), the whole command's wall time,
            and the process's peak resident memory (VmHWM) at each --sizes;
  bare      the same weights in a plain torch loop over the same images decoded beforehand
            into one uint8 tensor (decoding not timed), at the same precision and memory format
            (autocast as runtime.Runtime.amp says, channels_last), no_grad, eval mode.

Writes bench/results/predict_throughput.json (cpu = runtime.cpu_model()) with the ratio
predict / bare at the first size and the peak-memory ratio of the last size to the first.
--quick: cifar_resnet8, 1,000 and 3,000 images, one repetition (a smoke run).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_TAR = ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz"
DEFAULT_CACHE = Path.home() / ".cache" / "noisystudent" / "cifar10"
TEST = "test"  # the CIFAR archive's class-folder test set (a dataset folder, not a run's)
SIZE = 32
LAST_LINE = re.compile(r"predicted (\d+) images in ([\d.]+)s \(([\d.]+) images/s\)")


def extract(tar: Path, cache: Path) -> Path:
    """The CIFAR-10 test class folders, extracted once by bench/cifar10_ssl.py's helper."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ is not a package
    from cifar10_ssl import extract as extract_cifar

    extract_cifar(tar, cache, "predict_throughput")
    return cache / TEST


def make_index(test: Path, n: int, path: Path) -> Path:
    """An index file of n images: the test JPEGs in order, repeated."""
    from noisystudent.data import scan_class_folders, write_index

    base = scan_class_folders(test, "test")
    rows = ((base.uids[j % len(base)], base.classes[base.labels[j % len(base)]]) for j in range(n))
    write_index(path, test, base.classes, rows)
    return path


def make_run(root: Path, model_name: str, args) -> Path:
    """A run directory holding one randomly initialised model (iteration 0) and the config
    that sets predict's precision, compile, batch size and workers."""
    from noisystudent.artifacts import model_meta, save_model
    from noisystudent.config import load_config
    from noisystudent.models import create_model
    from noisystudent.rundir import RunLayout

    lay = RunLayout(root)
    torch.manual_seed(0)
    classes = sorted(p.name for p in args.test.iterdir() if p.is_dir())
    model = create_model(model_name, len(classes))
    save_model(lay.it(0), model, model_meta(model_name, 0, classes, SIZE, model, None, None))
    cfg = load_config(None, [f"run_dir={root}", f"models=[{model_name}]",
                             f"data.image_size={SIZE}", f"data.num_workers={args.workers}",
                             f"precision={args.precision}", "compile=off", "progress=false",
                             f"eval_batch_size={args.batch_size}", f"device={args.device}"])  # fmt: skip
    lay.config.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return root


def vm_hwm_mb() -> float:
    """Peak resident memory of this process (VmHWM; not ru_maxrss, which a child inherits)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def child_predict(run: str, index: str, out: str) -> dict:
    """`noisystudent predict RUN INDEX --out OUT` in this (fresh) process."""
    from noisystudent import cli

    buf = io.StringIO()
    t = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(["predict", run, index, "--out", out])
    wall = time.perf_counter() - t
    if rc != 0:
        sys.exit(f"predict failed ({rc}): {buf.getvalue()}")
    m = LAST_LINE.search(buf.getvalue().strip().splitlines()[-1])
    assert m, buf.getvalue()
    return {"images": int(m.group(1)), "images_per_s": float(m.group(3)),
            "loop_s": float(m.group(2)), "command_wall_s": round(wall, 2),
            "peak_rss_mb": round(vm_hwm_mb(), 1), "last_line": buf.getvalue().splitlines()[-1]}  # fmt: skip


@torch.no_grad()
def child_bare(run: str, index: str) -> dict:
    """The same weights, a plain loop over the images decoded beforehand (the eval view)."""
    import noisystudent
    from noisystudent.data import read_index

    clf = noisystudent.load(run, device=None)  # the run's device, precision; `.module` is bare
    s = read_index(index, "test")
    x = torch.stack([clf.transform(s.image(i)) for i in range(len(s))])  # decoding: not timed
    model, amp, dev = clf.module, clf.runtime.amp, clf.runtime.device
    model.eval().to(dev, memory_format=torch.channels_last)
    b = clf.batch_size

    def run_all() -> None:
        for k in range(0, len(x), b):
            xb = x[k : k + b].to(dev).contiguous(memory_format=torch.channels_last)
            with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
                model(xb).float().cpu()

    run_all_warm = x[:b].to(dev).contiguous(memory_format=torch.channels_last)
    with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
        model(run_all_warm)  # first call: one-off allocations
    t = time.perf_counter()
    run_all()
    dt = time.perf_counter() - t
    return {"images": len(x), "images_per_s": round(len(x) / dt, 1), "loop_s": round(dt, 2),
            "precision": str(amp or torch.float32)}  # fmt: skip


def spawn(*args: str) -> dict:
    cmd = [sys.executable, __file__, "--child", *args]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="cifar_resnet20")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--workers", type=int, default=0, help="data.num_workers of the run")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=2, help="repetitions at the first size (best)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--quick", action="store_true", help="smoke run: resnet8, 1k and 3k images")
    ap.add_argument("--data", type=Path, default=DEFAULT_TAR)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / "predict_throughput.json"
    )
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        what, *rest = args.child
        res = child_predict(*rest) if what == "predict" else child_bare(*rest)
        print(json.dumps(res), flush=True)
        return
    if args.quick:
        args.model, args.sizes, args.reps = "cifar_resnet8", [1_000, 3_000], 1
    from noisystudent.runtime import cpu_model

    args.test = extract(args.data, args.cache)
    work = Path(tempfile.mkdtemp(prefix="ns-predict-bench-"))
    t_all = time.time()
    try:
        run = str(make_run(work / "run", args.model, args))
        idx = {n: str(make_index(args.test, n, work / f"images{n}.tsv")) for n in args.sizes}
        first = args.sizes[0]
        bare = [spawn("bare", run, idx[first]) for _ in range(args.reps)]
        print("bare:", json.dumps(bare), flush=True)
        pred = {}
        for n in args.sizes:
            reps = args.reps if n == first else 1
            rows = [spawn("predict", run, idx[n], str(work / f"out{n}.csv")) for _ in range(reps)]
            print(f"predict {n}:", json.dumps(rows), flush=True)
            pred[n] = max(rows, key=lambda r: r["images_per_s"])
            pred[n]["images_per_s_all"] = [r["images_per_s"] for r in rows]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    best_bare = max(r["images_per_s"] for r in bare)
    out = {
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "model": args.model,
        "image_size": SIZE,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "device": args.device,
        "precision": bare[0]["precision"],
        "compile": "off",
        "quick": args.quick,
        "images": "CIFAR-10 test JPEGs (an index file, repeated to each size)",
        "bare": {
            "images_per_s": best_bare,
            "runs": [r["images_per_s"] for r in bare],
            "median": statistics.median(r["images_per_s"] for r in bare),
        },  # fmt: skip
        "predict": {str(n): r for n, r in pred.items()},
        "predict_vs_bare": round(pred[first]["images_per_s"] / best_bare, 3),
        "peak_rss_ratio": round(
            pred[args.sizes[-1]]["peak_rss_mb"] / pred[first]["peak_rss_mb"], 3
        ),
        "wall_s": round(time.time() - t_all, 1),
        "command": " ".join(["python bench/predict_throughput.py", *sys.argv[1:]]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: out[k] for k in ("predict_vs_bare", "peak_rss_ratio", "bare")}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
