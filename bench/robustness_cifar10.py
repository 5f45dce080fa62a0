"""Robustness of a CIFAR-10 teacher and its Noisy Student, in the style of the paper's robustness tables.

Trains a teacher and one student through the project's own pipeline (`pipeline.run_pipeline`,
the same code as `noisystudent run`) on CIFAR-10 with 400 labels per class, then evaluates both
with the robustness suite (`pipeline.run_robustness`, the code of `noisystudent robustness`) on
a seeded subset of the test set, normalising mCE and mFR by the teacher (iteration 0). Writes
bench/results/robustness_cifar10.json and prints the table.

    # data: extract /work/shared/data/cifar10-jpg.tar.gz outside the repository
    mkdir -p ~/.cache/noisystudent/cifar10
    tar xzf /work/shared/data/cifar10-jpg.tar.gz -C ~/.cache/noisystudent/cifar10
    python bench/robustness_cifar10.py --subset 1000   # 250 of them as perturbation sequences

`--run-dir DIR` reuses (or resumes) a run: an existing DIR/config.yaml is used as it is, so
the training is skipped when it is complete. The split (labeled.tsv / unlabeled.tsv) is made
with `noisystudent split` when missing. The budget is deliberately small (cifar_resnet8 teacher
and student, few epochs) so training plus evaluation fit about 30 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from noisystudent.config import load_config
from noisystudent.pipeline import run_pipeline, run_robustness
from noisystudent.robustness.table import format_table
from noisystudent.rundir import RunLayout

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path.home() / ".cache" / "noisystudent"
# the CIFAR archive's class-folder sets (dataset folders, not run-directory ones)
TRAIN, TEST = "train", "test"

# Quick budget: 15 teacher epochs on 4k labels (930 steps), one student iteration of 12 epochs
# over 8k balanced pseudo-labeled images (800 per class; 492 steps of 64 labeled + 192
# pseudo-labeled images). Same architecture for both (allowed:
# "equal-or-larger"), so the comparison isolates Noisy Student's noise + pseudo labels.
BENCH_CONFIG = {
    "seed": 0,
    "device": "cpu",
    "models": ["cifar_resnet8", "cifar_resnet8"],
    "progress": False,
    "data": {"dataset": "folder", "image_size": 32},
    "teacher": {"epochs": 15, "batch_size": 64, "lr": 0.1, "warmup_epochs": 1},
    "student": {
        "epochs": 12,
        "batch_size": 64,
        "ratio": 3,
        "lr": 0.1,
        "warmup_epochs": 0.5,
        "randaugment": "rand-m9-n2",
        "drop_rate": 0.3,
        "drop_path_rate": 0.1,
    },
    "select": {"threshold": 0.3, "balance": True, "per_class": 800},
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--data", default=str(CACHE / "cifar10"), help="extracted cifar10 (train/, test/)"
    )
    ap.add_argument("--run-dir", default=str(CACHE / "runs" / "robustness-cifar10"))
    ap.add_argument("--subset", type=int, default=1000, help="test images for the robustness suite")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--cache-dir",
        default=str(CACHE / "decode-cache"),
        help="decode cache + cached corrupted/perturbed arrays (new runs only)",
    )
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "robustness_cifar10.json"))
    ap.add_argument(
        "--perturbation-subset",
        type=int,
        default=250,
        help="perturbation sequences (of the subset; ~300 frames each, the costliest part)",
    )
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: a shared CPU thrashes with 2)"
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.time()
    data = Path(args.data).expanduser()
    if not (data / TRAIN).is_dir() or not (data / TEST).is_dir():
        print(
            f"error: '{data}' must hold train/ and test/ class folders; extract "
            "/work/shared/data/cifar10-jpg.tar.gz there",
            file=sys.stderr,
        )
        return 2
    split = CACHE / "cifar10-4k"
    if not (split / "labeled.tsv").is_file():
        cmd = [sys.executable, "-m", "noisystudent", "split", str(data / TRAIN), str(split)]
        subprocess.run(cmd + ["--labels-per-class", "400", "--seed", "0"], check=True)

    run_dir = Path(args.run_dir).expanduser()
    layout = RunLayout(run_dir)
    if layout.config.is_file():
        cfg = load_config(run_dir)
        print(f"reusing run directory {run_dir} (its config.yaml)")
    else:
        base = json.loads(json.dumps(BENCH_CONFIG))
        base["run_dir"] = str(run_dir)
        base["data"].update(
            labeled=str(split / "labeled.tsv"),
            unlabeled=str(split / "unlabeled.tsv"),
            test=str(data / TEST),
            cache_dir=str(Path(args.cache_dir).expanduser()),
        )
        cfg = load_config(None, None, base=base)
    cfg.robustness.enabled = False  # evaluated below, after both models are trained
    cfg.robustness.subset = args.subset
    cfg.robustness.seed = args.seed
    cfg.robustness.reference = "0"
    cfg.robustness.perturbation_subset = args.perturbation_subset

    t0 = time.time()
    summary = run_pipeline(cfg)
    t_train = time.time() - t0

    last = len(cfg.models) - 1
    t0 = time.time()
    res = dict(zip((0, last), run_robustness(cfg, [0, last]), strict=True))
    t_rob = time.time() - t0

    rows = [("teacher (iter 0)", res[0]), (f"student (iter {last})", res[last])]
    table = format_table(rows)
    s = res[last]
    verdict = {
        "student_mce_vs_teacher": s["mce"],
        "student_mfr_vs_teacher": s["mfr"],
        "student_mce_below_100": s["mce"] is not None and s["mce"] < 100,
        "student_mfr_below_100": s["mfr"] is not None and s["mfr"] < 100,
    }
    keys = (
        "clean_top1",
        "mean_corrupted_top1",
        "unnormalized_ce",
        "mce",
        "relative_mce",
        "mean_flip_prob",
        "mfr",
        "top5_distance",
        "adversarial",
        "filtered_hard_acc",
        "filtered_hard_n",
        "ece",
        "corruption",
        "flip",
        "wall_s",
    )
    out = {
        "command": "python bench/robustness_cifar10.py " + " ".join(sys.argv[1:]),
        "run_dir": str(run_dir),
        "subset": args.subset,
        "perturbation_subset": args.perturbation_subset,
        "seed": args.seed,
        "models": cfg.models,
        "test_top1_full": [it.get("test_top1") for it in summary["iterations"]],
        "train_wall_s_recorded": [it.get("wall_s") for it in summary["iterations"]],
        "meta": res[0]["meta"],
        "teacher": {k: res[0].get(k) for k in keys},
        "student": {k: s.get(k) for k in keys},
        **verdict,
        "wall_s": {
            "pipeline_this_call": round(t_train, 1),
            "robustness": round(t_rob, 1),
            "total_this_call": round(time.time() - t_start, 1),
        },
        "table": table,
        "results_files": [str(layout.it(i).robustness_results) for i in (0, last)],
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print()
    print(table)
    print()
    print(
        f"student vs teacher: mCE {s['mce']}, mFR {s['mfr']} "
        f"(below 100: mCE {verdict['student_mce_below_100']}, mFR {verdict['student_mfr_below_100']})"
    )
    print(f"wall time: {out['wall_s']}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
