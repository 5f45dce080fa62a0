"""Changed input images re-run exactly the stages that read them (and what follows from those),
and the result equals a fresh run on the changed data, byte for byte."""

from __future__ import annotations

import numpy as np
import pytest

from noisystudent.cli import main
from noisystudent.rundir import RunDir

from .conftest import make_image, tiny_overrides

STAGES = [f"iter{i}/{s}" for i in (0, 1) for s in ("train", "evaluate")] + [
    "iter0/pseudo-label",
    "iter0/select",
]


def _run(data, run_dir, capsys) -> str:
    cfg = run_dir.parent / "cfg.yaml"
    cfg.write_text("device: cpu\n")
    capsys.readouterr()
    assert main(["run", str(cfg), *tiny_overrides(data, run_dir)]) == 0
    return capsys.readouterr().out


def _outputs(run_dir) -> dict[str, dict]:
    """Every stage's recorded outputs (relative path -> size and sha256)."""
    stages = RunDir(run_dir).manifest.read()["stages"]
    assert sorted(stages) == sorted(STAGES)
    return {name: stages[name]["outputs"] for name in STAGES}


def _reran(out: str) -> set[str]:
    return {name for name in STAGES if f"running {name} again" in out}


def _same_as_fresh(data, run_dir, tmp_path, capsys, tag: str) -> None:
    fresh = tmp_path / f"fresh-{tag}"
    _run(data, fresh, capsys)
    assert _outputs(run_dir) == _outputs(fresh)


def test_an_edited_labeled_image_retrains_everything_as_a_fresh_run(
    tiny_data, tmp_path, capsys, one_thread
):
    run_dir = tmp_path / "run"
    _run(tiny_data, run_dir, capsys)
    before = _outputs(run_dir)
    # one labeled "red" image becomes a blue one (a labeling mistake fixed the other way round)
    make_image(0, np.random.default_rng(9)).save(tiny_data["labeled"] / "red" / "000.png")
    out = _run(tiny_data, run_dir, capsys)
    assert "labeled data changed since iter0/train ran: running iter0/train again" in out
    assert "labeled data changed since iter1/train ran" in out
    assert _reran(out) == set(STAGES)  # the rest because the teacher's files changed
    after = _outputs(run_dir)
    assert after["iter0/train"] != before["iter0/train"]  # retrained from scratch, not resumed
    _same_as_fresh(tiny_data, run_dir, tmp_path, capsys, "labeled")
    # nothing changed since: a third run re-runs nothing
    assert _reran(_run(tiny_data, run_dir, capsys)) == set()


@pytest.mark.slow
def test_added_and_deleted_unlabeled_images_relabel_but_keep_the_teacher(
    tiny_data, tmp_path, capsys, one_thread
):
    run_dir = tmp_path / "run"
    _run(tiny_data, run_dir, capsys)
    teacher = RunDir(run_dir).it(0).model
    mtime = teacher.stat().st_mtime_ns
    before = _outputs(run_dir)
    unl = tiny_data["unlabeled"]
    make_image(1, np.random.default_rng(7)).save(unl / "green" / "new.png")
    out = _run(tiny_data, run_dir, capsys)
    assert "unlabeled data changed since iter0/pseudo-label ran" in out
    assert _reran(out) == set(STAGES) - {"iter0/train", "iter0/evaluate"}
    assert teacher.stat().st_mtime_ns == mtime
    after = _outputs(run_dir)
    assert after["iter0/train"] == before["iter0/train"]
    assert after["iter0/pseudo-label"] != before["iter0/pseudo-label"]
    _same_as_fresh(tiny_data, run_dir, tmp_path, capsys, "added")

    (unl / "blue" / "003.png").unlink()
    out = _run(tiny_data, run_dir, capsys)
    assert _reran(out) == set(STAGES) - {"iter0/train", "iter0/evaluate"}
    assert teacher.stat().st_mtime_ns == mtime
    _same_as_fresh(tiny_data, run_dir, tmp_path, capsys, "deleted")
