"""Training and pseudo-labeling throughput against a plain PyTorch loop and the bare model.

    python bench/throughput.py [--model cifar_resnet20] [--size 32] [--reps 3] [--steps 20]
                               [--label-images 46000] [--compiled-steps 120] [--memory]

Measured side by side in one process (median of --reps):
  (a) plain loop: the same model, synthetic tensors in memory, fp32, eager, channels-first;
  (b) bare-model limit: the same synthetic tensors with the project's precision and memory
      format (runtime.autocast_dtype: bf16 only where the CPU/GPU runs it natively;
      channels_last);
  (c) the project's real student training (engine.train, as the train stage calls it) on
      CIFAR-10 JPEGs decoded through the project's data code, RandAugment, the labeled +
      unlabeled (ratio 3) mix, checkpoint and logging; a run this short is not compiled under
      the default `compile: auto`; a long run is, so the same loop is also run with `compile:
      on` for --compiled-steps steps and its steady-state images/s (from the loop's own log
      lines, every engine.LOG_EVERY steps, after the first, which includes compiling) reported
      as `c_train_compiled` with the ratios `train_compiled_vs_plain` and
      `train_compiled_vs_limit`;
  (d) the project's real pseudo-labeling (labeling.label_shards: teacher inference + store
      shards written) of --label-images images (CIFAR-10-4k's 46,000 unlabeled by default,
      which `compile: auto` labels through the frozen compiled copy, compile time included),
      against (a) and (b) in inference mode.
Images/s count every image through the model (labeled + unlabeled for training). Writes
bench/results/throughput.json with `ratios` (train_vs_plain c/a, train_vs_limit c/b,
label_vs_plain d/a, label_vs_limit d/b) beside the raw figures, and prints them.
--memory adds `pseudo_label_memory`: the peak resident memory of pseudo-labeling 50,000 and
500,000 images (an unlabeled index file of the CIFAR train JPEGs repeated, each image read from
its file, each size in a fresh process: `--memory-probe N`), per shard and overall, and the
ratio of the two.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from noisystudent import engine
from noisystudent.augment import ViewDataset, batch_train_view
from noisystudent.checkpoint import Checkpoint
from noisystudent.config import TrainConfig
from noisystudent.data import (
    ImageSet,
    decode_to_array,
    load_set,
    scan_class_folders,
    write_index,
)
from noisystudent.labeling import label_shards
from noisystudent.models import create_model
from noisystudent.rundir import RunDir
from noisystudent.rundir.layout import SHARD_PREFIX
from noisystudent.runtime import Runtime, autocast_dtype, cpu_model

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path.home() / ".cache" / "noisystudent" / "cifar10"
# the CIFAR archive's class-folder sets (dataset folders, not run-directory ones)
TRAIN = "train"


def synthetic(model, x, y, steps, train_mode, amp, channels_last) -> float:
    """images/s of a bare loop over in-memory tensors."""
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train(train_mode)

    def step():
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            if not train_mode:
                with torch.no_grad():
                    return model(x)
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * len(x) / (time.perf_counter() - t)


def _vm_hwm_mb() -> float:
    """Peak resident memory of this process (VmHWM). Not ru_maxrss: Linux carries that over
    from the parent across fork + exec, so a child would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def _reset_hwm() -> bool:
    """Restart VmHWM from the current RSS (Linux clear_refs "5"); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class ShardPeaks:
    """Peak RSS per shard of a labeling pass: a thread polls, once a second, the number of shard
    files written, and at each new one records VmHWM (the peak since the last reset) and resets
    it. Polling, not a hook, so the probe runs the library's label_shards unchanged; a peak is
    attributed to the shard being labeled within a second."""

    def __init__(self, root: Path):
        self.root, self.peaks, self.ok = root, [], _reset_hwm()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(1.0):
            self._check()

    def _check(self) -> None:
        shards = self.root.glob(f"{SHARD_PREFIX}*.safetensors") if self.root.is_dir() else []
        done = len(list(shards))
        while self.ok and len(self.peaks) < done:
            self.peaks.append(round(_vm_hwm_mb(), 1))
            _reset_hwm()

    def stop(self) -> list[float]:
        self._stop.set()
        self._thread.join()
        self._check()
        return self.peaks


def tiled_index(data: Path, n: int, work: Path) -> Path:
    """An index file (`noisystudent split` format) of n unlabeled images: the CIFAR train JPEGs
    repeated, each repetition k under its own root entry rk/ (a link to the train folder), so
    every line is a distinct uid of a real file. Streamed to the file by data.write_index."""
    base = scan_class_folders(data, "unlabeled")
    reps = -(-n // len(base))
    (work / "root").mkdir(parents=True)
    for k in range(reps):
        (work / "root" / f"r{k}").symlink_to(data.resolve(), target_is_directory=True)
    path = work / "unlabeled.tsv"
    rows = (
        (f"r{j // len(base)}/{base.uids[j % len(base)]}", base.classes[base.labels[j % len(base)]])
        for j in range(n)
    )
    write_index(path, work / "root", base.classes, rows)
    return path


def memory_probe(args) -> None:
    """One pseudo-labeling pass over args.memory_probe images in this fresh process, as a user's
    run does it: an unlabeled index file (the CIFAR train JPEGs repeated, tiled_index) loaded
    with the data code, every image read from its file per batch (too large to cache); prints
    the peak resident memory, overall and per shard."""
    work = Path(tempfile.mkdtemp(prefix="ns-memory-"))
    images = load_set(tiled_index(args.data, args.memory_probe, work), "unlabeled")
    rss0 = _vm_hwm_mb()
    t = time.perf_counter()
    trace = ShardPeaks(work / "store")
    label_shards(create_model(args.model, 10).eval(), images, args.size, work / "store", 10, 10,
                 1.0, {"bench": "1"}, 65536, 256, Runtime(torch.device("cpu")))  # fmt: skip
    wall = time.perf_counter() - t
    per_shard = trace.stop()
    peak = max([_vm_hwm_mb(), *per_shard])  # per_shard is empty where VmHWM cannot be reset
    store = sum(f.stat().st_size for f in (work / "store").rglob("*") if f.is_file())
    shutil.rmtree(work)
    print(json.dumps({"images": len(images), "peak_rss_mb": round(peak, 1),
                      "rss_before_labeling_mb": round(rss0, 1), "peak_per_shard_mb": per_shard,
                      "wall_s": round(wall, 1), "images_per_s": round(len(images) / wall, 1),
                      "store_mb": round(store / 2**20, 1)}))  # fmt: skip


def memory(args) -> dict:
    """Peak RSS of pseudo-labeling 50k and 500k images, each in a fresh process."""
    out = {}
    for n in (50_000, 500_000):
        cmd = [sys.executable, __file__, "--memory-probe", str(n), "--model", args.model,
               "--size", str(args.size), "--data", str(args.data)]  # fmt: skip
        res = subprocess.run(cmd, check=True, capture_output=True, text=True)
        out[str(n)] = json.loads(res.stdout.strip().splitlines()[-1])
        print(json.dumps(out[str(n)]), flush=True)
    out["peak_ratio_500k_vs_50k"] = round(
        out["500000"]["peak_rss_mb"] / out["50000"]["peak_rss_mb"], 3
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="cifar_resnet20")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64, help="labeled batch; unlabeled = 3x")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--label-images",
        type=int,
        default=46_000,
        help="images pseudo-labeled in (d); CIFAR-10-4k's unlabeled set by default",
    )
    ap.add_argument(
        "--compiled-steps",
        type=int,
        default=120,
        help=f"steps of the compiled student run (up to {engine.LOG_EVERY}: skip it; it needs "
        f"a log line before its last one, every {engine.LOG_EVERY} steps)",
    )
    ap.add_argument("--data", type=Path, default=CACHE / TRAIN, help="CIFAR-10 class folders")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "throughput.json")
    ap.add_argument("--memory", action="store_true", help="also pseudo-label 50k and 500k images")
    ap.add_argument("--memory-probe", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_probe:
        return memory_probe(args)
    if not args.data.is_dir():
        sys.exit(
            f"throughput: '{args.data}' not found; extract ../shared/data/cifar10-jpg.tar.gz there"
        )
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    rt = Runtime(cpu)  # what a run on this CPU uses: precision auto, compile auto
    amp = autocast_dtype(cpu, rt.precision)
    n_train = args.batch * 4  # labeled + 3x unlabeled in one forward pass
    x = torch.rand(n_train, 3, args.size, args.size)
    y = torch.randint(0, 10, (n_train,))
    xi = torch.rand(256, 3, args.size, args.size)
    new = lambda: create_model(args.model, 10, 0.3, 0.2)  # noqa: E731

    images = scan_class_folders(args.data, "labeled")
    n_need = max(n_train * max(args.steps, args.compiled_steps) + 4000, args.label_images)
    pick = np.random.default_rng(0).permutation(len(images))[:n_need]
    work = Path(tempfile.mkdtemp(prefix="ns-throughput-"))
    images = decode_to_array(images.subset(pick), args.size, work / "decoded", "bench", False)
    n_l = 4000
    lab = images.subset(np.arange(n_l))
    n_u = 3 * args.batch  # the unlabeled images of one step
    unl = images.subset(np.arange(n_l, n_l + n_u * args.steps))
    unl_long = images.subset(np.arange(n_l, n_l + n_u * args.compiled_steps))
    to_label = images.subset(np.arange(min(args.label_images, len(images))))
    per_image, batch_aug = batch_train_view(args.size, True, True, "rand-m9-n2")  # as train_stage
    tc = TrainConfig(epochs=1, batch_size=args.batch, ratio=3, randaugment="rand-m9-n2",
                     drop_rate=0.3, drop_path_rate=0.2, checkpoint_every_steps=0)  # fmt: skip

    def student(run: RunDir, u: ImageSet, rt: Runtime) -> tuple[float, int]:
        """The real student loop (engine.train) for one epoch over `u`, with a checkpoint at the
        epoch's end and its events in run's metrics, as the train stage has them; (seconds,
        steps)."""
        targets = torch.softmax(torch.randn(len(u), 10), 1)
        data = engine.TrainData(ViewDataset(lab, args.size, per_image), torch.from_numpy(lab.labels),
                                ViewDataset(u, args.size, per_image), targets, batch_aug)  # fmt: skip
        ckpt = Checkpoint(run.it(1).checkpoint, every=tc.checkpoint_every_steps)
        t = time.perf_counter()
        out = engine.train(new(), data, tc, ckpt, run.logger("bench"), rt, 0, "bench")
        return time.perf_counter() - t, out.steps

    res: dict[str, list[float]] = {
        k: [] for k in ("a_train", "b_train", "c_train", "a_infer", "b_infer", "d_label")
    }
    for r in range(args.reps):
        res["a_train"].append(synthetic(new(), x, y, args.steps, True, None, False))
        res["b_train"].append(synthetic(new(), x, y, args.steps, True, amp, True))
        res["a_infer"].append(synthetic(new().eval(), xi, None, args.steps, False, None, False))
        res["b_infer"].append(synthetic(new().eval(), xi, None, args.steps, False, amp, True))
        # (c) one epoch of the real student loop: len(unl) // (3 * batch) = `steps` steps; a run
        # this short is not compiled under `compile: auto` (runtime.COMPILE_TRAIN_MIN_STEPS)
        sec, steps = student(RunDir(work / f"run{r}"), unl, rt)
        res["c_train"].append(steps * n_train / sec)
        # (d) real pseudo-labeling of --label-images images into store shards, with the
        # default `compile: auto` (compiled and frozen from 40,000 images, compile time included)
        t = time.perf_counter()
        label_shards(new(), to_label, args.size, work / f"store{r}", 10, 10, 1.0, {"bench": "1"},
                     65536, 256, rt)  # fmt: skip
        res["d_label"].append(len(to_label) / (time.perf_counter() - t))
        print(json.dumps({k: round(v[-1], 1) for k, v in res.items()}), flush=True)

    # (c, long run) the student loop with torch.compile, as `compile: auto` does for runs of
    # >= COMPILE_TRAIN_MIN_STEPS steps: steady-state images/s from the loop's own log lines
    # (every engine.LOG_EVERY steps, after the first, which includes compiling), and the
    # compile time (the run's time less its steps after the 10th at the steady rate)
    compiled = {}
    if args.compiled_steps > engine.LOG_EVERY:  # at least two log lines
        run = RunDir(work / "run_compiled")
        sec, steps = student(run, unl_long, Runtime(cpu, rt.precision, "on"))
        ev = [e for e in run.metrics() if e.get("event") == "train"]
        rate = (ev[-1]["step"] - ev[0]["step"]) * n_train / (ev[-1]["time"] - ev[0]["time"])
        compiled = {"c_train_compiled": round(rate, 1), "steps": steps,
                    "compile_and_first_10_steps_s": round(sec - (steps - 10) * n_train / rate, 1),
                    "wall_s": round(sec, 1)}  # fmt: skip
        print(json.dumps(compiled), flush=True)

    med = {k: round(statistics.median(v), 1) for k, v in res.items()}
    out = {
        "model": args.model, "size": args.size, "batch_labeled": args.batch, "ratio": 3,
        "precision": str(amp or torch.float32), "cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(), "images_per_s": med, "reps": args.reps,
        "label_images": len(to_label), "compiled_training": compiled,
        "ratios": {
            "train_vs_plain": round(med["c_train"] / med["a_train"], 3),
            "train_vs_limit": round(med["c_train"] / med["b_train"], 3),
            "label_vs_plain": round(med["d_label"] / med["a_infer"], 3),
            "label_vs_limit": round(med["d_label"] / med["b_infer"], 3),
        },
        "command": "python bench/throughput.py " + " ".join(sys.argv[1:]),
    }  # fmt: skip
    if compiled:  # long runs (compile: auto compiles them): the same ratios, steady state
        out["ratios"]["train_compiled_vs_plain"] = round(
            compiled["c_train_compiled"] / med["a_train"], 3
        )
        out["ratios"]["train_compiled_vs_limit"] = round(
            compiled["c_train_compiled"] / med["b_train"], 3
        )
    if args.memory:
        out["pseudo_label_memory"] = memory(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
