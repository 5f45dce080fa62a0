"""Warm start on a CIFAR-10 transfer task: a teacher from a pretrained weights file vs from scratch.

    python bench/warm_start_cifar10.py [--quick] [--model M] [--student-init teacher|scratch]
                                       [--data TAR] [--cache DIR] [--out FILE]

Nothing can be downloaded here, so a model pretrained on other CIFAR-10 classes stands in for an
ImageNet checkpoint. The split is fixed (seed 0, below):

    source task  classes 0-4 (airplane, automobile, bird, cat, deer): all 25,000 train images,
                 labeled; the pretrained model is trained on them and saved as a plain weights
                 file (safetensors of the network's state dict without its classifier head, no
                 noisystudent header: a backbone checkpoint, as an ImageNet one would be used)
    target task  classes 5-9 (dog, frog, horse, ship, truck): 25 labels a class (per class, in
                 sorted file order, numpy default_rng(0).choice(5000, 25) of its train images),
                 the other 24,875 train images of these classes unlabeled (their labels only
                 audit pseudo labels), their 5,000 test images for evaluation

Rows (every one a `noisystudent run` subprocess, bench/cifar10_ssl.py's helpers):

    source                the pretrained model on the source task (its own test images)
    teacher_scratch       target teacher from random initialisation
    teacher_warm          target teacher with teacher.pretrained=<the source model's file>
    ns_scratch, ns_warm   one Noisy Student iteration (same architecture) from each teacher;
                          the student starts from its teacher (--student-init teacher, default)
                          or from scratch (--student-init scratch: the paper's default)
    control_scratch,      the student's model and noise on the 125 labels only, initialised like
    control_warm          its teacher (random / the file), as many steps as the student at the
                          student's whole batch, plus the teacher's steps when the student starts
                          from its teacher: warm start alone with the same training length

Writes bench/results/warm_start_cifar10.json (rows: name, test_top1 %, pseudo_label_acc,
wall_s; the gains ns_warm - teacher_warm, ns_warm - control_warm, teacher_warm -
teacher_scratch) and prints the table. `--quick` is a smoke run (tiny subsets, 1-2 epochs; its
numbers mean nothing) into <cache>/warm-start-quick and, unless --out says otherwise,
/tmp/warm_start_cifar10_quick.json. Re-running a command resumes its rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cifar10_ssl import (  # noqa: E402  (bench/ is not a package)
    DEFAULT_CACHE,
    DEFAULT_TAR,
    ROOT,
    TEST,
    TRAIN,
    merge,
    prepare,
    row,
    run,
    run_dir,
    student_steps,
    supervised_like_student,
)

from noisystudent.data import write_index  # noqa: E402
from noisystudent.models import create_model  # noqa: E402
from noisystudent.rundir import RunLayout, load_tensors  # noqa: E402
from noisystudent.runtime import cpu_model  # noqa: E402
from noisystudent.warmstart import head_keys  # noqa: E402

SOURCE = ["airplane", "automobile", "bird", "cat", "deer"]  # CIFAR-10 classes 0-4
TARGET = ["dog", "frog", "horse", "ship", "truck"]  # classes 5-9
LABELS_PER_CLASS = 25
SEED = 0
MODEL = "cifar_resnet14"
RECIPE = {
    "seed": 0,
    "progress": False,
    "data": {"image_size": 32, "num_workers": 0},
    # the source model: a plain supervised run on 25,000 labeled images
    "source": {"epochs": 30, "batch_size": 128, "lr": 0.1, "warmup_epochs": 1,
               "randaugment": None, "drop_rate": 0.0, "drop_path_rate": 0.0, "ema_decay": 0.999},
    # the target teacher: 125 labels (3 steps an epoch), the same recipe from scratch and warm
    "teacher": {"epochs": 300, "batch_size": 32, "lr": 0.05, "warmup_epochs": 5,
                "randaugment": None, "drop_rate": 0.0, "drop_path_rate": 0.0, "ema_decay": 0.999},
    "student": {"epochs": 5, "batch_size": 64, "ratio": 1, "lr": 0.05, "warmup_epochs": 0.25,
                "randaugment": "rand-m5-n1", "drop_rate": 0.1, "drop_path_rate": 0.1,
                "ema_decay": 0.999},
    "pseudo": {"mode": "soft"},
    "select": {"threshold": 0.3, "balance": True},
}  # fmt: skip
QUICK = {  # images per class in each set, and epochs
    "source_per_class": 60, "unlabeled_per_class": 40, "test_per_class": 40,
    "source": {"epochs": 1}, "teacher": {"epochs": 2}, "student": {"epochs": 1},
    "select": {"threshold": 0.0},  # a smoke teacher's confidences stay near 1/C
}  # fmt: skip


def files(folder: Path, c: str) -> list[str]:
    """The uids (class/file, relative to the set's folder) of one class, in sorted order."""
    return [f"{c}/{p.name}" for p in sorted((folder / c).iterdir()) if p.is_file()]


def make_split(cache: Path, quick: bool) -> dict[str, Path]:
    """Index files of the fixed split (see the module docstring) under <cache>/warm_start[_quick]."""
    out = cache / ("warm_start_quick" if quick else "warm_start")
    paths = {k: out / f"{k}.tsv" for k in ("source_labeled", "source_unlabeled", "source_test",
                                            "labeled", "unlabeled", "test")}  # fmt: skip
    if all(p.is_file() for p in paths.values()):
        return paths
    train, test = cache / TRAIN, cache / TEST
    cut = (lambda xs, k: xs[: QUICK[k]]) if quick else (lambda xs, k: xs)
    src = [(u, c) for c in SOURCE for u in cut(files(train, c), "source_per_class")]
    write_index(paths["source_labeled"], train, SOURCE, src)
    write_index(paths["source_test"], test, SOURCE,
                [(u, c) for c in SOURCE for u in cut(files(test, c), "test_per_class")])  # fmt: skip
    # the source run needs an unlabeled set but labels nothing (one model): a few target images
    write_index(paths["source_unlabeled"], train, SOURCE, [(u, "-") for u in files(train, TARGET[0])[:20]])  # fmt: skip
    rng = np.random.default_rng(SEED)
    lab, unl = [], []
    for c in TARGET:
        uids = files(train, c)
        pick = set(rng.choice(len(uids), LABELS_PER_CLASS, replace=False).tolist())
        lab += [(u, c) for j, u in enumerate(uids) if j in pick]
        unl += cut([(u, c) for j, u in enumerate(uids) if j not in pick], "unlabeled_per_class")
    write_index(paths["labeled"], train, TARGET, lab)
    write_index(paths["unlabeled"], train, TARGET, unl)
    write_index(paths["test"], test, TARGET,
                [(u, c) for c in TARGET for u in cut(files(test, c), "test_per_class")])  # fmt: skip
    return paths


def plain_weights(model_file: Path, dst: Path, model: str) -> Path:
    """The source model as a plain weights file: the network's state dict ("net." prefix of
    noisystudent's Classifier removed), safetensors without noisystudent's header, and without
    its classifier head, as a backbone checkpoint (ImageNet's 1,000-class head could not fit
    either; the source's 5-class head would otherwise be loaded into the 5-class target)."""
    if not dst.is_file():
        head = set(head_keys(create_model(model, len(SOURCE)).net))
        tensors = {k.removeprefix("net."): v for k, v in load_tensors(model_file).items()}
        save_file({k: v for k, v in tensors.items() if k not in head}, str(dst))
    return dst


def teacher_steps(root: Path) -> int:
    """Training steps of a run's iteration-0 teacher, from its logged train events."""
    from noisystudent.rundir import read_lines_json

    events = read_lines_json(RunLayout(root).metrics)[0]
    steps = [e.get("step", 0) for e in events if e.get("stage") == "iter0/train"]
    return int(max(steps, default=0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few-minute smoke run")
    ap.add_argument("--model", default=MODEL, help=f"every model of every row (default {MODEL})")
    ap.add_argument("--student-init", choices=["teacher", "scratch"], default="teacher")
    ap.add_argument("--data", type=Path, default=DEFAULT_TAR)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--out", type=Path, default=None, help="results JSON")
    args = ap.parse_args()
    out = args.out or (
        Path("/tmp/warm_start_cifar10_quick.json")
        if args.quick
        else ROOT / "bench" / "results" / "warm_start_cifar10.json"
    )
    prepare(args.data, args.cache, quick=False)  # extracts the JPEG class folders once
    paths = make_split(args.cache, args.quick)
    work = args.cache / ("warm-start-quick" if args.quick else "warm-start")
    work = work / f"{args.model}_init-{args.student_init}"
    recipe = merge(RECIPE, {k: v for k, v in QUICK.items() if isinstance(v, dict)}) if args.quick else RECIPE  # fmt: skip
    m = args.model
    base = {k: v for k, v in recipe.items() if k != "source"}
    base = merge(base, {"data": {"cache_dir": str(args.cache / "decoded")}})  # shared decodes
    target = merge(base, {"data": {k: str(paths[k]) for k in ("labeled", "unlabeled", "test")}})
    target = merge(target, {"student": {"init": args.student_init}})
    rows, t_all = [], time.time()

    def add(name: str, it: dict, wall: float) -> None:
        rows.append(row(name, it, wall))
        write(out, rows, args, t_all)

    src_cfg = merge(base, {"models": [m], "teacher": recipe["source"], "data": {
        "labeled": str(paths["source_labeled"]), "unlabeled": str(paths["source_unlabeled"]),
        "test": str(paths["source_test"])}})  # fmt: skip
    s, w = run("source", src_cfg, work)
    add("source", s["iterations"][0], w)
    weights = plain_weights(RunLayout(run_dir(work, "source")).it(0).model,
                            work / f"source_{m}_backbone.safetensors", m)  # fmt: skip

    n_labeled = len(TARGET) * LABELS_PER_CLASS
    for init in ("scratch", "warm"):
        pre = {"teacher": {"pretrained": str(weights)}} if init == "warm" else {}
        ns, w = run(f"ns_{init}", merge(target, {"models": [m, m], **pre}), work)
        add(f"teacher_{init}", ns["iterations"][0], w)
        add(f"ns_{init}", ns["iterations"][1], w)
        root = run_dir(work, f"ns_{init}")
        steps = student_steps(root, target, 1)
        if args.student_init == "teacher":  # the student carries its teacher's training
            steps += teacher_steps(root)
        ctrl = supervised_like_student(target, m, paths["labeled"], n_labeled, steps)
        c, w = run(f"control_{init}", merge(ctrl, pre), work)
        add(f"control_{init}", c["iterations"][0], w)


def write(out: Path, rows: list[dict], args: argparse.Namespace, t_all: float) -> None:
    top = {r["name"]: r["test_top1"] for r in rows}
    gains = {}
    for key, (a, b) in {"ns_warm_minus_teacher_warm": ("ns_warm", "teacher_warm"),
                        "ns_warm_minus_control_warm": ("ns_warm", "control_warm"),
                        "teacher_warm_minus_teacher_scratch": ("teacher_warm", "teacher_scratch"),
                        "ns_scratch_minus_control_scratch": ("ns_scratch", "control_scratch"),
                        }.items():  # fmt: skip
        if a in top and b in top:
            gains[key] = round(top[a] - top[b], 2)
    result = {
        "protocol": "CIFAR-10 transfer: source classes 0-4 (25,000 labeled); target classes "
        "5-9, 25 labels/class (seed 0), 24,875 unlabeled, 5,000 test",
        "model": args.model, "student_init": args.student_init, "quick": args.quick,
        "cpu": cpu_model(), "rows": rows, **gains, "total_wall_s": round(time.time() - t_all, 1),
        "command": "python bench/warm_start_cifar10.py " + " ".join(sys.argv[1:]),
    }  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    lines = ["| row | model | test top-1 | pseudo-label acc | wall s |", "|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['model']} | {fmt(r['test_top1'], '.2f')}% | "
                     f"{fmt(r['pseudo_label_acc'], '.2f')} | {r['wall_s']} |")  # fmt: skip
    print("\n".join(lines))
    print(json.dumps(gains))


if __name__ == "__main__":
    main()
