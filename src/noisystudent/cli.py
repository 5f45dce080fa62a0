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


def _main(argv: list[str] | None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may also follow an option such as --iteration
    if extra and (not hasattr(args, "overrides") or any("=" not in e for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if args.cmd == "split":
        from .data import split_dataset

        info = split_dataset(args.src, args.out, args.labels_per_class, args.seed)
        print(
            f"wrote {args.out}/labeled.tsv ({info['labeled']} images) and {args.out}/unlabeled.tsv "
            f"({info['unlabeled']} images); use them as data.labeled and data.unlabeled"
        )
        return 0

    if args.cmd == "report":
        from .report import build_report

        rep = build_report(args.run_dir)
        for problem in rep.problems:
            print(f"noisystudent: warning: report section {problem}", file=sys.stderr)
        print(f"wrote {rep.path}")
        return 0

    from .pipeline import run_pipeline

    cfg = (
        load_config(None, args.overrides, base=DEMO_CONFIG)
        if args.cmd == "demo"
        else load_config(args.config, args.overrides)
    )
    if args.cmd in ("run", "demo"):
        summary = run_pipeline(cfg)
        if args.cmd == "demo" and summary:  # empty on torchrun ranks other than 0
            from .report import report_path

            path = report_path(cfg.run_dir).resolve()
            if path.is_file():
                print(f"open the demo's report in a browser: {path.as_uri()}")
        return 0

    if args.cmd == "robustness":
        from .robustness.stage import run_robustness

        rc = cfg.robustness
        for flag, key in (("subset", "subset"), ("reference", "reference"), ("seed", "seed")):
            if getattr(args, flag) is not None:
                setattr(rc, key, getattr(args, flag))
        rc.hard_dir = args.hard_dir if args.hard_dir is not None else rc.hard_dir
        rc.table = args.table if args.table is not None else rc.table
        its = args.iteration
        if its is None:
            from pathlib import Path

            root = Path(cfg.run_dir)
            its = [
                i for i in range(len(cfg.models)) if (root / f"iter{i}/model.safetensors").is_file()
            ]
            if not its:
                raise UserError(
                    f"no trained model in '{cfg.run_dir}'; run `noisystudent run` first"
                )
        from .engine import configure, resolve_device

        print(configure(cfg.precision, cfg.compile, resolve_device(cfg.device)))
        run_robustness(cfg, its)
        return 0

    from . import distributed as dist
    from .engine import configure, resolve_device

    i = getattr(args, "iteration", 0)
    if not 0 <= i < len(cfg.models):
        raise UserError(f"--iteration {i} is outside models[0..{len(cfg.models) - 1}]")
    dist.init(resolve_device(cfg.device))  # joins torchrun's process group, if any
    line = configure(cfg.precision, cfg.compile, resolve_device(cfg.device))
    if dist.is_main():
        print(line)
    try:
        _run_stage(args.cmd, cfg, i)
    finally:
        dist.shutdown()
    return 0


def _run_stage(cmd: str, cfg, i: int) -> None:
    """One stage. Under torchrun, training and pseudo-labeling use every rank; the other stages
    run on rank 0 only."""
    from . import distributed as dist
    from . import stages
    from .pipeline import open_run

    run = open_run(cfg)
    data = stages.load_data(cfg, run)
    if cmd in ("select", "evaluate") and not dist.is_main():
        return
    if cmd == "train-teacher":
        stages.train_stage(cfg, run, data, 0)
    elif cmd == "train-student":
        if i < 1:
            raise UserError("train-student needs --iteration >= 1 (iteration 0 is the teacher)")
        stages.train_stage(cfg, run, data, i)
    elif cmd == "pseudo-label":
        stages.pseudo_label_stage(cfg, run, data, i)
    elif cmd == "select":
        stages.select_stage(cfg, run, data, i)
    elif cmd == "evaluate":
        res = stages.evaluate_stage(cfg, run, data, i)
        print(f"{cfg.models[i]}: test top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%")
    if dist.is_main():
        stages.write_summary(cfg, run)


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
