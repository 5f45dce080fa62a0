"""bench/cifar10_ssl.py --quick end to end on a small CIFAR-like archive made here (the real
archive is not needed): every row runs through the CLI and lands in the JSON and the table."""

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

ROOT = Path(__file__).resolve().parent.parent


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
    want = ["teacher", "supervised_control", "ns_iter1", "ns_iter2", "ns_iter3", "upper_bound"] + [
        f"ablation_{a}" for a in ("no_noise", "hard_labels", "no_selection", "equal_size",
                                  "init_from_teacher", "ratio3")
    ]  # fmt: skip
    assert sorted(names) == sorted(want) and len(names) == len(set(names))
    for r in res["rows"]:
        assert 0.0 <= r["test_top1"] <= 100.0 and r["wall_s"] >= 0
    by = {r["name"]: r for r in res["rows"]}
    assert by["ns_iter1"]["pseudo_label_acc"] is not None and by["teacher"]["kept_fraction"] is None
    assert {"student_minus_teacher", "student_minus_control", "gap_closed"} <= set(res)
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
    epochs = [yaml.safe_load((work / d / "bench.yaml").read_text())["teacher"]["epochs"]
              for d in ("supervised_control", "supervised_control_x2")]  # fmt: skip
    assert epochs[1] >= 2 * epochs[0] - 1
    events = [
        json.loads(x) for x in (work / "ns" / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert {"stage": "iter1/train", "init": "teacher"} in [
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
    fc = cache / "runs-quick-labels1k-r8-r8" / "ns_from_control" / "run"
    teacher = json.loads((fc / "summary.json").read_text())["iterations"][0]
    assert teacher["test_top1"] == by["supervised_control"]["test_top1"]  # the control, reused
    assert by["ns_from_control"]["pseudo_label_acc"] is not None
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
