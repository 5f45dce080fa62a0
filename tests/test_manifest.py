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


def test_changed_data_and_invalidation_make_a_stage_stale_saying_why(tmp_path, capsys):
    run = RunDir(tmp_path)
    out = tmp_path / "out.txt"
    write_text(out, "x")
    run.mark("iter0/train", "done", outputs=[out], data={"data:labeled": "listing:aa"})
    assert run.stage_done("iter0/train", {"data:labeled": "listing:aa"})
    assert not run.stage_done("iter0/train", {"data:labeled": "listing:bb"})
    assert "labeled data changed since iter0/train ran: running iter0/train again" in (
        capsys.readouterr().out
    )
    # a fingerprint taken in the other mode never matches; one the stage never recorded neither
    assert not run.manifest.done("iter0/train", {"data:labeled": "content:aa"})
    assert not run.manifest.done("iter0/train", {"data:test": "listing:aa"})
    run.manifest.invalidate("iter0/train", "iter0/x ran again")
    assert run.manifest.stale("iter0/train", {"data:labeled": "listing:aa"}) == (
        "iter0/x ran again since iter0/train ran"
    )
    run.mark("iter0/train", "done", outputs=[out], data={"data:labeled": "listing:aa"})
    assert run.stage_done("iter0/train", {"data:labeled": "listing:aa"})  # re-made: done again
    run.manifest.invalidate("iter9/none", "whatever")  # not recorded: nothing to invalidate
    assert "iter9/none" not in run.manifest.read()["stages"]


def test_damaged_outputs_are_listed(tmp_path):
    run = RunDir(tmp_path)
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    write_text(a, "a")
    write_text(b, "b")
    run.mark("s", "done", outputs=[a, b])
    assert run.manifest.damaged_outputs("s") == []
    b.write_text("B")  # same size, other bytes
    assert run.manifest.damaged_outputs("s") == [b]
    a.unlink()
    assert run.manifest.damaged_outputs("s") == [a, b]
