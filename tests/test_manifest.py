"""The run manifest: a stage is done only while its outputs verify and its inputs are unchanged."""

from __future__ import annotations

import pytest

from noisystudent.errors import UserError
from noisystudent.rundir import RunDir, write_json, write_text


def test_stage_is_done_only_while_outputs_verify(tmp_path):
    run = RunDir(tmp_path)
    out = write_json(tmp_path / "x" / "out.json", {"v": 1})
    run.mark("s", "done", outputs=[out])
    assert run.stage_done("s")
    rec = run.manifest.read()["stages"]["s"]["outputs"]["x/out.json"]
    assert set(rec) == {"size", "sha256"}
    out.write_text(out.read_text().replace("1", "2"))  # same size, different content
    assert not run.stage_done("s")
    assert "sha256" in run.manifest.verify("s")[0]
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
    assert run.manifest.stale_inputs("label") == ["teacher.bin"] and not run.stage_done("label")
