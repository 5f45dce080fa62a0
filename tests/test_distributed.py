"""torchrun / DDP on CPU (gloo), 2 processes: the real `python -m torch.distributed.run` path."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from noisystudent.artifacts import load_model, read_eval, read_summary
from noisystudent.cli import main
from noisystudent.rundir import RunDir, RunLayout
from noisystudent.store import PseudoLabelStore

from .conftest import tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def torchrun(args, nproc=2, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "noisystudent",
        *args,
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def test_two_ranks_label_like_one_and_train_a_student(tiny_data, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    # fp32: ranks (1 thread each) and this process (2 threads) must agree on near-tie argmaxes,
    # which bf16 on an AMX CPU does not promise
    cfg.write_text("device: cpu\nprecision: fp32\n")
    one, two = tmp_path / "one", tmp_path / "two"
    over = lambda run: tiny_overrides(tiny_data, run) + ["pseudo.shard_size=7", "student.epochs=1"]  # noqa: E731
    assert main(["train-teacher", str(cfg), *over(one)]) == 0
    shutil.copytree(one, two, ignore=shutil.ignore_patterns(RunLayout(one).lock.name))

    assert main(["pseudo-label", str(cfg), *over(one)]) == 0  # 1 process
    torchrun(["pseudo-label", str(cfg), *over(two)])  # 2 ranks: shards 0,2,4,.. and 1,3,5,..
    a = PseudoLabelStore.load(RunLayout(one).it(0).pseudo)
    b = PseudoLabelStore.load(RunLayout(two).it(0).pseudo)
    assert len(a) == len(b) == 60 and len(a.meta["shards"]) == 9
    assert a.uids == b.uids  # same uids, same order, no padding duplicates
    assert torch.allclose(a.topk_prob.float(), b.topk_prob.float(), atol=1e-2)  # bf16-level
    assert torch.equal(a.pred, b.pred) and torch.equal(a.index, b.index)

    # a 2-rank student epoch produces a loadable model and checkpoint
    assert main(["select", str(cfg), *over(two)]) == 0
    p = torchrun(["train-student", str(cfg), "--iteration", "1", *over(two)])
    run = RunDir(two)
    assert run.it(1).checkpoint.is_file(), p.stdout
    assert run.stage_done(run.it(1).stage("train"))
    model, meta = load_model(run, 1, "student", "cifar_resnet14", ["blue", "green", "red"])
    assert meta["name"] == "cifar_resnet14"
    assert model(torch.rand(2, 3, 16, 16)).shape == (2, 3)
    events = run.metrics()
    stage = run.it(1).stage("train")
    assert any(e.get("stage") == stage and e.get("event") == "train" for e in events)
    assert main(["evaluate", str(cfg), "--iteration", "1", *over(two)]) == 0
    assert read_eval(run.it(1))["n"] == 18


def test_whole_pipeline_under_torchrun(tiny_data, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("device: cpu\n")
    run = tmp_path / "run"
    p = torchrun(["run", str(cfg), *tiny_overrides(tiny_data, run), "student.epochs=1"])
    assert "test top-1" in p.stdout
    assert p.stdout.count("run directory:") == 2  # rank 0 alone prints (start and end)
    rows = read_summary(RunDir(run))["iterations"]
    assert [r["iteration"] for r in rows] == [0, 1]
    assert all(r["test_top1"] is not None for r in rows)
    manifest = RunDir(run).manifest.read()["stages"]
    assert all(v["status"] == "done" for v in manifest.values()) and len(manifest) == 6
