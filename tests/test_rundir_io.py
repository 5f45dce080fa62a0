"""Run-directory files: atomic writes, a full disk, temp-file cleanup, byte-identical
safetensors, and load_state refusing pickled code."""

from __future__ import annotations

import errno
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from noisystudent.errors import UserError
from noisystudent.rundir import (
    RunDir,
    atomic_write,
    load_state,
    read_lines_json,
    write_text,
)
from noisystudent.rundir.io import append_line

from .helpers import Malicious, small_tc, train_small


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
    tc = small_tc(epochs=1)
    real_save = torch.save
    calls = {"n": 0}

    def flaky_save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint: half written, then the disk is full
            Path(f).write_bytes(b"\x00" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr("noisystudent.rundir.io.torch.save", flaky_save)
    with pytest.raises(UserError, match="disk is full.*previous version"):
        train_small(tmp_path, tc)
    st = load_state(tmp_path / "train" / "checkpoint.pt")  # the first one, intact
    assert st["position"]["step"] == 2
    assert not list((tmp_path / "train").glob(".*.tmp"))
    monkeypatch.setattr("noisystudent.rundir.io.torch.save", real_save)
    train_small(tmp_path, tc)  # and the run resumes from it
    assert load_state(tmp_path / "train" / "checkpoint.pt")["position"]["epoch"] == 1


def test_lock_cleans_temp_files_and_a_torn_metrics_line(tmp_path):
    run = RunDir(tmp_path)
    run.log(event="a")
    with open(run.paths.metrics, "a") as f:
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
        assert run.paths.metrics.read_text().count("\n") == 1
        run.log(event="b")
        assert [e["event"] for e in run.metrics()] == ["a", "b"]
    finally:
        run.unlock()


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


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_pickle_checkpoint_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "train" / "checkpoint.pt"
    ckpt.parent.mkdir()
    with open(ckpt, "wb") as f:
        pickle.dump({"format": "noisystudent-train-state", "x": Malicious(marker)}, f)
    with pytest.raises(UserError, match="pickled code or objects, refused"):
        load_state(ckpt)
    with pytest.raises(UserError, match="checkpoint.pt' is not a loadable training state"):
        train_small(tmp_path, small_tc(epochs=1))  # resume would read it: refused
    torch.save({"boom": Malicious(marker)}, tmp_path / "torch_format.pt")  # torch's zip format
    with pytest.raises(UserError, match="refused"):
        load_state(tmp_path / "torch_format.pt")
    assert not marker.exists()


def _faulty_writes(monkeypatch, target: Path, faults: list):
    """os.write on descriptors of `target` follows `faults`, one per call: an int n writes
    only the first n bytes (a short write), an OSError is raised, None writes normally (also
    once the list is used up). Every other descriptor writes normally."""
    real = os.write
    target = str(target.resolve())
    faults = list(faults)

    def write(fd, data):
        if os.path.realpath(f"/proc/self/fd/{fd}") != target or not faults:
            return real(fd, data)
        f = faults.pop(0)
        if isinstance(f, OSError):
            raise f
        return real(fd, data if f is None else bytes(data)[:f])

    monkeypatch.setattr(os, "write", write)


def _disk_full() -> OSError:
    return OSError(errno.ENOSPC, "No space left on device")


def test_append_line_continues_a_short_write(tmp_path, monkeypatch):
    p = tmp_path / "metrics.jsonl"
    append_line(p, '{"a": 1}')
    _faulty_writes(monkeypatch, p, [3, 2])  # two short writes, then the rest
    append_line(p, '{"b": 22}')
    assert p.read_text() == '{"a": 1}\n{"b": 22}\n'


@pytest.mark.parametrize("fault", ["enospc", "short_then_enospc", "short_then_nothing"])
def test_append_line_disk_full_or_short_write_is_an_error_leaving_no_torn_line(
    tmp_path, monkeypatch, fault
):
    p = tmp_path / "metrics.jsonl"
    append_line(p, '{"a": 1}')
    faults = {"enospc": [_disk_full()], "short_then_enospc": [4, _disk_full()],
              "short_then_nothing": [4, 0]}[fault]  # fmt: skip
    _faulty_writes(monkeypatch, p, faults)
    with pytest.raises(UserError, match=r"cannot append to '.*metrics.jsonl': the disk is full"):
        append_line(p, '{"b": 22}')
    assert p.read_text() == '{"a": 1}\n'  # the partial line was cut off again
    append_line(p, '{"c": 3}')  # once there is space, the log goes on with whole lines
    assert read_lines_json(p) == ([{"a": 1}, {"c": 3}], 0)


def test_atomic_write_into_a_folder_it_cannot_create_is_an_error(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match=r"cannot write '.*afile/sub/f.json': .*make its folder"):
        write_text(tmp_path / "afile" / "sub" / "f.json", "{}")
