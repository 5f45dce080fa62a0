"""Training checkpoints: exact mid-epoch resume, determinism, refusing foreign checkpoints,
NaN loss, extra (EMA) state, and a really full disk."""

from __future__ import annotations

import subprocess

import pytest
import torch

from noisystudent import checkpoint, engine
from noisystudent.checkpoint import Checkpoint
from noisystudent.errors import UserError
from noisystudent.rundir import RunDir, load_state

from .helpers import small_tc, train_small


def test_mid_epoch_resume_equals_uninterrupted(tmp_path, monkeypatch):
    tc = small_tc(epochs=2, checkpoint_every_steps=2)
    ref, ref_run = train_small(tmp_path / "ref", tc)
    real = checkpoint.save_state
    calls = {"n": 0}

    def crash_after_third(path, state):
        real(path, state)
        calls["n"] += 1
        if calls["n"] == 3:  # mid-epoch 2 (4 steps/epoch: checkpoints at 2, 4=end, 6)
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_state", crash_after_third)
    with pytest.raises(KeyboardInterrupt):
        train_small(tmp_path / "cut", tc)
    st = load_state(tmp_path / "cut" / "train" / "checkpoint.pt")
    assert st["position"] == {"epoch": 1, "step_in_epoch": 2, "step": 6}
    monkeypatch.setattr(checkpoint, "save_state", real)
    got, got_run = train_small(tmp_path / "cut", tc)
    for k, v in ref.state_dict().items():
        assert torch.equal(v, got.state_dict()[k]), k
    strip = lambda run: [{k: v for k, v in e.items() if k != "time"} for e in run.metrics()  # noqa: E731
                         if e["event"] == "train"]  # fmt: skip
    resumed = strip(got_run)
    assert resumed[-len(strip(ref_run)) :] != [] and strip(ref_run)[-1] == resumed[-1]
    assert any(e["event"] == "resume" and e["step"] == 6 for e in got_run.metrics())


def test_augmentation_and_noise_do_not_depend_on_num_workers(tmp_path):
    tc = small_tc(epochs=1, checkpoint_every_steps=0)
    a, _ = train_small(tmp_path / "w0", tc, workers=0)
    b, _ = train_small(tmp_path / "w2", tc, workers=2)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k]), k


def test_checkpoint_from_other_settings_is_refused(tmp_path):
    train_small(tmp_path, small_tc(epochs=1))
    with pytest.raises(UserError, match=r"different run: .*lr=0\.05 \(this run: 0\.1\)"):
        train_small(tmp_path, small_tc(epochs=1, lr=0.1))
    train_small(tmp_path, small_tc(epochs=1, checkpoint_every_steps=3))  # a runtime key: accepted


def test_training_checkpoint_for_other_classes_is_refused(tmp_path):
    train_small(tmp_path, small_tc(epochs=1))
    st = load_state(tmp_path / "train" / "checkpoint.pt")
    st["identity"]["classes"] = ["x", "y"]
    torch.save(st, tmp_path / "train" / "checkpoint.pt")
    ckpt = Checkpoint(tmp_path / "train" / "checkpoint.pt", {"classes": ["a", "b", "c"]})
    with pytest.raises(UserError, match=r"different run: classes=\['x', 'y'\]"):
        train_small(tmp_path, small_tc(epochs=1), ckpt=ckpt)


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
        train_small(tmp_path, small_tc(epochs=2, checkpoint_every_steps=2))
    st = load_state(tmp_path / "train" / "checkpoint.pt")
    assert st["position"]["step"] == 4
    assert all(torch.isfinite(v).all() for v in st["model"].values() if v.is_floating_point())


def test_non_finite_weights_with_a_finite_loss_are_never_checkpointed(tmp_path, monkeypatch):
    """A step can blow the weights up while the loss it computed (before stepping) was fine:
    the state itself is checked before each checkpoint, and the last good one is kept."""
    real = engine.build_optimizer

    def poisoned(model, tc):
        opt, calls = real(model, tc), {"n": 0}

        def after_step(*_):
            calls["n"] += 1
            if calls["n"] == 3:
                with torch.no_grad():
                    next(model.parameters()).fill_(float("inf"))

        opt.register_step_post_hook(after_step)
        return opt

    monkeypatch.setattr(engine, "build_optimizer", poisoned)
    with pytest.raises(UserError, match=r"tensors hold NaN or inf at step 3 \(epoch 1, step 3 of "
                                        r"4; first: model\..*last good checkpoint .* \(step 2\)"):  # fmt: skip
        train_small(tmp_path, small_tc(epochs=2, checkpoint_every_steps=1))
    st = load_state(tmp_path / "train" / "checkpoint.pt")
    assert st["position"]["step"] == 2
    for part in ("model", "optimizer"):
        tensors = engine._non_finite({part: _StateOf(st[part])})
        assert tensors == [], tensors


class _StateOf:
    def __init__(self, st):
        self.st = st

    def state_dict(self):
        return self.st


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
    path = tmp_path / "train" / "checkpoint.pt"
    train_small(tmp_path, small_tc(epochs=1), ckpt=Checkpoint(path, extra={"ema": saved}))
    assert load_state(tmp_path / "train" / "checkpoint.pt")["extra"]["ema"]["n"] == 7
    restored = Counter()
    train_small(tmp_path, small_tc(epochs=1), ckpt=Checkpoint(path, extra={"ema": restored}))
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
        train_small(tiny_disk, small_tc(epochs=1, checkpoint_every_steps=1))
    st = load_state(tiny_disk / "train" / "checkpoint.pt")
    assert st["position"]["step"] == 1
    assert not list(tiny_disk.rglob(".*.tmp"))


def test_a_diverging_teacher_keeps_a_finite_checkpoint_and_the_advice_works(
    tiny_data, tmp_path, capsys
):
    """teacher.lr=1e12 with a checkpoint every step: one line naming the step; the checkpoint
    on disk holds only finite tensors; the command the message suggests completes."""
    import re
    import shlex

    from noisystudent.cli import main

    from .conftest import tiny_overrides

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("device: cpu\n")
    run_dir = tmp_path / "run"
    over = [*tiny_overrides(tiny_data, run_dir), "teacher.lr=1e12",
            "teacher.checkpoint_every_steps=1"]  # fmt: skip
    assert main(["train-teacher", str(cfg), *over]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert re.search(r"iter0/train: .* at step \d+ \(epoch \d+, step \d+ of \d+", err), err
    ckpt = RunDir(run_dir).it(0).checkpoint
    st = load_state(ckpt)  # the last good one
    for part in ("model", "optimizer"):
        assert engine._non_finite({part: _StateOf(st[part])}) == []
    advice = re.search(r"add `([^`]+)` to the command", err)
    assert advice, err
    assert main(["train-teacher", str(cfg), *over, *shlex.split(advice.group(1))]) == 0
