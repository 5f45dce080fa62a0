"""End to end: a one-iteration pipeline (teacher + one student) on a tiny dataset, and resume."""

import shutil

import torch

from noisystudent import checkpoint
from noisystudent.artifacts import read_counts, read_eval, read_summary
from noisystudent.cli import main
from noisystudent.rundir import RunDir, RunLayout, load_state, load_tensors, read_json
from noisystudent.store import PseudoLabelStore

from .conftest import tiny_overrides

STAGES = ["train", "evaluate", "pseudo-label", "select"]


def test_one_iteration_pipeline_end_to_end(tiny_data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["run", str(_write_cfg(tmp_path)), *tiny_overrides(tiny_data, run_dir)]) == 0
    out = capsys.readouterr().out
    assert "test top-1" in out and str(run_dir) in out
    run = RunDir(run_dir)
    it0, it1 = run.it(0), run.it(1)
    for path in [
        run.paths.config,
        run.paths.manifest,
        run.paths.metrics,
        run.paths.summary,
        it0.model,
        it0.model_meta,
        it0.eval,
        it0.pseudo_meta,
        it0.audit,
        it0.selected,
        it0.counts,
        it1.model,
        it1.eval,
    ]:
        assert path.is_file(), path
    it = read_summary(run)["iterations"]
    assert [r["iteration"] for r in it] == [0, 1]
    assert [r["model"] for r in it] == ["cifar_resnet8", "cifar_resnet14"]
    assert it[0]["params"] < it[1]["params"]
    for r, paths in zip(it, (it0, it1), strict=True):
        ev = read_eval(paths)
        assert ev["n"] == 18 and r["test_top1"] == ev["top1"] and r["test_top5"] == ev["top5"]
        assert r["test_top5"] == 100.0  # 3 classes: the top 5 always holds the label
    # colour-coded classes: the teacher learns them; the student (2 epochs from scratch, on 60
    # images) is still well above chance (33%) on the 18 test images
    assert it[0]["test_top1"] >= 90.0 and it[1]["test_top1"] >= 50.0, it
    assert it[0]["pseudo_label_acc"] is None and it[1]["pseudo_label_acc"] is not None
    counts = read_counts(run, 0)
    assert it[1]["pseudo_label_acc"] == counts["pseudo_label_acc"] >= 90.0  # the teacher's
    assert it[1]["passed_filter_fraction"] == counts["passed_filter"] / counts["total"]
    assert it[1]["kept_unique_fraction"] == counts["kept_unique"] / counts["total"]
    assert 0 < counts["kept_unique"] <= counts["passed_filter"] <= counts["total"] == 60
    assert counts["selected_rows"] == sum(counts["after"]) >= counts["kept_unique"]
    assert "kept_fraction" not in counts and "kept_fraction" not in it[1]
    assert f"{counts['passed_filter']}/60 passed the filter, {counts['kept_unique']} unique" in out
    manifest = run.manifest.read()["stages"]
    assert all(s["status"] == "done" for s in manifest.values())
    assert set(manifest) == {it0.stage(s) for s in STAGES} | {it1.stage(s) for s in STAGES[:2]}
    assert all(run.stage_done(name) for name in manifest)
    # the store: one row per unlabeled image (60), uids are relative paths, probabilities sum to 1
    store = PseudoLabelStore.load(it0.pseudo)
    assert len(store.uids) == 60 and "red/000.png" in store.uids
    assert store.index.tolist() == list(range(60))
    assert torch.allclose(store.dense(torch.arange(60)).sum(1), torch.ones(60), atol=1e-3)
    assert sum(counts["before"]) == 60 and len(counts["after"]) == 3
    rows = load_tensors(it0.selected)["rows"]
    assert len(rows) == counts["selected_rows"]
    assert (store.max_prob[rows] >= 0.3).all()
    assert len(torch.unique(rows)) == counts["kept_unique"]
    assert int((store.max_prob >= 0.3).sum()) == counts["passed_filter"]
    audit = read_json(it0.audit)
    assert audit["audited"] == 60 and audit["accuracy"] >= 90.0


def _write_cfg(tmp_path):
    p = tmp_path / "cfg.yaml"
    p.write_text("seed: 0\n")
    return p


def test_resume_after_teacher_does_not_retrain(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    run = RunDir(run_dir)
    cfg = str(_write_cfg(tmp_path))
    over = tiny_overrides(tiny_data, run_dir)
    assert main(["train-teacher", cfg, *over]) == 0
    w0 = run.it(0).model.read_bytes()
    mtime = run.it(0).model.stat().st_mtime_ns
    n_train_events = _count(run, run.it(0).stage("train"))
    assert n_train_events > 0
    assert main(["run", cfg, *over]) == 0
    assert run.it(0).model.stat().st_mtime_ns == mtime  # not retrained
    assert run.it(0).model.read_bytes() == w0
    assert _count(run, run.it(0).stage("train")) == n_train_events
    first = read_summary(run)

    # the same result as an uninterrupted run with the same seed (CPU is deterministic)
    run2 = RunDir(tmp_path / "run2")
    assert main(["run", cfg, *tiny_overrides(tiny_data, run2.root)]) == 0
    second = read_summary(run2)
    strip = lambda s: [{k: v for k, v in r.items() if k != "wall_s"} for r in s["iterations"]]  # noqa: E731
    assert strip(first) == strip(second) and len(strip(first)) == 2
    for i in (0, 1):
        a = load_tensors(run.it(i).model)
        b = load_tensors(run2.it(i).model)
        assert all(torch.equal(a[k], b[k]) for k in a), f"iter{i} weights differ"

    # a finished run re-run does nothing and keeps its results
    mtime1 = run.it(1).model.stat().st_mtime_ns
    n_events = len(run.metrics())
    assert main(["run", cfg, *over]) == 0
    assert run.it(1).model.stat().st_mtime_ns == mtime1
    assert not [e for e in run.metrics()[n_events:] if e.get("event") == "train"]


def test_interrupted_training_resumes_from_last_epoch(tiny_data, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run = RunDir(run_dir)
    cfg = str(_write_cfg(tmp_path))
    over = tiny_overrides(tiny_data, run_dir)
    # the uninterrupted reference: 3 epochs
    assert main(["train-teacher", cfg, *over, "teacher.epochs=3"]) == 0
    ref = load_tensors(run.it(0).model)
    shutil.rmtree(run_dir)

    # train 2 of 3 epochs, then "crash": the per-epoch checkpoint is kept, the stage is not done
    real = checkpoint.save_state
    calls = {"n": 0}

    def crash_after_two(path, state):
        real(path, state)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_state", crash_after_two)
    assert main(["train-teacher", cfg, *over, "teacher.epochs=3"]) == 130
    monkeypatch.setattr(checkpoint, "save_state", real)
    run = RunDir(run_dir)
    assert not run.it(0).model.exists()
    assert not run.stage_done(run.it(0).stage("train"))
    assert load_state(run.it(0).checkpoint)["position"]["epoch"] == 2
    assert main(["train-teacher", cfg, *over, "teacher.epochs=3"]) == 0
    resumed = load_tensors(run.it(0).model)
    events = run.metrics()
    assert any(e.get("event") == "resume" and e.get("epoch") == 2 for e in events)
    assert ref.keys() == resumed.keys()
    for k in ref:
        assert torch.allclose(ref[k].float(), resumed[k].float(), atol=1e-5), k


def _count(run, stage):
    return sum(1 for e in run.metrics() if e.get("stage") == stage)


def test_weight_ema_is_the_saved_model(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    run = RunDir(run_dir)
    cfg = str(_write_cfg(tmp_path))
    over = [*tiny_overrides(tiny_data, run_dir), "teacher.ema_decay=0.9"]
    assert main(["train-teacher", cfg, *over]) == 0
    saved = load_tensors(run.it(0).model)
    state = load_state(run.it(0).checkpoint)
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
    run_dir = tmp_path / "run"
    data = {**tiny_data, "labeled": tmp_path / "split" / "labeled.tsv",
            "unlabeled": tmp_path / "split" / "unlabeled.tsv"}  # fmt: skip
    args = [*tiny_overrides(data, run_dir, "[cifar_resnet8,cifar_resnet8]"), "data.image_size=72"]
    args += ["teacher.epochs=1", "student.epochs=1"]
    assert main(["run", str(_write_cfg(tmp_path)), *args]) == 0
    run = RunDir(run_dir)
    store = PseudoLabelStore.load(run.it(0).pseudo)
    assert len(store.uids) == 48 and not run.paths.cache.exists()
    assert read_json(run.it(0).audit)["audited"] == 48
    assert [r["iteration"] for r in read_summary(run)["iterations"]] == [0, 1]


def test_student_init_auto_starts_equal_size_students_from_their_teacher(tiny_data, tmp_path):
    """student.init=auto: an equal-size student starts from its teacher's weights (with lr 0
    its convolutions stay the teacher's), a larger one from scratch; both choices are logged."""
    run_dir = tmp_path / "run"
    run = RunDir(run_dir)
    over = tiny_overrides(tiny_data, run_dir, models="[cifar_resnet8,cifar_resnet8,cifar_resnet14]")
    cfg = str(_write_cfg(tmp_path))
    assert main(["run", cfg, *over, "student.init=auto", "student.lr=0", "student.epochs=1"]) == 0
    w = [load_tensors(run.it(i).model) for i in range(3)]
    convs = [k for k, v in w[0].items() if v.dim() == 4]
    assert convs and all(torch.equal(w[0][k], w[1][k]) for k in convs)
    inits = [r for r in run.metrics() if r.get("event") == "init"]
    assert [(r["stage"], r["init"]) for r in inits] == [
        (run.it(1).stage("train"), "teacher"),
        (run.it(2).stage("train"), "scratch"),
    ]
    # the teacher's weights are an input of the student that started from them, only of that one
    inputs = [run.manifest.entry(run.it(i).stage("train"))["inputs"] for i in (1, 2)]
    assert run.manifest.rel(run.it(0).model) in inputs[0]
    assert run.manifest.rel(run.it(1).model) not in inputs[1]


def test_student_init_teacher_needs_the_same_architecture(tiny_data, tmp_path, capsys):
    """Refused when the config is read, before a teacher is trained for nothing."""
    run_dir = tmp_path / "run"
    over = [*tiny_overrides(tiny_data, run_dir), "student.init=teacher"]
    assert main(["run", str(_write_cfg(tmp_path)), *over]) == 2
    err = capsys.readouterr().err
    assert "student.init=teacher needs the same architecture" in err and "cifar_resnet14" in err
    assert "student.init=auto" in err and not RunLayout(run_dir).it(0).model.exists()


def test_stage_commands_print_what_they_made(tiny_data, tmp_path, capsys):
    run_dir = tmp_path / "run"
    cfg = str(_write_cfg(tmp_path))
    over = tiny_overrides(tiny_data, run_dir)
    run = RunDir(run_dir)
    assert main(["train-teacher", cfg, *over]) == 0
    out = capsys.readouterr().out
    assert "[iter 0] cifar_resnet8 (" in out and "trained in " in out
    assert f": {run.it(0).model};" in out and "noisystudent evaluate --iteration 0" in out
    assert main(["pseudo-label", cfg, *over]) == 0
    out = capsys.readouterr().out
    audit = read_json(run.it(0).audit)
    assert f"[iter 0] pseudo labels of 60 unlabeled images: {run.it(0).pseudo}" in out
    assert f"(accuracy {audit['accuracy']:.2f}% on the 60 with a known label)" in out
    assert main(["select", cfg, *over]) == 0
    counts = read_counts(run, 0)
    assert f"{counts['passed_filter']}/60 passed the filter" in capsys.readouterr().out
    assert main(["evaluate", cfg, *over]) == 0
    top1 = read_eval(run.it(0))["top1"]
    assert f"cifar_resnet8: test top-1 {top1:.2f}%" in capsys.readouterr().out
