"""End to end: a one-iteration pipeline (teacher + one student) on a tiny dataset, and resume."""

import json

import torch

from noisystudent.cli import main
from noisystudent.rundir import load_tensors
from noisystudent.store import PseudoLabelStore

from .conftest import tiny_overrides


def test_one_iteration_pipeline_end_to_end(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["run", str(_write_cfg(tmp_path)), *tiny_overrides(tiny_data, run)]) == 0
    out = capsys.readouterr().out
    assert "test top-1" in out and str(run) in out
    for rel in [
        "config.yaml",
        "manifest.json",
        "metrics.jsonl",
        "summary.json",
        "iter0/model.safetensors",
        "iter0/model.json",
        "iter0/eval.json",
        "iter0/pseudo/meta.json",
        "iter0/pseudo/audit.json",
        "iter0/select/selected.safetensors",
        "iter0/select/counts.json",
        "iter1/model.safetensors",
        "iter1/eval.json",
    ]:
        assert (run / rel).is_file(), rel
    summary = json.loads((run / "summary.json").read_text())
    it = summary["iterations"]
    assert [r["iteration"] for r in it] == [0, 1]
    assert [r["model"] for r in it] == ["cifar_resnet8", "cifar_resnet14"]
    assert it[0]["params"] < it[1]["params"]
    for r in it:
        assert 0 <= r["test_top1"] <= 100 and 0 <= r["test_top5"] <= 100
    assert it[0]["pseudo_label_acc"] is None and it[1]["pseudo_label_acc"] is not None
    assert 0 < it[1]["kept_fraction"] <= 1
    manifest = json.loads((run / "manifest.json").read_text())
    assert all(s["status"] == "done" for s in manifest["stages"].values())
    assert set(manifest["stages"]) == {
        "iter0/train",
        "iter0/evaluate",
        "iter0/pseudo-label",
        "iter0/select",
        "iter1/train",
        "iter1/evaluate",
    }
    # the store: one row per unlabeled image (60), uids are relative paths, probabilities sum to 1
    store = PseudoLabelStore.load(run / "iter0" / "pseudo")
    assert len(store.uids) == 60 and "red/000.png" in store.uids
    assert torch.allclose(store.dense(torch.arange(60)).sum(1), torch.ones(60), atol=1e-3)
    counts = json.loads((run / "iter0" / "select" / "counts.json").read_text())
    assert sum(counts["before"]) == 60 and len(counts["after"]) == 3
    rows = load_tensors(run / "iter0" / "select" / "selected.safetensors")["rows"]
    assert (store.max_prob[rows] >= 0.3).all()


def _write_cfg(tmp_path):
    p = tmp_path / "cfg.yaml"
    p.write_text("seed: 0\n")
    return p


def test_resume_after_teacher_does_not_retrain(tiny_data, tmp_path):
    run = tmp_path / "run"
    cfg = str(_write_cfg(tmp_path))
    over = tiny_overrides(tiny_data, run)
    assert main(["train-teacher", cfg, *over]) == 0
    w0 = (run / "iter0" / "model.safetensors").read_bytes()
    mtime = (run / "iter0" / "model.safetensors").stat().st_mtime_ns
    n_train_events = _count(run, "iter0/train")
    assert main(["run", cfg, *over]) == 0
    assert (run / "iter0" / "model.safetensors").stat().st_mtime_ns == mtime  # not retrained
    assert (run / "iter0" / "model.safetensors").read_bytes() == w0
    assert _count(run, "iter0/train") == n_train_events
    first = json.loads((run / "summary.json").read_text())

    # the same result as an uninterrupted run with the same seed (CPU is deterministic)
    run2 = tmp_path / "run2"
    assert main(["run", cfg, *tiny_overrides(tiny_data, run2)]) == 0
    second = json.loads((run2 / "summary.json").read_text())
    strip = lambda s: [{k: v for k, v in r.items() if k != "wall_s"} for r in s["iterations"]]  # noqa: E731
    assert strip(first) == strip(second)
    for i in (0, 1):
        a = load_tensors(run / f"iter{i}" / "model.safetensors")
        b = load_tensors(run2 / f"iter{i}" / "model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), f"iter{i} weights differ"

    # a finished run re-run does nothing and keeps its results
    mtime1 = (run / "iter1" / "model.safetensors").stat().st_mtime_ns
    assert main(["run", cfg, *over]) == 0
    assert (run / "iter1" / "model.safetensors").stat().st_mtime_ns == mtime1


def test_interrupted_training_resumes_from_last_epoch(tiny_data, tmp_path):
    run = tmp_path / "run"
    cfg = str(_write_cfg(tmp_path))
    over = tiny_overrides(tiny_data, run)
    # train 2 of 3 epochs, then "crash": the per-epoch checkpoint is kept, the stage is not done
    assert main(["train-teacher", cfg, *over, "teacher.epochs=3"]) == 0
    ref = load_tensors(run / "iter0" / "model.safetensors")
    import shutil

    shutil.rmtree(run)
    from noisystudent import engine

    orig = engine.save_state
    calls = {"n": 0}

    def crash_after_two(path, state):
        orig(path, state)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    engine.save_state = crash_after_two
    try:
        assert main(["train-teacher", cfg, *over, "teacher.epochs=3"]) == 130
    finally:
        engine.save_state = orig
    assert not (run / "iter0" / "model.safetensors").exists()
    assert main(["train-teacher", cfg, *over, "teacher.epochs=3"]) == 0
    resumed = load_tensors(run / "iter0" / "model.safetensors")
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "resume" and e.get("epoch") == 2 for e in events)
    for k in ref:
        assert torch.allclose(ref[k].float(), resumed[k].float(), atol=1e-5), k


def _count(run, stage):
    return sum(
        1
        for x in (run / "metrics.jsonl").read_text().splitlines()
        if json.loads(x).get("stage") == stage
    )


def test_weight_ema_is_the_saved_model(tiny_data, tmp_path):
    run = tmp_path / "run"
    cfg = str(_write_cfg(tmp_path))
    assert (
        main(["train-teacher", cfg, *tiny_overrides(tiny_data, run), "teacher.ema_decay=0.9"]) == 0
    )
    saved = load_tensors(run / "iter0" / "model.safetensors")
    state = torch.load(run / "iter0" / "train" / "checkpoint.pt", weights_only=True)
    raw, ema = state["model"], state["extra"]["ema"]
    key = next(k for k in saved if k.endswith("fc.weight"))
    assert not torch.allclose(saved[key], raw[key])  # not the raw last weights
    ema_key = next(k for k in ema if k.endswith("fc.weight"))
    assert torch.allclose(saved[key], ema[ema_key])  # the EMA weights


def test_pipeline_from_index_files_file_backed(tiny_data, tmp_path):
    """`noisystudent split` index files as labeled and unlabeled data, at a size above the decode
    cache's (file-backed: every image is read through the index's IndexColumn paths)."""
    from noisystudent.data import split_dataset

    split_dataset(tiny_data["unlabeled"], tmp_path / "split", 4, seed=0)
    run = tmp_path / "run"
    data = {**tiny_data, "labeled": tmp_path / "split" / "labeled.tsv",
            "unlabeled": tmp_path / "split" / "unlabeled.tsv"}  # fmt: skip
    args = [*tiny_overrides(data, run, "[cifar_resnet8,cifar_resnet8]"), "data.image_size=72"]
    args += ["teacher.epochs=1", "student.epochs=1"]
    assert main(["run", str(_write_cfg(tmp_path)), *args]) == 0
    store = PseudoLabelStore.load(run / "iter0" / "pseudo")
    assert len(store.uids) == 48 and not (run / "cache").exists()
    assert json.loads((run / "iter0" / "pseudo" / "audit.json").read_text())["audited"] == 48


def test_student_init_auto_starts_equal_size_students_from_their_teacher(tiny_data, tmp_path):
    """student.init=auto: an equal-size student starts from its teacher's weights (with lr 0
    its convolutions stay the teacher's), a larger one from scratch; both choices are logged."""
    run = tmp_path / "run"
    over = tiny_overrides(tiny_data, run, models="[cifar_resnet8,cifar_resnet8,cifar_resnet14]")
    cfg = str(_write_cfg(tmp_path))
    assert main(["run", cfg, *over, "student.init=auto", "student.lr=0", "student.epochs=1"]) == 0
    w = [load_tensors(run / f"iter{i}" / "model.safetensors") for i in range(3)]
    convs = [k for k, v in w[0].items() if v.dim() == 4]
    assert convs and all(torch.equal(w[0][k], w[1][k]) for k in convs)
    inits = [r for r in _events(run) if r.get("event") == "init"]
    assert [(r["stage"], r["init"]) for r in inits] == [
        ("iter1/train", "teacher"),
        ("iter2/train", "scratch"),
    ]


def test_student_init_teacher_needs_the_same_architecture(tiny_data, tmp_path, capsys):
    """Refused when the config is read, before a teacher is trained for nothing."""
    run = tmp_path / "run"
    over = [*tiny_overrides(tiny_data, run), "student.init=teacher"]
    assert main(["run", str(_write_cfg(tmp_path)), *over]) == 2
    err = capsys.readouterr().err
    assert "student.init=teacher needs the same architecture" in err and "cifar_resnet14" in err
    assert "student.init=auto" in err and not (run / "iter0" / "model.safetensors").exists()


def _events(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
