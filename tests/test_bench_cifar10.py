"""bench/cifar10_ssl.py --quick end to end on a small CIFAR-like archive made here (the real
archive is not needed): every row runs through the CLI and lands in the JSON and the table.

Each row's run directory is <cache>/runs-quick.../<row>/run (the script's work folder); files
inside it are found through the run-directory layout."""

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from noisystudent.artifacts import read_counts, read_eval, read_summary
from noisystudent.rundir import RunDir, RunLayout

ROOT = Path(__file__).resolve().parent.parent
N_TEST = 10 * 20  # the quick test subset: every test image of the archive below
CHANCE = 100.0 / 10  # a constant prediction on the balanced test set scores exactly this


def _archive(path: Path, per_class_train: int = 410, per_class_test: int = 20) -> None:
    """cifar10/{train,test}/<class>/*.jpg with 10 classes of coloured 32-px squares."""
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as tf:
        for split, n in (("train", per_class_train), ("test", per_class_test)):
            for c in range(10):
                for k in range(n):
                    a = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
                    a[8:24, 8:24, c % 3] += np.uint8(120 + 12 * c)
                    buf = io.BytesIO()
                    Image.fromarray(a).save(buf, "JPEG", quality=90)
                    info = tarfile.TarInfo(f"cifar10/{split}/class{c}/{k:04d}.jpg")
                    info.size = buf.tell()
                    buf.seek(0)
                    tf.addfile(info, buf)


def _row_source(work: Path, rows: list[dict]) -> dict[str, tuple[RunDir, int]]:
    """Row name -> (its run directory, the iteration whose model the row reports)."""
    out = {}
    for r in rows:
        n = r["name"]
        if n == "teacher" or n.startswith("ns_iter"):
            out[n] = (RunDir(work / "ns" / "run"), 0 if n == "teacher" else int(n[7:]))
        else:  # a run of its own: the control and upper bound are its iteration 0
            out[n] = (RunDir(work / n / "run"), 0 if n.startswith(("supervised", "upper")) else 1)
    return out


def _check_rows_are_the_runs(work: Path, res: dict) -> None:
    """Every row reports what its run directory holds: the test top-1 of the row's model,
    evaluated on the whole quick test subset, and the selection counts of the pseudo labels it
    was trained on (none for a supervised row)."""
    assert all("kept_fraction" not in r for r in res["rows"])  # renamed: kept_unique_fraction
    for name, (run, i) in _row_source(work, res["rows"]).items():
        r = next(r for r in res["rows"] if r["name"] == name)
        ev = read_eval(run.it(i))
        assert ev["n"] == N_TEST and r["test_top1"] == ev["top1"], name
        assert r["model"] == read_summary(run)["iterations"][i]["model"], name
        counts = read_counts(run, i - 1) if i > 0 else {}
        assert r["pseudo_label_acc"] == counts.get("pseudo_label_acc"), name
        assert r["kept_unique_fraction"] == counts.get("kept_unique_fraction"), name
        if i > 0:  # the share of distinct pseudo-labeled images the student trained on
            assert counts["kept_unique"] > 0
            assert r["kept_unique_fraction"] == counts["kept_unique"] / counts["total"], name


@pytest.mark.slow
def test_quick_benchmark_writes_every_row(tmp_path):
    _archive(tmp_path / "tiny.tar.gz")
    out = tmp_path / "results"
    cmd = [sys.executable, str(ROOT / "bench" / "cifar10_ssl.py"), "--quick", "--data",
           str(tmp_path / "tiny.tar.gz"), "--cache", str(tmp_path / "cache"), "--out", str(out)]  # fmt: skip
    for rows in ("main", "ablations"):  # the two commands; the second keeps the first's rows
        subprocess.run([*cmd, "--rows", rows], check=True, cwd=tmp_path, timeout=1500)
    res = json.loads((out / "cifar10_4k_quick.json").read_text())
    names = [r["name"] for r in res["rows"]]
    ablations = ("no_noise", "hard_labels", "no_selection", "equal_size", "init_from_teacher",
                 "ratio3")  # fmt: skip
    want = ["teacher", "supervised_control", "ns_iter1", "ns_iter2", "ns_iter3", "upper_bound"] + [
        f"ablation_{a}" for a in ablations
    ]
    assert sorted(names) == sorted(want) and len(names) == len(set(names))
    assert all(r["wall_s"] >= 0 for r in res["rows"])
    work = tmp_path / "cache" / "runs-quick"
    _check_rows_are_the_runs(work, res)
    by = {r["name"]: r for r in res["rows"]}
    models = {"teacher": "cifar_resnet8", "ns_iter1": "cifar_resnet14",
              "ns_iter2": "cifar_resnet20", "ns_iter3": "cifar_resnet20",
              "supervised_control": "cifar_resnet20", "upper_bound": "cifar_resnet20",
              "ablation_equal_size": "cifar_resnet8", "ablation_init_from_teacher": "cifar_resnet8"}  # fmt: skip
    assert {n: by[n]["model"] for n in models} == models
    assert {r["model"] for n, r in by.items() if n not in models} == {"cifar_resnet14"}
    # the rows trained on labels learned something: above a constant prediction, by a margin
    for n in ("teacher", "supervised_control", "upper_bound"):
        assert by[n]["test_top1"] >= 2 * CHANCE, (n, by[n]["test_top1"])
    assert by["ns_iter1"]["pseudo_label_acc"] is not None
    assert by["teacher"]["kept_unique_fraction"] is None
    # every ablation starts from the main run's teacher and pseudo labels, and all but
    # no_selection from its selection too; no_selection keeps every pseudo-labeled image
    ns = RunDir(work / "ns" / "run")
    for a in ablations:
        run = RunDir(work / f"ablation_{a}" / "run")
        assert read_summary(run)["iterations"][0]["test_top1"] == by["teacher"]["test_top1"], a
        assert run.it(0).model.read_bytes() == ns.it(0).model.read_bytes(), a
        if a != "no_selection":
            assert read_counts(run, 0) == read_counts(ns, 0), a
    no_sel = read_counts(RunDir(work / "ablation_no_selection" / "run"), 0)
    assert no_sel["threshold"] == 0.0 and not no_sel["balance"]
    assert no_sel["kept_unique"] == no_sel["selected_rows"] == no_sel["total"]
    assert by["ablation_no_selection"]["kept_unique_fraction"] == 1.0
    top = {n: r["test_top1"] for n, r in by.items()}
    assert res["student_minus_teacher"] == round(top["ns_iter3"] - top["teacher"], 2)
    assert res["student_minus_control"] == round(top["ns_iter3"] - top["supervised_control"], 2)
    gap = top["upper_bound"] - top["teacher"]
    closed = round((top["ns_iter3"] - top["teacher"]) / gap, 3) if gap else None
    assert res["gap_closed"] == closed
    assert res["noise_on_minus_off"] == round(top["ns_iter1"] - top["ablation_no_noise"], 2)
    assert len(res["commands"]) == 2
    table = (out / "cifar10_4k_quick.md").read_text()
    assert all(f"| {n} |" in table for n in want)


@pytest.mark.slow
def test_quick_benchmark_variant_chain_and_longer_control(tmp_path):
    """--models/--init rerun the main rows into their own files; --control-x 2 adds a control
    with twice the steps."""
    _archive(tmp_path / "tiny.tar.gz")
    out, cache = tmp_path / "results", tmp_path / "cache"
    cmd = [sys.executable, str(ROOT / "bench" / "cifar10_ssl.py"), "--quick", "--data",
           str(tmp_path / "tiny.tar.gz"), "--cache", str(cache), "--out", str(out), "--rows", "main",
           "--models", "cifar_resnet8,cifar_resnet8", "--init", "auto", "--control-x", "2"]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=tmp_path, timeout=1500)
    res = json.loads((out / "cifar10_4k_quick_r8-r8_init-auto.json").read_text())
    names = [r["name"] for r in res["rows"]]
    assert names == [
        "teacher",
        "supervised_control",
        "supervised_control_x2",
        "ns_iter1",
        "upper_bound",
    ]
    assert {r["model"] for r in res["rows"]} == {"cifar_resnet8"}
    assert res["student_minus_control"] == round(
        res["rows"][3]["test_top1"] - res["rows"][1]["test_top1"], 2
    )
    work = cache / "runs-quick-r8-r8-init-auto"
    _check_rows_are_the_runs(work, res)
    for n in ("teacher", "supervised_control", "supervised_control_x2", "upper_bound"):
        assert res["rows"][names.index(n)]["test_top1"] >= 2 * CHANCE, n
    epochs = [yaml.safe_load((work / d / "bench.yaml").read_text())["teacher"]["epochs"]
              for d in ("supervised_control", "supervised_control_x2")]  # fmt: skip
    assert epochs[1] >= 2 * epochs[0] - 1
    ns = RunDir(work / "ns" / "run")
    events = ns.metrics()
    assert {"stage": ns.it(1).stage("train"), "init": "teacher"} in [
        {k: e[k] for k in ("stage", "init")} for e in events if e.get("event") == "init"
    ]
    for extra, msg in (
        (["--control-x", "2"], "--rows main or all"),
        (cmd[-6:-2], "main rows only"),
    ):
        bad = [*cmd[:9], "--rows", "ablations", *extra]  # refused before any work
        p = subprocess.run(bad, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and msg in p.stderr, p.stderr


@pytest.mark.slow
def test_quick_benchmark_other_label_count(tmp_path):
    """--labels-per-class reruns the main rows on another split (its own split folder, files
    and work folder); the control trains on that split's labels; --no-upper-bound skips the row
    that does not depend on the label count; --teacher-from-control adds a student taught by the
    supervised control."""
    _archive(tmp_path / "tiny.tar.gz")
    out, cache = tmp_path / "results", tmp_path / "cache"
    cmd = [sys.executable, str(ROOT / "bench" / "cifar10_ssl.py"), "--quick", "--data",
           str(tmp_path / "tiny.tar.gz"), "--cache", str(cache), "--out", str(out), "--rows", "main",
           "--models", "cifar_resnet8,cifar_resnet8", "--labels-per-class", "100",
           "--no-upper-bound", "--teacher-from-control"]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=tmp_path, timeout=1500)
    res = json.loads((out / "cifar10_1k_quick_r8-r8.json").read_text())
    names = [r["name"] for r in res["rows"]]
    assert names == ["teacher", "supervised_control", "ns_iter1", "ns_from_control"]
    assert "gap_closed" not in res and "student_minus_control" in res
    by = {r["name"]: r for r in res["rows"]}
    assert res["from_control_minus_control"] == round(
        by["ns_from_control"]["test_top1"] - by["supervised_control"]["test_top1"], 2
    )
    work = cache / "runs-quick-labels1k-r8-r8"
    _check_rows_are_the_runs(work, res)
    fc = RunDir(work / "ns_from_control" / "run")
    teacher = read_summary(fc)["iterations"][0]
    assert teacher["test_top1"] == by["supervised_control"]["test_top1"]  # the control, reused
    ctrl_model = RunLayout(work / "supervised_control" / "run").it(0).model
    assert fc.it(0).model.read_bytes() == ctrl_model.read_bytes()
    assert by["ns_from_control"]["pseudo_label_acc"] is not None
    assert by["supervised_control"]["test_top1"] >= 2 * CHANCE
    labeled = cache / "split100pc" / "labeled.tsv"
    rows = [x for x in labeled.read_text().splitlines() if x.strip() and not x.startswith("#")]
    assert len(rows) == 1000
    ctrl = yaml.safe_load(
        (cache / "runs-quick-labels1k-r8-r8" / "supervised_control" / "bench.yaml").read_text()
    )
    assert ctrl["data"]["labeled"] == str(labeled)
    assert not (out / "cifar10_4k_quick_r8-r8.json").exists()


@pytest.mark.parametrize(
    "extra, msg",
    [
        (["--labels-per-class", "5000"], "--labels-per-class must be in 1..4999"),
        (["--labels-per-class", "100", "--rows", "ablations"], "main rows only"),
    ],
)
def test_benchmark_refuses_bad_label_counts(tmp_path, extra, msg):
    """Refused in one line before any data is touched (the archive path does not exist)."""
    cmd = [sys.executable, str(ROOT / "bench" / "cifar10_ssl.py"), "--data",
           str(tmp_path / "none.tar.gz"), "--cache", str(tmp_path / "c"), *extra]  # fmt: skip
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and msg in p.stderr, p.stderr
    assert not (tmp_path / "c").exists()
