"""The run-directory lock: one process at a time, stale locks taken over, the CLI refuses."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from noisystudent.errors import UserError
from noisystudent.rundir import RunDir, RunLayout
from noisystudent.rundir import lock as rundir_lock

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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_forked_children_do_not_keep_the_lock_of_a_killed_owner(tmp_path, monkeypatch):
    # DataLoader workers are forked children of the locking process: after the owner is
    # SIGKILLed they linger (up to ~5 s); the lock must be free at once, not held by them
    code = (
        "import multiprocessing as mp, sys, time\n"
        "from noisystudent.rundir import RunDir\n"
        "def worker():\n"
        "    time.sleep(60)\n"
        "if __name__ == '__main__':\n"
        f"    RunDir({str(tmp_path)!r}).lock()\n"
        "    w = mp.get_context('fork').Process(target=worker)\n"
        "    w.start()\n"
        "    print(w.pid, flush=True)\n"
        "    time.sleep(60)\n"
    )
    script = tmp_path.parent / f"{tmp_path.name}_owner.py"
    script.write_text(code)
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE)
    child = None
    try:
        child = int(p.stdout.readline())
        with pytest.raises(UserError, match=rf"in use by process {p.pid} on "):
            RunDir(tmp_path).lock()  # while the owner lives: refused
        p.kill()
        p.wait()
        assert _alive(child)  # the forked child still runs ...
        monkeypatch.setattr(
            rundir_lock, "STALE_WAIT_S", 0.0
        )  # (no waiting for a dead owner either)
        t0 = time.monotonic()
        run = RunDir(tmp_path).lock()  # ... and the directory can be taken at once
        assert time.monotonic() - t0 < 1.0
        assert _alive(child)
        assert json.loads(RunLayout(tmp_path).lock.read_text())["pid"] == os.getpid()
        run.unlock()
    finally:
        p.kill()
        p.wait()
        if child is not None:
            _kill(child)


def _hold_flock(lock_path, seconds: float) -> subprocess.Popen:
    """A process holding the flock of `lock_path` without being its recorded owner (as a
    descriptor inherited by a child of a dead owner would)."""
    code = (
        "import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDWR)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('held', flush=True)\n"
        "time.sleep(float(sys.argv[2]))\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code, str(lock_path), str(seconds)],
                         stdout=subprocess.PIPE)  # fmt: skip
    assert p.stdout.readline().strip() == b"held"
    return p


def _dead_owner_lock(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock_path = RunLayout(tmp_path).lock
    owner = {"pid": dead.pid, "host": socket.gethostname(), "since": "2026-01-01T00:00:00"}
    lock_path.write_text(json.dumps(owner) + "\n")
    return lock_path, dead.pid


def test_lock_of_a_dead_owner_still_held_is_waited_for(tmp_path):
    lock_path, _ = _dead_owner_lock(tmp_path)
    holder = _hold_flock(lock_path, 1.0)  # lets go after a second: waited for, then taken
    try:
        t0 = time.monotonic()
        run = RunDir(tmp_path).lock()
        assert 0.3 < time.monotonic() - t0 < rundir_lock.STALE_WAIT_S
        assert json.loads(lock_path.read_text())["pid"] == os.getpid()
        run.unlock()
    finally:
        holder.kill()
        holder.wait()


def test_lock_of_a_dead_owner_held_too_long_names_the_dead_owner(tmp_path, monkeypatch):
    lock_path, dead_pid = _dead_owner_lock(tmp_path)
    holder = _hold_flock(lock_path, 60)
    monkeypatch.setattr(rundir_lock, "STALE_WAIT_S", 0.3)
    try:
        with pytest.raises(UserError, match=rf"left by process {dead_pid} .* no longer running"):
            RunDir(tmp_path).lock()
    finally:
        holder.kill()
        holder.wait()
    RunDir(tmp_path).lock().unlock()  # once they are gone, it is taken over
