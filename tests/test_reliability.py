"""Reliability and safety: crash-safe writes, exact resume, bad data, hostile files, NaN, locks.

Every test is small (tiny images made here, cifar_resnet8, a few steps). The end-to-end kill test
is tests/test_fault_injection.py (slow marker).
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from noisystudent import engine, stages
from noisystudent.augment import ViewDataset, train_transform
from noisystudent.config import TrainConfig, load_config
from noisystudent.data import scan_class_folders
from noisystudent.errors import UserError
from noisystudent.models import create_model
from noisystudent.pipeline import open_run
from noisystudent.rundir import RunDir, atomic_write, load_state, write_json, write_text
from noisystudent.store import PseudoLabelStore

from .conftest import make_class_folders, tiny_overrides


# --------------------------------------------------------------------------------------------
# helpers
def _tiny_cfg(data, run_dir, *extra):
    return load_config(None, [*tiny_overrides(data, run_dir), "device=cpu", *extra])


def _truncated_png(path: Path, size: int = 16) -> Path:
    """A real PNG cut in half: the header reads, decoding fails."""
    full = path.with_suffix(".full.png")
    Image.fromarray(np.full((size, size, 3), 200, np.uint8)).save(full)
    data = full.read_bytes()
    full.unlink()
    path.write_bytes(data[: len(data) // 2])
    return path


class _Malicious:
    """Unpickling this would run `open(marker, 'w')` (what a hostile checkpoint does)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _student_setup(n_lab=12, n_unl=32, size=16, seed=0):
    rng = np.random.default_rng(seed)
    from noisystudent.data import ImageSet

    arr = rng.integers(0, 255, (n_lab + n_unl, size, size, 3), dtype=np.uint8)
    labels = np.arange(n_lab + n_unl) % 3
    full = ImageSet(["a", "b", "c"], [f"u{i}" for i in range(len(arr))], labels, array=arr)
    lab, unl = full.subset(np.arange(n_lab)), full.subset(np.arange(n_lab, n_lab + n_unl))
    tf = train_transform(size, True, True, "rand-m9-n2")
    targets = torch.softmax(torch.from_numpy(rng.normal(size=(n_unl, 3))).float(), 1)
    return (
        ViewDataset(lab, size, tf),
        torch.from_numpy(lab.labels),
        ViewDataset(unl, size, tf),
        targets,
    )


def _train(tmp, tc, workers=0, **kw):
    torch.manual_seed(0)
    model = create_model("cifar_resnet8", 3, 0.3, 0.2)
    lab, y, unl, t = _student_setup()
    run = RunDir(tmp)
    engine.train(model, lab, y, tc, tmp / "train", run, "s", 0, torch.device("cpu"), unl, t,
                 workers=workers, progress=False, log_every=2, **kw)  # fmt: skip
    return model, run


def _tc(**kw):
    base = dict(epochs=2, batch_size=4, ratio=2, warmup_epochs=0, checkpoint_every_steps=2)
    return TrainConfig(**{**base, **kw})


# --------------------------------------------------------------------------------------------
# crash safety
def test_write_error_keeps_previous_file_and_leaves_no_temp(tmp_path):
    p = write_text(tmp_path / "f.json", "old\n")

    def disk_full(tmp: Path) -> None:
        tmp.write_text("partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(UserError, match=r"cannot write '.*f.json': the disk is full; the previous"):
        atomic_write(p, disk_full)
    assert p.read_text() == "old\n"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["f.json"]


def test_disk_full_during_checkpoint_keeps_previous_checkpoint(tmp_path, monkeypatch):
    tc = _tc(epochs=1)
    real_save = torch.save
    calls = {"n": 0}

    def flaky_save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint: half written, then the disk is full
            Path(f).write_bytes(b"\x00" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr("noisystudent.rundir.torch.save", flaky_save)
    with pytest.raises(UserError, match="disk is full.*previous version"):
        _train(tmp_path, tc)
    st = load_state(tmp_path / "train" / "checkpoint.pt")  # the first one, intact
    assert st["position"]["step"] == 2
    assert not list((tmp_path / "train").glob(".*.tmp"))
    monkeypatch.setattr("noisystudent.rundir.torch.save", real_save)
    _train(tmp_path, tc)  # and the run resumes from it
    assert load_state(tmp_path / "train" / "checkpoint.pt")["position"]["epoch"] == 1


def test_lock_cleans_temp_files_and_a_torn_metrics_line(tmp_path):
    run = RunDir(tmp_path)
    run.log(event="a")
    with open(run.metrics_path, "a") as f:
        f.write('{"event": "tor')  # a power cut in the middle of an append
    (tmp_path / "iter0").mkdir()
    orphan = tmp_path / "iter0" / ".model.safetensors.abc123.tmp"
    orphan.write_bytes(b"half")
    rust_orphan = tmp_path / "iter0" / ".tmpV3Vuam"  # safetensors' own staging file (SIGKILL)
    rust_orphan.write_bytes(b"half")
    keep = tmp_path / "iter0" / ".tmpfile_of_the_user"
    keep.write_bytes(b"x")
    assert [e["event"] for e in run.metrics()] == ["a"]  # readers skip the torn line
    run.lock()
    try:
        assert not orphan.exists() and not rust_orphan.exists() and keep.exists()
        assert run.metrics_path.read_text().count("\n") == 1
        run.log(event="b")
        assert [e["event"] for e in run.metrics()] == ["a", "b"]
    finally:
        run.unlock()


def test_stage_is_done_only_while_outputs_verify(tmp_path):
    run = RunDir(tmp_path)
    out = write_json(tmp_path / "x" / "out.json", {"v": 1})
    run.mark("s", "done", outputs=[out])
    assert run.stage_done("s")
    rec = run.manifest()["stages"]["s"]["outputs"]["x/out.json"]
    assert set(rec) == {"size", "sha256"}
    out.write_text(out.read_text().replace("1", "2"))  # same size, different content
    assert not run.stage_done("s")
    assert "sha256" in run.verify_outputs("s")[0]
    out.unlink()
    assert not run.stage_done("s")
    with pytest.raises(UserError, match="was not written"):
        run.mark("t", "done", outputs=[tmp_path / "missing.json"])


def test_stage_whose_input_changed_is_not_done(tmp_path):
    run = RunDir(tmp_path)
    teacher = write_text(tmp_path / "teacher.bin", "weights v1")
    out = write_json(tmp_path / "labels.json", {"v": 1})
    run.mark("label", "done", inputs=[teacher], outputs=[out])
    assert run.stage_done("label")
    write_text(teacher, "weights v2")  # the teacher was retrained: its labels are stale
    assert run.stale_inputs("label") == ["teacher.bin"] and not run.stage_done("label")


# --------------------------------------------------------------------------------------------
# exact resume and determinism
def test_mid_epoch_resume_equals_uninterrupted(tmp_path, monkeypatch):
    tc = _tc(epochs=2, checkpoint_every_steps=2)
    ref, ref_run = _train(tmp_path / "ref", tc)
    real = engine.save_state
    calls = {"n": 0}

    def crash_after_third(path, state):
        real(path, state)
        calls["n"] += 1
        if calls["n"] == 3:  # mid-epoch 2 (4 steps/epoch: checkpoints at 2, 4=end, 6)
            raise KeyboardInterrupt

    monkeypatch.setattr(engine, "save_state", crash_after_third)
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "cut", tc)
    st = load_state(tmp_path / "cut" / "train" / "checkpoint.pt")
    assert st["position"] == {"epoch": 1, "step_in_epoch": 2, "step": 6}
    monkeypatch.setattr(engine, "save_state", real)
    got, got_run = _train(tmp_path / "cut", tc)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, got.state_dict()[k]), k
    strip = lambda run: [{k: v for k, v in e.items() if k != "time"} for e in run.metrics()  # noqa: E731
                         if e["event"] == "train"]  # fmt: skip
    resumed = strip(got_run)
    assert resumed[-len(strip(ref_run)) :] != [] and strip(ref_run)[-1] == resumed[-1]
    assert any(e["event"] == "resume" and e["step"] == 6 for e in got_run.metrics())


def test_augmentation_and_noise_do_not_depend_on_num_workers(tmp_path):
    tc = _tc(epochs=1, checkpoint_every_steps=0)
    a, _ = _train(tmp_path / "w0", tc, workers=0)
    b, _ = _train(tmp_path / "w2", tc, workers=2)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_checkpoint_from_other_settings_is_refused(tmp_path):
    _train(tmp_path, _tc(epochs=1))
    with pytest.raises(UserError, match=r"different run: .*lr=0\.05 \(this run: 0\.1\)"):
        _train(tmp_path, _tc(epochs=1, lr=0.1))
    _train(tmp_path, _tc(epochs=1, checkpoint_every_steps=3))  # a runtime key: accepted


def test_two_cpu_runs_give_identical_pseudo_labels_and_metrics(tiny_data, tmp_path):
    for name in ("a", "b"):  # teacher, evaluation and pseudo labels, twice in one process
        cfg = _tiny_cfg(tiny_data, tmp_path / name, "models=[cifar_resnet8]")
        run = open_run(cfg)
        try:
            d = stages.load_data(cfg, run)
            stages.train_stage(cfg, run, d, 0)
            stages.evaluate_stage(cfg, run, d, 0)
            stages.pseudo_label_stage(cfg, run, d, 0)
        finally:
            run.unlock()
    a, b = tmp_path / "a", tmp_path / "b"
    assert (a / "iter0/eval.json").read_bytes() == (b / "iter0/eval.json").read_bytes()
    for rel in ("iter0/model.safetensors", "iter0/pseudo/shard-00000.safetensors"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel  # byte for byte
    sa, sb = PseudoLabelStore.load(a / "iter0/pseudo"), PseudoLabelStore.load(b / "iter0/pseudo")
    assert sa.uids == sb.uids and torch.equal(sa.topk_prob, sb.topk_prob)
    strip = lambda d: [{k: v for k, v in e.items() if k not in ("time", "wall_s")}  # noqa: E731
                       for e in RunDir(d).metrics()]  # fmt: skip
    assert strip(a) == strip(b)


# --------------------------------------------------------------------------------------------
# numerical faults
def test_nan_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    real_ce = torch.nn.functional.cross_entropy
    calls = {"n": 0}

    def ce_nan_at_5(*a, **k):
        calls["n"] += 1
        out = real_ce(*a, **k)
        return out * float("nan") if calls["n"] == 5 else out

    monkeypatch.setattr(engine.F, "cross_entropy", ce_nan_at_5)
    with pytest.raises(UserError, match=r"loss became nan at step 5 \(epoch 2, step 1 of 4\).*"
                                        r"last good checkpoint .* \(step 4\) is kept"):  # fmt: skip
        _train(tmp_path, _tc(epochs=2, checkpoint_every_steps=2))
    st = load_state(tmp_path / "train" / "checkpoint.pt")
    assert st["position"]["step"] == 4
    assert all(torch.isfinite(v).all() for v in st["model"].values() if v.is_floating_point())


# --------------------------------------------------------------------------------------------
# concurrency
def test_second_process_is_refused_and_stale_lock_is_taken_over(tmp_path):
    code = (
        "import sys, time; from noisystudent.rundir import RunDir; "
        f"RunDir({str(tmp_path)!r}).lock(); print('locked', flush=True); time.sleep(60)"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert p.stdout.readline().strip() == b"locked"
        with pytest.raises(UserError, match=rf"in use by process {p.pid} on .*wait for it"):
            RunDir(tmp_path).lock()
    finally:
        p.kill()
        p.wait()
    assert json.loads((tmp_path / "lock").read_text())["pid"] == p.pid  # stale: owner is dead
    run = RunDir(tmp_path).lock()
    try:
        assert json.loads((tmp_path / "lock").read_text())["pid"] == os.getpid()
        run.lock()  # the same process may lock again
    finally:
        run.unlock()


def test_cli_refuses_a_run_dir_in_use(tiny_data, tmp_path, capsys):
    from noisystudent.cli import main

    run_dir = tmp_path / "run"
    code = (
        "import time; from noisystudent.rundir import RunDir; "
        f"RunDir({str(run_dir)!r}).lock(); print('locked', flush=True); time.sleep(60)"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert p.stdout.readline().strip() == b"locked"
        cfg = tmp_path / "c.yaml"
        cfg.write_text("seed: 0\n")
        assert main(["train-teacher", str(cfg), *tiny_overrides(tiny_data, run_dir)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and f"in use by process {p.pid}" in err
    finally:
        p.kill()
        p.wait()


# --------------------------------------------------------------------------------------------
# bad data, small images (decoded once into the cache)
def test_bad_unlabeled_images_are_skipped_listed_and_limited(tiny_data, tmp_path):
    _truncated_png(tiny_data["unlabeled"] / "red" / "trunc.png")
    (tiny_data["unlabeled"] / "junk.jpg").write_bytes(b"not an image at all")
    (tiny_data["unlabeled"] / "empty.png").write_bytes(b"")
    jpg = tiny_data["unlabeled"] / "green" / "cut.jpg"  # a JPEG that stops mid-scan
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(jpg)
    jpg.write_bytes(jpg.read_bytes()[:-300])
    run = RunDir(tmp_path / "run")
    data = stages.load_data(_tiny_cfg(tiny_data, run.root, "data.max_bad_fraction=0.1"), run)
    assert len(data.unlabeled) == 60
    listed = (run.root / "skipped_unlabeled.txt").read_text().split()
    assert sorted(listed) == ["empty.png", "green/cut.jpg", "junk.jpg", "red/trunc.png"]
    run2 = RunDir(tmp_path / "run2")
    with pytest.raises(UserError, match=r"4 of 64 unlabeled images are unreadable .*"
                                        r"data.max_bad_fraction=0.01"):  # fmt: skip
        stages.load_data(_tiny_cfg(tiny_data, run2.root), run2)
    with pytest.raises(
        UserError, match="cannot read image '.*(empty|junk|trunc|cut).*on_bad_image=skip"
    ):
        stages.load_data(_tiny_cfg(tiny_data, run2.root, "data.on_bad_image=error"), run2)


def test_decompression_bomb_is_a_bad_image_not_a_crash(tmp_path, monkeypatch):
    from PIL import Image as PILImage

    from noisystudent.data import BadImage, load_rgb

    p = tmp_path / "big.png"
    PILImage.new("RGB", (40, 40)).save(p)
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 100)  # 1,600 px > 2x the limit
    with pytest.raises(BadImage, match=r"big.png': DecompressionBombError"):
        load_rgb(p)


@pytest.mark.parametrize("which", ["labeled", "test"])
def test_bad_labeled_or_test_image_is_an_error_naming_it_unless_skipped(tiny_data, tmp_path, which):
    _truncated_png(tiny_data[which] / "green" / "bad.png")
    run = RunDir(tmp_path / "run")
    with pytest.raises(UserError) as e:
        stages.load_data(_tiny_cfg(tiny_data, run.root), run)
    msg = str(e.value)
    assert "\n" not in msg and "green/bad.png" in msg and "data.on_bad_labeled=skip" in msg
    cfg = _tiny_cfg(tiny_data, run.root, "data.on_bad_labeled=skip", "data.max_bad_fraction=0.1")
    data = stages.load_data(cfg, run)
    assert "green/bad.png" not in getattr(data, which).uids
    assert (run.root / f"skipped_{which}.txt").read_text() == "green/bad.png\n"


# --------------------------------------------------------------------------------------------
# bad data, large images (read per access in the DataLoader)
def test_bad_large_images_found_while_reading(tmp_path):
    size = 72  # > 64 px: file-backed, nothing decoded up front
    data = {k: make_class_folders(tmp_path / k, n, seed=s, size=size)
            for k, n, s in [("labeled", 2, 1), ("unlabeled", 4, 2), ("test", 1, 3)]}  # fmt: skip
    _truncated_png(data["unlabeled"] / "red" / "trunc.png", size)
    (data["unlabeled"] / "blue" / "junk.png").write_bytes(b"\x89PNG garbage")
    over = [f"data.image_size={size}", "models=[cifar_resnet8]", "teacher.epochs=1",
            "teacher.batch_size=6", "data.max_bad_fraction=0.2", "data.num_workers=1"]  # fmt: skip
    cfg = _tiny_cfg(data, tmp_path / "run", *over)
    run = open_run(cfg)
    try:
        d = stages.load_data(cfg, run)
        assert not d.small and len(d.unlabeled) == 14  # not found yet
        stages.train_stage(cfg, run, d, 0)
        stages.pseudo_label_stage(cfg, run, d, 0)
        store = PseudoLabelStore.load(run.iter_dir(0) / "pseudo")
        assert len(store.uids) == 12 and "red/trunc.png" not in store.uids
        listed = sorted((run.root / "skipped_unlabeled.txt").read_text().split())
        assert listed == ["blue/junk.png", "red/trunc.png"]

        # a bad labeled image is met in training: an error naming it, or skipped
        _truncated_png(data["labeled"] / "red" / "zz_bad.png", size)
        cfg2 = _tiny_cfg(data, tmp_path / "run2", *over)
        run2 = open_run(cfg2)
        d2 = stages.load_data(cfg2, run2)
        with pytest.raises(UserError, match=r"zz_bad.png.*data.on_bad_labeled=skip"):
            stages.train_stage(cfg2, run2, d2, 0)
        cfg3 = _tiny_cfg(data, tmp_path / "run3", *over, "data.on_bad_labeled=skip")
        run3 = open_run(cfg3)
        d3 = stages.load_data(cfg3, run3)
        stages.train_stage(cfg3, run3, d3, 0)
        assert (run3.root / "skipped_labeled.txt").read_text() == "red/zz_bad.png\n"
    finally:
        for r in [run] + [v for k, v in locals().items() if k in ("run2", "run3")]:
            r.unlock()


# --------------------------------------------------------------------------------------------
# hostile and foreign files
@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_pickle_checkpoint_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "train" / "checkpoint.pt"
    ckpt.parent.mkdir()
    with open(ckpt, "wb") as f:
        pickle.dump({"format": "noisystudent-train-state", "x": _Malicious(marker)}, f)
    with pytest.raises(UserError, match="pickled code or objects, refused"):
        load_state(ckpt)
    with pytest.raises(UserError, match="checkpoint.pt' is not a loadable training state"):
        _train(tmp_path, _tc(epochs=1))  # resume would read it: refused
    torch.save({"boom": _Malicious(marker)}, tmp_path / "torch_format.pt")  # torch's zip format
    with pytest.raises(UserError, match="refused"):
        load_state(tmp_path / "torch_format.pt")
    assert not marker.exists()


def test_pickled_decode_cache_is_never_unpickled(tmp_path):
    from noisystudent.data import decode_to_array, fingerprint

    make_class_folders(tmp_path / "l", 2)
    s = scan_class_folders(tmp_path / "l")
    marker = tmp_path / "pwned"
    cache = tmp_path / "cache"
    cache.mkdir()
    obj = np.empty(1, dtype=object)
    obj[0] = _Malicious(marker)
    np.savez(cache / f"labeled-{fingerprint(s, 16)}.npz", images=obj, keep=obj)
    out = decode_to_array(s, 16, cache, "labeled", skip_bad=False)
    assert out.array.shape == (6, 16, 16, 3) and not marker.exists()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A run directory whose teacher (iteration 0) is trained, plus its data and config."""
    from .conftest import make_class_folders as mk

    root = tmp_path_factory.mktemp("hostile")
    data = {"labeled": mk(root / "labeled", 4, seed=1), "unlabeled": mk(root / "unlabeled", 5, seed=2),
            "test": mk(root / "test", 2, seed=3)}  # fmt: skip
    cfg = _tiny_cfg(data, root / "run", "teacher.epochs=1")
    run = open_run(cfg)
    d = stages.load_data(cfg, run)
    stages.train_stage(cfg, run, d, 0)
    yield cfg, run, d
    run.unlock()


def _swap_model(run, i, name, classes, version="0.1.0", header=True):
    """Replace model i (weights and model.json) by another architecture/classes/version."""
    path = run.model_path(i)
    backup = (path.read_bytes(), (run.iter_dir(i) / "model.json").read_bytes())
    m = create_model(name, len(classes))
    meta = {"format": "noisystudent-model", "format_version": "1", "name": name,
            "num_classes": str(len(classes)), "classes": json.dumps(classes),
            "noisystudent_version": version}  # fmt: skip
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path),
              metadata=meta if header else None)  # fmt: skip
    write_json(run.iter_dir(i) / "model.json", {"name": name, "num_classes": len(classes),
                                                "classes": classes})  # fmt: skip
    return backup


def _restore(run, i, backup):
    run.model_path(i).write_bytes(backup[0])
    (run.iter_dir(i) / "model.json").write_bytes(backup[1])


@pytest.mark.parametrize(
    "name, classes, version, header, match",
    [
        (
            "cifar_resnet14",
            None,
            "0.1.0",
            True,
            r"architecture 'cifar_resnet14' vs 'cifar_resnet8'",
        ),
        ("cifar_resnet8", ["a", "b"], "0.1.0", True, r"classes \['a', 'b'\] vs \['blue'"),
        (
            "cifar_resnet8",
            None,
            "7.3.0",
            True,
            r"written by noisystudent 7.3.0 .* this is noisystudent",
        ),
        ("cifar_resnet8", None, "0.1.0", False, r"not a noisystudent model file"),
    ],
)
def test_foreign_model_file_is_refused_saying_what_differs(trained_run, name, classes, version,
                                                           header, match):  # fmt: skip
    cfg, run, d = trained_run
    backup = _swap_model(run, 0, name, classes or d.classes, version, header)
    try:
        with pytest.raises(UserError, match=match) as e:
            stages.pseudo_label_stage(cfg, run, d, 0)
        assert "\n" not in str(e.value)
    finally:
        _restore(run, 0, backup)
    stages.load_model(run, 0, "teacher", cfg.models[0], d.classes)  # the real one loads


def test_model_changed_after_training_is_refused(trained_run):
    cfg, run, d = trained_run
    path = run.model_path(0)
    backup = path.read_bytes()
    try:
        b = bytearray(backup)
        b[-1] ^= 1  # one flipped bit in the weights
        path.write_bytes(bytes(b))
        with pytest.raises(UserError, match="changed after its training stage.*sha256"):
            stages.load_model(run, 0, "teacher", cfg.models[0], d.classes)
    finally:
        path.write_bytes(backup)


def test_missing_teacher_is_an_error_not_a_random_model(tmp_path, tiny_data):
    cfg = _tiny_cfg(tiny_data, tmp_path / "run")
    run = open_run(cfg)
    try:
        d = stages.load_data(cfg, run)
        with pytest.raises(UserError, match="no teacher checkpoint at .*train-teacher"):
            stages.pseudo_label_stage(cfg, run, d, 0)
    finally:
        run.unlock()


def test_training_checkpoint_for_other_classes_is_refused(tmp_path):
    _train(tmp_path, _tc(epochs=1))
    st = load_state(tmp_path / "train" / "checkpoint.pt")
    st["identity"]["classes"] = ["x", "y"]
    torch.save(st, tmp_path / "train" / "checkpoint.pt")
    with pytest.raises(UserError, match=r"different run: classes=\['x', 'y'\]"):
        model = create_model("cifar_resnet8", 3)
        lab, y, unl, t = _student_setup()
        engine.train(model, lab, y, _tc(epochs=1), tmp_path / "train", RunDir(tmp_path), "s", 0,
                     torch.device("cpu"), unl, t, progress=False,
                     identity={"classes": ["a", "b", "c"]})  # fmt: skip


# --------------------------------------------------------------------------------------------
# pseudo-labeling resumes per shard
def test_pseudo_label_stage_resumes_after_its_last_complete_shard(trained_run, monkeypatch):
    cfg, run, d = trained_run
    root = run.iter_dir(0) / "pseudo"
    monkeypatch.setattr(cfg.pseudo, "shard_size", 4)
    monkeypatch.setattr(cfg.pseudo, "batch_size", 2)
    stages.pseudo_label_stage(cfg, run, d, 0)  # one uninterrupted pass first, as the reference
    want = PseudoLabelStore.load(root)
    m = run.manifest()
    del m["stages"]["iter0/pseudo-label"]
    write_json(run.manifest_path, m)
    for f in root.iterdir():
        f.unlink()

    import noisystudent.labeling as labeling

    real_write = labeling.write_shard
    calls = {"n": 0}

    def dying_write(*a, **k):
        if calls["n"] == 2:  # killed while labeling the third shard
            raise KeyboardInterrupt
        calls["n"] += 1
        return real_write(*a, **k)

    monkeypatch.setattr(labeling, "write_shard", dying_write)
    with pytest.raises(KeyboardInterrupt):
        stages.pseudo_label_stage(cfg, run, d, 0)
    done = sorted(f.name for f in root.glob("shard-*.safetensors"))
    assert done == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert not (root / "meta.json").exists()
    kept = {f: (root / f).stat().st_mtime_ns for f in done}
    monkeypatch.setattr(labeling, "write_shard", real_write)
    stages.pseudo_label_stage(cfg, run, d, 0)
    got = PseudoLabelStore.load(root)
    assert got.uids == want.uids and torch.equal(got.topk_prob, want.topk_prob)
    assert {f: (root / f).stat().st_mtime_ns for f in done} == kept  # not labeled again
    assert any(e["event"] == "resume" for e in run.metrics())


def test_extra_state_such_as_an_ema_is_checkpointed_and_restored(tmp_path, monkeypatch):
    class Counter:  # stands in for a weight EMA: anything with state_dict / load_state_dict
        def __init__(self):
            self.n = torch.zeros(())

        def state_dict(self):
            return {"n": self.n.clone()}

        def load_state_dict(self, st):
            self.n = st["n"].clone()

    saved = Counter()
    saved.n += 7
    _train(tmp_path, _tc(epochs=1), extra_state={"ema": saved})
    assert load_state(tmp_path / "train" / "checkpoint.pt")["extra"]["ema"]["n"] == 7
    restored = Counter()
    _train(tmp_path, _tc(epochs=1), extra_state={"ema": restored})  # resumes at the end
    assert restored.n == 7


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 1 MiB filesystem (tmpfs), where mounting is allowed (root); else the test skips."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                       capture_output=True)  # fmt: skip
    if r.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_really_full_disk_during_training_keeps_previous_checkpoint(tiny_disk):
    # cifar_resnet8's checkpoint (weights + momentum) is ~0.65 MB: the first fits, the second
    # cannot be written beside it. torch.save reports that as a RuntimeError; it must still
    # become a one-line "disk is full" error with the first checkpoint intact.
    with pytest.raises(UserError, match=r"checkpoint.pt': the disk is full; the previous"):
        _train(tiny_disk, _tc(epochs=1, checkpoint_every_steps=1))
    st = load_state(tiny_disk / "train" / "checkpoint.pt")
    assert st["position"]["step"] == 1
    assert not list(tiny_disk.rglob(".*.tmp"))


def test_safetensors_files_are_byte_identical_across_processes(tmp_path):
    # safetensors orders its metadata map randomly per process; equal content must still give
    # equal bytes (the manifest and the pseudo-label store identify files by sha256)
    code = (
        "import sys, torch; from noisystudent.rundir import save_tensors; "
        "save_tensors(sys.argv[1], {'w': torch.arange(6.0), 'i': torch.ones(2, dtype=torch.int16)},"
        " {k: k * 3 for k in 'abcdefgh'})"
    )
    for name in ("a", "b"):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / name)], check=True)
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()
