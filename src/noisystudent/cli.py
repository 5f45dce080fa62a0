"""Command line: parse arguments, build a config, call one stage or the pipeline.

    noisystudent run CONFIG.yaml [key=value ...]      the whole loop (resumes if re-run)
    noisystudent demo [key=value ...]                 built-in digits data, teacher + 2 students
    noisystudent train-teacher CONFIG [key=value ...]
    noisystudent pseudo-label  CONFIG [--iteration I] [key=value ...]
    noisystudent select        CONFIG [--iteration I] [key=value ...]
    noisystudent train-student CONFIG [--iteration I] [key=value ...]
    noisystudent evaluate      CONFIG [--iteration I] [key=value ...]
    noisystudent split SRC OUT --labels-per-class N [--seed S]
    noisystudent robustness    CONFIG [--iteration I ...] [--subset N] [--reference I|PATH|none]
                               [--hard-dir DIR] [--seed S] [--table T] [key=value ...]
    noisystudent report RUN_DIR                       (re)write RUN_DIR/report.html

CONFIG is a YAML file or an existing run directory (its config.yaml).
"""

from __future__ import annotations

import argparse
import sys

from .config import load_config
from .errors import UserError

DEMO_CONFIG = {
    "run_dir": "runs/demo",
    "models": ["cifar_resnet8", "cifar_resnet14", "cifar_resnet20"],
    "data": {"dataset": "digits", "image_size": 16, "labels_per_class": 10, "hflip": False},
    "teacher": {"epochs": 60, "batch_size": 32, "lr": 0.05, "warmup_epochs": 3},
    "student": {
        "epochs": 20,
        "batch_size": 32,
        "ratio": 3,
        "lr": 0.05,
        "randaugment": "rand-m9-n2",
        "randaugment_semantics": "timm",
        "drop_rate": 0.3,
        "drop_path_rate": 0.2,
    },
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="noisystudent", description="Noisy Student Training for PyTorch."
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    def with_config(name: str, help: str, iteration: int | None = None) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help)
        s.add_argument("config", help="YAML config file or an existing run directory")
        if iteration is not None:
            s.add_argument(
                "--iteration", type=int, default=iteration, help=f"iteration (default {iteration})"
            )
        s.add_argument("overrides", nargs="*", help="config overrides, e.g. teacher.epochs=5")
        return s

    with_config("run", "run (or resume) the whole Noisy Student loop")
    d = sub.add_parser("demo", help="built-in digits dataset: teacher + two student iterations")
    d.add_argument("overrides", nargs="*", help="config overrides, e.g. run_dir=runs/demo2")
    with_config("train-teacher", "train the first teacher (iteration 0) on labeled data")
    with_config("pseudo-label", "label the unlabeled data with model I (no noise)", 0)
    with_config("select", "filter and balance model I's pseudo labels", 0)
    with_config("train-student", "train student I on labeled + model I-1's pseudo labels", 1)
    with_config("evaluate", "test accuracy of model I", 0)
    rb = with_config(
        "robustness", "corruption error, flip rate, adversarial and filtered-hard accuracy"
    )
    rb.add_argument(
        "--iteration", type=int, action="append", help="model(s) to evaluate (default: all trained)"
    )
    rb.add_argument("--subset", type=int, help="evaluate N test images (seeded choice)")
    rb.add_argument("--reference", help="iteration, results.json path or 'none' (default 0)")
    rb.add_argument("--hard-dir", help="class-folder set of natural hard images to evaluate too")
    rb.add_argument("--seed", type=int, help="corruption/subset/PGD seed (default 0)")
    rb.add_argument("--table", help="corruption table: auto, cifar32, tiny64, imagenet224")
    sp = sub.add_parser(
        "split", help="labeled class folders -> labeled.tsv + unlabeled.tsv index files"
    )
    sp.add_argument("src", help="class-folder dataset (ImageFolder layout)")
    sp.add_argument("out", help="folder for labeled.tsv, unlabeled.tsv, split.json")
    sp.add_argument("--labels-per-class", type=int, required=True)
    sp.add_argument("--seed", type=int, default=0)
    rp = sub.add_parser("report", help="(re)write RUN_DIR/report.html: the run's plots and tables")
    rp.add_argument("run_dir", help="a run directory (made by `run` or `demo`)")
    return p


# command-line options that are config keys: (argparse dest, config key)
FLAG_KEYS = {
    "robustness": [
        ("subset", "robustness.subset"),
        ("reference", "robustness.reference"),
        ("hard_dir", "robustness.hard_dir"),
        ("seed", "robustness.seed"),
        ("table", "robustness.table"),
    ],  # fmt: skip
}


def _config(args: argparse.Namespace):
    flags = {key: getattr(args, dest) for dest, key in FLAG_KEYS.get(args.cmd, [])
             if getattr(args, dest, None) is not None}  # fmt: skip
    if args.cmd == "demo":
        return load_config(None, args.overrides, base=DEMO_CONFIG, flags=flags)
    return load_config(args.config, args.overrides, flags=flags)


def _split(args: argparse.Namespace) -> None:
    from .data import split_dataset

    info = split_dataset(args.src, args.out, args.labels_per_class, args.seed)
    print(
        f"wrote {args.out}/labeled.tsv ({info['labeled']} images) and {args.out}/unlabeled.tsv "
        f"({info['unlabeled']} images); use them as data.labeled and data.unlabeled"
    )


def _report(args: argparse.Namespace) -> None:
    from .report import build_report

    rep = build_report(args.run_dir)
    for problem in rep.problems:
        print(f"noisystudent: warning: report section {problem}", file=sys.stderr)
    print(f"wrote {rep.path}")


def _run(args: argparse.Namespace) -> None:
    from .pipeline import run_pipeline

    cfg = _config(args)
    summary = run_pipeline(cfg)
    if args.cmd == "demo" and summary:  # empty on torchrun ranks other than 0
        from .rundir import RunLayout

        path = RunLayout(cfg.run_dir).report.resolve()
        if path.is_file():
            print(f"open the demo's report in a browser: {path.as_uri()}")


def _stage(args: argparse.Namespace) -> None:
    from .pipeline import run_stage

    run_stage(args.cmd, _config(args), getattr(args, "iteration", 0))


def _robustness(args: argparse.Namespace) -> None:
    from .pipeline import run_robustness

    run_robustness(_config(args), args.iteration)


COMMANDS = {
    "run": _run,
    "demo": _run,
    "train-teacher": _stage,
    "pseudo-label": _stage,
    "select": _stage,
    "train-student": _stage,
    "evaluate": _stage,
    "robustness": _robustness,
    "split": _split,
    "report": _report,
}


def _main(argv: list[str] | None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also follow an option such as --iteration
    if extra and (not hasattr(args, "overrides") or any("=" not in e for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    COMMANDS[args.cmd](args)
    return 0


def main(argv: list[str] | None = None) -> int:
    from .rundir import release_locks

    try:
        return _main(argv)
    except UserError as e:
        print(f"noisystudent: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("noisystudent: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    finally:
        release_locks()


if __name__ == "__main__":
    raise SystemExit(main())
