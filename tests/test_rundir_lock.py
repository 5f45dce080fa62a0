"""The run-directory lock: one process at a time, stale locks taken over, the CLI refuses."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from noisystudent.errors import UserError
from noisystudent.rundir import RunDir, RunLayout

from .conftest import tiny_overrides


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
    lock = RunLayout(tmp_path).lock
    assert json.loads(lock.read_text())["pid"] == p.pid  # stale: owner is dead
    run = RunDir(tmp_path).lock()
    try:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
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
