"""Bad input: one line on stderr naming the problem, exit code 2, no traceback."""

import pytest

from noisystudent.cli import main
from noisystudent.rundir import RunLayout

from .conftest import make_class_folders, tiny_overrides


def _err(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


@pytest.fixture
def cfg(tmp_path):
    p = tmp_path / "cfg.yaml"
    p.write_text("seed: 0\n")
    return str(p)


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
