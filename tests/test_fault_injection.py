"""Fault injection: SIGKILL a small pipeline at 10 seeded random points across all its stages,
re-running it after each kill; the finished run must equal an uninterrupted one bit for bit, and
hold exactly the same files (nothing truncated, nothing orphaned).

Kill points (seeded): one in each of the six stages and four more anywhere (start-up and the
final summary/report included) in proportion to time, each at a uniform offset into its segment of
the reference run's timeline. The parent watches manifest.json and kills the process group once
the target segment has begun plus the offset. A process that finishes before its kill ends that
campaign (verified like the others) and a new campaign in a fresh run directory takes the
remaining kill points, so exactly 10 kills always happen. Outcomes are printed (run with -s).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from noisystudent.artifacts import read_summary
from noisystudent.rundir import RunDir, RunLayout

pytestmark = pytest.mark.slow

KILLS = 10
SEED = 20261129

# teacher + one student on the built-in digits at 8x8; checkpoints every step or few steps so a
# kill loses little; the student uses RandAugment, dropout and stochastic depth (all of its noise
# must be reproduced exactly on resume).
OVERRIDES = [
    "models=[cifar_resnet8,cifar_resnet8]",
    "data.dataset=digits",
    "data.image_size=8",
    "data.labels_per_class=10",
    "data.hflip=false",
    "teacher.epochs=12",
    "teacher.batch_size=25",
    "teacher.warmup_epochs=0",
    "teacher.checkpoint_every_steps=1",
    "student.epochs=2",
    "student.batch_size=25",
    "student.ratio=2",
    "student.randaugment=rand-m9-n2",
    "student.drop_rate=0.3",
    "student.drop_path_rate=0.2",
    "student.checkpoint_every_steps=3",
    "select.threshold=0.15",
    "pseudo.batch_size=64",
    "device=cpu",
    "progress=false",
]


def _start(run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    cmd = [sys.executable, "-m", "noisystudent", "demo", f"run_dir={run_dir}", *OVERRIDES]
    with open(_stderr(run_dir), "ab") as err:  # a file, not a pipe: a full pipe would block it
        return subprocess.Popen(
            cmd,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,  # its own process group: the kill reaches any child too
        )


def _stderr(run_dir: Path) -> Path:
    return run_dir.with_name(run_dir.name + ".stderr")


def _tail(run_dir: Path) -> str:
    return _stderr(run_dir).read_text(errors="replace")[-2000:]


def _run_to_end(run_dir: Path) -> float:
    t0 = time.time()
    p = _start(run_dir)
    p.wait(timeout=600)
    assert p.returncode == 0, _tail(run_dir)
    return time.time() - t0


def _where(run_dir: Path) -> str:
    """The stage that was running when the process died, from the manifest and metrics."""
    man = RunLayout(run_dir).manifest
    stages = json.loads(man.read_text())["stages"] if man.is_file() else {}
    running = [k for k, v in stages.items() if v.get("status") == "running"]
    if running:
        return f"in {running[-1]}"
    done = [k for k, v in stages.items() if v.get("status") == "done"]
    return f"after {done[-1]}" if done else "start-up (no stage begun)"


def _files(run_dir: Path) -> set[str]:
    """Relative paths of all files; TensorBoard event files are named by time, host and pid, so
    only their number is compared."""
    out = set()
    for p in run_dir.rglob("*"):
        if p.is_file():
            rel = p.relative_to(run_dir).as_posix()
            out.add(f"tensorboard/<events {p.parent.name}>" if "tfevents" in p.name else rel)
    return out


def _train_records(run_dir: Path) -> dict:
    """The last record of each (stage, step) train event (a resumed run logs the steps between
    its last checkpoint and the kill twice; the later record is the one that counts)."""
    out = {}
    for e in RunDir(run_dir).metrics():
        if e.get("event") == "train":
            out[(e["stage"], e["step"])] = {k: v for k, v in e.items() if k != "time"}
    return out


def _check_intact(run_dir: Path) -> None:
    """Every file is whole: JSON parses, safetensors and checkpoints load, manifest hashes match."""
    run = RunDir(run_dir)
    for name in run.manifest.read()["stages"]:
        assert run.stage_done(name), (
            name,
            run.manifest.verify(name),
            run.manifest.stale_inputs(name),
        )
    for p in run_dir.rglob("*"):
        if not p.is_file():
            continue
        if p.suffix == ".json":
            json.loads(p.read_text())
        elif p.suffix == ".safetensors":
            load_file(str(p))
        elif p.suffix == ".pt":
            torch.load(p, weights_only=True)
        elif p.suffix == ".jsonl":
            text = p.read_text()
            assert text.endswith("\n")
            for line in text.splitlines():
                json.loads(line)


def _compare(ref: Path, got: Path) -> None:
    assert _files(got) == _files(ref), _files(got) ^ _files(ref)
    n_events = lambda d: len(list(d.rglob("*tfevents*")))  # noqa: E731
    assert n_events(got) == n_events(ref)
    strip = lambda s: [{k: v for k, v in r.items() if k != "wall_s"} for r in s["iterations"]]  # noqa: E731
    s_ref = read_summary(RunDir(ref))
    s_got = read_summary(RunDir(got))
    assert strip(s_got) == strip(s_ref)
    for rel in sorted(_files(ref)):
        if rel.endswith(("eval.json", "counts.json", "audit.json", "model.json", ".uids")):
            assert (got / rel).read_bytes() == (ref / rel).read_bytes(), rel
        elif rel.endswith(".safetensors"):  # weights, pseudo labels, selection: byte for byte
            assert (got / rel).read_bytes() == (ref / rel).read_bytes(), rel
    assert _train_records(got) == _train_records(ref)


STAGES = ["iter0/train", "iter0/evaluate", "iter0/pseudo-label", "iter0/select", "iter1/train",
          "iter1/evaluate"]  # fmt: skip
SEGMENTS = ["start-up", *STAGES, "summary and report"]


def _manifest(run_dir: Path) -> tuple[int, dict]:
    try:
        man = RunLayout(run_dir).manifest
        return man.stat().st_ino, json.loads(man.read_text())["stages"]
    except (OSError, ValueError):
        return 0, {}


def _segment_begun(seg: str, stages: dict, inode: int, inode0: int) -> bool:
    """Has this process reached `seg`? A stage counts once THIS process marked it running (a stale
    "running" left by the killed process does not count: the manifest must have been rewritten)."""
    if seg == "start-up":
        return True
    if seg == "summary and report":
        return all(stages.get(s, {}).get("status") == "done" for s in STAGES)
    return inode != inode0 and stages.get(seg, {}).get("status") in ("running", "done")


def _timeline(run_dir: Path) -> tuple[dict[str, tuple[float, float]], float]:
    """Run the reference pipeline to the end, watching the manifest: each segment's (begin, end)
    in seconds after the process started."""
    t0 = time.time()
    p = _start(run_dir)
    first: dict[str, float] = {}
    done: dict[str, float] = {}
    while p.poll() is None:
        _, st = _manifest(run_dir)
        now = time.time() - t0
        for s, e in st.items():
            first.setdefault(s, now)
            if e.get("status") == "done":
                done.setdefault(s, now)
        time.sleep(0.005)
    assert p.returncode == 0, _tail(run_dir)
    end = time.time() - t0
    seg = {"start-up": (0.0, first[STAGES[0]])}
    seg.update({s: (first[s], done[s]) for s in STAGES})
    seg["summary and report"] = (done[STAGES[-1]], end)
    return seg, end


def test_sigkill_at_random_points_then_resume_equals_uninterrupted(tmp_path):
    ref = tmp_path / "reference"
    seg, t_ref = _timeline(ref)
    rng = random.Random(SEED)
    # one kill in every stage, the rest anywhere (start-up and the end included), in proportion
    # to time; each at a uniform offset into its segment
    targets = [(s, rng.uniform(0, seg[s][1] - seg[s][0])) for s in STAGES]
    lengths = [seg[s][1] - seg[s][0] for s in SEGMENTS]
    for _ in range(KILLS - len(STAGES)):
        s = rng.choices(SEGMENTS, weights=lengths)[0]
        targets.append((s, rng.uniform(0, seg[s][1] - seg[s][0])))
    targets.sort(key=lambda t: (SEGMENTS.index(t[0]), t[1]))
    print(f"\nreference run {t_ref:.1f}s; segments (s after start): "
          + ", ".join(f"{k} {a:.1f}-{b:.1f}" for k, (a, b) in seg.items()))  # fmt: skip

    trials, campaign, k = [], 0, 0
    while k < KILLS:
        run_dir = tmp_path / f"faulty{campaign}"
        while k < KILLS:
            target, offset = targets[k]
            inode0, _ = _manifest(run_dir)
            t_start = time.time()
            p = _start(run_dir)
            begun = None
            while p.poll() is None:
                inode, st = _manifest(run_dir)
                if begun is None and _segment_begun(target, st, inode, inode0):
                    begun = time.time()
                if begun is not None and time.time() >= begun + offset:
                    os.killpg(p.pid, signal.SIGKILL)
                    break
                time.sleep(0.005)
            p.wait()
            if p.returncode == 0:  # it completed before the kill point: this campaign is over
                trials.append(("finished before kill", target))
                print(f"campaign {campaign}: finished before the kill aimed at {target}")
                break
            assert p.returncode == -signal.SIGKILL, (p.returncode, _tail(run_dir))
            where = _where(run_dir)
            trials.append((where, target))
            print(f"kill {k + 1:2d}: campaign {campaign}, aimed at {target} +{offset:.2f}s, "
                  f"{time.time() - t_start:5.1f}s after start: {where}")  # fmt: skip
            k += 1
        _run_to_end(run_dir)  # the re-run after the last kill finishes the run
        _check_intact(run_dir)
        _compare(ref, run_dir)
        campaign += 1

    kills = [t for t in trials if t[0] != "finished before kill"]
    print(f"{len(kills)} kills in {campaign} campaign(s); every resumed run equals the reference")
    assert len(kills) == KILLS
    reached = {w.split(" ", 1)[1] for w, _ in kills if w.startswith("in ")}
    print("stages a kill landed in: " + ", ".join(sorted(reached)))
    assert {"iter0/train", "iter1/train"} <= reached, kills
