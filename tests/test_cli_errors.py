"""Bad input: one line on stderr naming the problem, exit code 2, no traceback."""

import contextlib
import errno
import json
import os
import subprocess
from pathlib import Path

import pytest

from noisystudent.cli import main
from noisystudent.rundir import RunLayout, read_lines_json

from .conftest import make_class_folders, tiny_overrides
from .conftest import one_line_error as _err
from .test_rundir_io import _faulty_writes


def test_missing_folder(capsys, cfg, tiny_data, tmp_path):
    over = tiny_overrides(tiny_data, tmp_path / "run") + [f"data.labeled={tmp_path / 'nope'}"]
    assert "nope' does not exist" in _err(capsys, ["run", cfg, *over])


def test_empty_class_folder(capsys, cfg, tiny_data, tmp_path):
    (tiny_data["labeled"] / "yellow").mkdir()
    err = _err(capsys, ["run", cfg, *tiny_overrides(tiny_data, tmp_path / "run")])
    assert "yellow' holds no images" in err


def test_corrupt_image(capsys, cfg, tiny_data, tmp_path):
    (tiny_data["test"] / "red" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    err = _err(capsys, ["run", cfg, *tiny_overrides(tiny_data, tmp_path / "run")])
    assert "bad.png" in err and "cannot read image" in err


def test_test_classes_differ(capsys, cfg, tiny_data, tmp_path):
    make_class_folders(tiny_data["test"], 2, classes=["purple"])
    err = _err(capsys, ["run", cfg, *tiny_overrides(tiny_data, tmp_path / "run")])
    assert "test classes differ" in err and "purple" in err


def test_unknown_model(capsys, cfg, tiny_data, tmp_path):
    over = tiny_overrides(tiny_data, tmp_path / "run", models="[cifar_resnet8,not_a_model_xyz]")
    assert "unknown model 'not_a_model_xyz'" in _err(capsys, ["run", cfg, *over])


def test_unknown_or_mistyped_key(capsys, cfg, tiny_data, tmp_path):
    over = tiny_overrides(tiny_data, tmp_path / "run")
    assert "unknown config key 'teacher.epoch'" in _err(
        capsys, ["run", cfg, *over, "teacher.epoch=3"]
    )
    bad = tmp_path / "bad.yaml"
    bad.write_text("studnet:\n  ratio: 2\n")
    assert "unknown config key 'studnet'" in _err(capsys, ["run", str(bad)])


def test_missing_config_file(capsys, tmp_path):
    assert "not found" in _err(capsys, ["run", str(tmp_path / "missing.yaml")])


def test_pseudo_label_without_teacher_checkpoint(capsys, cfg, tiny_data, tmp_path):
    run = tmp_path / "run"
    err = _err(capsys, ["pseudo-label", cfg, *tiny_overrides(tiny_data, run)])
    assert "no teacher checkpoint" in err and "train-teacher" in err
    assert not RunLayout(run).it(0).pseudo_meta.exists()  # nothing labeled with garbage


def test_train_student_without_selection(capsys, cfg, tiny_data, tmp_path):
    err = _err(capsys, ["train-student", cfg, *tiny_overrides(tiny_data, tmp_path / "run")])
    assert "no selected pseudo labels" in err


def test_smaller_student_refused(capsys, cfg, tiny_data, tmp_path):
    over = tiny_overrides(tiny_data, tmp_path / "run", models="[cifar_resnet14,cifar_resnet8]")
    assert "smaller than its teacher" in _err(capsys, ["run", cfg, *over])


def test_changed_config_on_existing_run_dir(capsys, cfg, tiny_data, tmp_path):
    run = tmp_path / "run"
    over = tiny_overrides(tiny_data, run)
    assert main(["train-teacher", cfg, *over]) == 0
    capsys.readouterr()
    err = _err(capsys, ["run", cfg, *over, "select.threshold=0.5"])
    assert "different config" in err and "select.threshold" in err


# a failed start ---------------------------------------------------------------------------
def _teacher_only(data, run, **over):
    """The quickest command that trains: the teacher alone, one epoch."""
    argv = tiny_overrides(data, run, models="[cifar_resnet8]") + ["teacher.epochs=1"]
    return argv + [f"{k}={v}" for k, v in over.items()]


@pytest.mark.parametrize("failure", ["bad_model_name", "extra_test_class"])
def test_failed_start_does_not_block_the_corrected_command(
    capsys, cfg, tiny_data, tmp_path, failure
):
    run = tmp_path / "run"
    if failure == "bad_model_name":
        bad = ["train-teacher", cfg, *_teacher_only(tiny_data, run), "models=[cifar_resnt8]"]
        fixed = ["train-teacher", cfg, *_teacher_only(tiny_data, run)]
        assert "unknown model 'cifar_resnt8'" in _err(capsys, bad)
        assert not run.exists()  # found before anything is written: nothing to be in the way
        assert main(fixed) == 0, capsys.readouterr().err
        assert RunLayout(run).it(0).model.is_file()
        return
    else:
        extra = make_class_folders(tmp_path / "test2", 2)  # blue, green, red ...
        make_class_folders(extra, 2, classes=["purple"])  # ... and a class labeled lacks
        bad = ["train-teacher", cfg, *_teacher_only(tiny_data, run, **{"data.test": extra})]
        fixed = ["train-teacher", cfg, *_teacher_only(tiny_data, run)]
        assert "test classes differ" in _err(capsys, bad)
    assert RunLayout(run).config.is_file()  # the failed start got as far as saving its config
    assert main(fixed) == 0, capsys.readouterr().err  # ... which does not bind the directory
    out = capsys.readouterr().out
    assert "no stage has run yet, so its config.yaml is replaced" in out
    assert RunLayout(run).it(0).model.is_file()
    # once a stage has run, the directory belongs to its config: a changed one is refused
    err = _err(
        capsys, ["train-teacher", cfg, *_teacher_only(tiny_data, run, **{"teacher.lr": 0.3})]
    )
    assert "different config" in err and "teacher.lr" in err
    assert main(fixed) == 0  # the same command again: resumes (nothing to do)


# run_dir that cannot be one ---------------------------------------------------------------
def _refuses_writes(folder: Path) -> bool:
    try:
        (folder / ".probe").touch()
    except OSError:
        return True
    (folder / ".probe").unlink()
    return False


@contextlib.contextmanager
def _read_only(folder: Path, monkeypatch):
    """Make `folder` refuse new files, as a read-only mount does. Permission bits do not stop
    root (tests may run as root): then the immutable attribute (`chattr +i`, which does), and
    where even that is unavailable, os.access reporting the folder read-only."""
    folder.chmod(0o555)
    immutable = False
    try:
        if not _refuses_writes(folder):
            immutable = subprocess.run(["chattr", "+i", str(folder)],
                                       capture_output=True).returncode == 0  # fmt: skip
            if not (immutable and _refuses_writes(folder)):
                real = os.access
                ro = str(folder.resolve())
                monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: (
                    False if str(Path(p).resolve()) == ro and mode & os.W_OK
                    else real(p, mode, *a, **k)))  # fmt: skip
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)


def test_run_dir_under_a_read_only_folder(capsys, cfg, tiny_data, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    run = ro / "run"
    if not _refuses_writes(ro):  # root: sysfs refuses new entries even to root
        run = Path("/sys/noisystudent-test-run")
        assert not run.exists() and _refuses_writes(Path("/sys"))
    err = _err(capsys, ["train-teacher", cfg, *_teacher_only(tiny_data, run)])
    assert f"run_dir '{run}' is not writable" in err and "give a folder you can write to" in err
    assert not run.exists()


def test_existing_run_dir_that_became_read_only(capsys, cfg, tiny_data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    over = _teacher_only(tiny_data, run)
    assert main(["train-teacher", cfg, *over]) == 0  # a run directory with a finished stage
    with _read_only(run, monkeypatch):
        err = _err(capsys, ["train-teacher", cfg, *over])
    assert f"run_dir '{run}' is not writable" in err and "give a folder you can write to" in err


def test_run_dir_that_is_a_file_or_under_a_file(capsys, cfg, tiny_data, tmp_path):
    f = tmp_path / "afile"
    f.write_text("not a folder\n")
    err = _err(capsys, ["train-teacher", cfg, *_teacher_only(tiny_data, f)])
    assert f"run_dir '{f}' is a file" in err
    err = _err(capsys, ["train-teacher", cfg, *_teacher_only(tiny_data, f / "sub" / "run")])
    assert f"run_dir '{f / 'sub' / 'run'}' lies under a file" in err
    assert f.read_text() == "not a folder\n"


def test_lock_file_that_cannot_be_opened(capsys, cfg, tiny_data, tmp_path):
    run = tmp_path / "run"
    RunLayout(run).lock.mkdir(parents=True)  # something in the way of the lock file
    err = _err(capsys, ["train-teacher", cfg, *_teacher_only(tiny_data, run)])
    assert f"cannot use run_dir '{run}' (Is a directory: '{run / 'lock'}')" in err


# a full disk while appending to metrics.jsonl ----------------------------------------------
@pytest.mark.parametrize("fault", ["disk_full", "short_write_then_disk_full"])
def test_full_disk_appending_metrics(capsys, cfg, tiny_data, tmp_path, monkeypatch, fault):
    run = tmp_path / "run"
    metrics = RunLayout(run).metrics
    run.mkdir()
    metrics.touch()
    enospc = OSError(errno.ENOSPC, "No space left on device")
    _faulty_writes(monkeypatch, metrics, [enospc] if fault == "disk_full" else [10, enospc])
    err = _err(capsys, ["train-teacher", cfg, *_teacher_only(tiny_data, run)])
    assert f"cannot append to '{metrics}': the disk is full" in err and "re-run" in err
    assert metrics.read_text() == ""  # no torn line (a short write is neither ignored nor kept)
    monkeypatch.undo()
    assert main(["train-teacher", cfg, *_teacher_only(tiny_data, run)]) == 0  # space again
    events, torn = read_lines_json(metrics)
    assert torn == 0 and events[-1]["event"] == "done"


@pytest.mark.slow
def test_full_disk_appending_metrics_in_every_stage(capsys, cfg, tiny_data, tmp_path, monkeypatch):
    # every stage that logs: the first event it appends fails; one line, rc 2, and the next
    # run (which resumes) gets further, until the run completes
    run = tmp_path / "run"
    metrics = RunLayout(run).metrics
    run.mkdir()
    metrics.touch()
    over = tiny_overrides(tiny_data, run) + ["teacher.epochs=1", "student.epochs=1"]
    failed = set()
    real = os.write

    def write(fd, data):
        if os.path.realpath(f"/proc/self/fd/{fd}") == str(metrics.resolve()):
            stage = json.loads(bytes(data)).get("stage")
            if stage not in failed:  # the first event of each stage fails (once)
                failed.add(stage)
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    for _ in range(12):
        monkeypatch.setattr(os, "write", write)
        code = main(["run", cfg, *over])
        monkeypatch.undo()
        captured = capsys.readouterr()
        if code == 0:
            break
        err = captured.err.strip()
        assert code == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
        assert f"cannot append to '{metrics}': the disk is full" in err
    assert code == 0, (failed, err)
    assert {"iter0/train", "iter0/evaluate", "iter0/pseudo-label", "iter0/select",
            "iter1/train", "iter1/evaluate"} <= failed  # fmt: skip
    assert read_lines_json(metrics)[1] == 0


def test_a_stage_command_reports_a_mistyped_later_model(tiny_data, tmp_path, capsys):
    """train-teacher builds models[0] only, yet a typo in models[1] is reported at once, not
    after the teacher has trained."""
    from .conftest import tiny_overrides

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("device: cpu\n")
    over = tiny_overrides(tiny_data, tmp_path / "run", "[cifar_resnet8,cifar_resnt14]")
    assert main(["train-teacher", str(cfg), *over]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "models[1]" in err and "'cifar_resnet14'" in err
    assert not (tmp_path / "run").exists()
