"""Command line: parse arguments, build a config, call one stage or the pipeline.

    noisystudent run CONFIG.yaml [key=value ...]      the whole loop (resumes if re-run)
    noisystudent demo [key=value ...]                 built-in digits data, teacher + 2 students
    noisystudent train-teacher CONFIG [key=value ...]
    noisystudent pseudo-label  CONFIG [--iteration I] [key=value ...]
    noisystudent select        CONFIG [--iteration I] [key=value ...]
    noisystudent train-student CONFIG [--iteration I] [key=value ...]
    noisystudent evaluate      CONFIG [--iteration I] [key=value ...]
    noisystudent evaluate      RUN_DIR --test-dir FOLDER [--iteration I]   another labeled set
    noisystudent export RUN_DIR --format onnx|torchscript [--iteration I] [--out PATH]
                               [--input-dtype uint8|float32] [key=value ...]
    noisystudent split SRC OUT --labels-per-class N [--seed S]
    noisystudent robustness    CONFIG [--iteration I ...] [--subset N] [--reference I|PATH|none]
                               [--hard-dir DIR] [--seed S] [--table T] [key=value ...]
    noisystudent report RUN_DIR                       (re)write RUN_DIR/report.html
    noisystudent predict RUN_DIR|MODEL_FILE INPUT... [--iteration I] [--out FILE.csv|.jsonl]
                               [--topk K] [--batch-size N] [--device D] [--on-bad skip|error]

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
    ev = with_config("evaluate", "test accuracy of model I", 0)
    ev.add_argument("--test-dir", help="evaluate on this labeled class-folder set (the run's "
                    "classes) instead; read-only, results in iter<I>/eval_<folder>.json; "
                    "default iteration: the last trained")  # fmt: skip
    ev.set_defaults(iteration=None)  # 0 without --test-dir (see _evaluate)
    ex = sub.add_parser("export", help="model I as an ONNX or TorchScript file, verified "
                        "against PyTorch on the run's test images")  # fmt: skip
    ex.add_argument("run_dir", help="a run directory with a trained model")
    ex.add_argument("--format", required=True, metavar="onnx|torchscript")
    ex.add_argument("--iteration", type=int, help="model to export (default: the last trained)")
    ex.add_argument("--out", help="file to write (default RUN_DIR/iter<I>/export/model.onnx|.pt); "
                    "its description goes beside it, <file>.json")  # fmt: skip
    ex.add_argument("--input-dtype", default="uint8", metavar="uint8|float32",
                    help="ONNX input: uint8 0..255 (default) or float32 [0, 1]; TorchScript "
                    "takes both")  # fmt: skip
    ex.add_argument("overrides", nargs="*", help="config overrides, e.g. data.test=PATH (the "
                    "images the export is verified on)")  # fmt: skip
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
    pr = sub.add_parser(
        "predict",
        help="classify images with a trained model: one row per image, its top-k classes",
        description="Classify images with a trained model, seeing them as the run's evaluation "
        "does (shorter side resized to the model's image size, bilinear, center crop) at the "
        "run's precision and compile setting. One row per image: its path and the top-k classes "
        "with probabilities; CSV on stdout unless --out is given (then the status lines go to "
        "stdout, else to stderr). Unreadable images are skipped and listed in "
        "<out stem>.skipped.txt (on stderr without --out); the last line gives the count, "
        "images/s and the output.",
    )
    pr.add_argument("source", metavar="SOURCE", help="run directory (default: its last trained "
                    "iteration), a folder holding a model file, or a model file (model.json "
                    "beside it)")  # fmt: skip
    pr.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders (recursive; "
                    "class sub-folders are only paths here), index files (.tsv) or .tar shards")  # fmt: skip
    pr.add_argument("--iteration", type=int, metavar="I",
                    help="model of this iteration of a run directory")  # fmt: skip
    pr.add_argument("--out", metavar="FILE", help="FILE.csv or FILE.jsonl (default: CSV on stdout)")
    pr.add_argument(
        "--topk", type=int, default=1, metavar="K", help="classes per image (default 1)"
    )
    pr.add_argument(
        "--batch-size", type=int, metavar="N", help="default: the run's eval_batch_size"
    )
    pr.add_argument("--device", metavar="D",
                    help="auto, cpu, cuda, cuda:1, ... (default: the run's device)")  # fmt: skip
    pr.add_argument("--workers", type=int, metavar="N", help="image-reading processes "
                    "(default: the run's data.num_workers)")  # fmt: skip
    pr.add_argument("--on-bad", choices=("skip", "error"), default="skip",
                    help="unreadable images: skip and list them (default), or stop with an error")  # fmt: skip
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


def _predict(args: argparse.Namespace) -> None:
    from .classifier import check_options, input_sets, load, predict_files

    check_options(args.out, args.topk, args.batch_size)
    clf = load(args.source, args.iteration, args.device, progress=None)
    if args.workers is not None:
        clf.workers = args.workers
    sets = input_sets(args.inputs, clf.max_pixels)
    status = sys.stderr if args.out is None else sys.stdout  # CSV on stdout: status aside
    print(f"{clf!r}; {clf.runtime.describe()}", file=status, flush=True)
    res = predict_files(clf, sets, args.out, args.topk, args.batch_size, args.on_bad)
    bad = res["skipped"]
    if bad and res["listing"] is None:
        for uid in bad.uids:
            print(f"skipped unreadable image '{uid}'", file=status)
    skipped = ""
    if bad:
        where = f" (listed in {res['listing']})" if res["listing"] is not None else ""
        skipped = f"; skipped {len(bad)} unreadable images{where}"
    print(f"predicted {res['images']} images in {res['seconds']:.1f}s "
          f"({res['images_per_s']:.1f} images/s){skipped} -> {args.out or 'stdout'}",
          file=status)  # fmt: skip


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


def _evaluate(args: argparse.Namespace) -> None:
    if args.test_dir is None:
        args.iteration = 0 if args.iteration is None else args.iteration
        _stage(args)
        return
    from .evaluate_set import evaluate_set

    evaluate_set(args.config, args.overrides, args.iteration, args.test_dir)


def _export(args: argparse.Namespace) -> None:
    from .export import export_model

    export_model(args.run_dir, args.overrides, args.iteration, args.format, args.out,
                 args.input_dtype)  # fmt: skip


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
    "evaluate": _evaluate,
    "export": _export,
    "robustness": _robustness,
    "split": _split,
    "report": _report,
    "predict": _predict,
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
