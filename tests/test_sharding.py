"""Sharded pseudo-labeling in one process: fixed ranges, a lost or damaged shard is the only one
re-labeled, and shards from another teacher are labeled again, never mixed in."""

import torch

from noisystudent.cli import main
from noisystudent.rundir import RunDir
from noisystudent.rundir.layout import SHARD_PREFIX
from noisystudent.store import PseudoLabelStore, shard_name, write_shard

from .conftest import tiny_overrides


def _shard_files(root):
    return {f.name: f.stat().st_mtime_ns for f in root.glob(f"{SHARD_PREFIX}*")}


def test_only_the_missing_shard_is_relabeled(tiny_data, tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("device: cpu\n")
    run_dir = tmp_path / "run"
    over = tiny_overrides(tiny_data, run_dir) + ["pseudo.shard_size=16"]
    assert main(["train-teacher", str(cfg), *over]) == 0
    assert main(["pseudo-label", str(cfg), *over]) == 0
    run = RunDir(run_dir)
    it0 = run.it(0)
    stage = it0.stage("pseudo-label")
    root = it0.pseudo
    ref = PseudoLabelStore.load(root)
    assert [s["count"] for s in ref.meta["shards"]] == [16, 16, 16, 12]
    assert [s["start"] for s in ref.meta["shards"]] == [0, 16, 32, 48]
    assert ref.index.tolist() == list(range(60))  # each row's position in the unlabeled set
    before = _shard_files(root)
    assert len(before) == 8  # .safetensors + .uids per shard
    # lose shard 2's output (and the stage's "done")
    (root / f"{shard_name(2)}.safetensors").unlink()
    assert run.manifest.forget(stage)
    assert main(["pseudo-label", str(cfg), *over]) == 0
    after = _shard_files(root)
    changed = sorted(n for n in after if after[n] != before.get(n))
    assert changed == [f"{shard_name(2)}.safetensors", f"{shard_name(2)}.uids"]
    got = PseudoLabelStore.load(root)
    assert got.uids == ref.uids and (got.topk_prob == ref.topk_prob).all()
    assert (got.index == ref.index).all()
    assert run.stage_done(stage)
    assert any(e.get("event") == "resume" and e.get("relabeled_shards") for e in run.metrics())

    # a shard written by another teacher (an interrupted labeling before the teacher was
    # retrained) is labeled again with this one, never mixed in
    assert run.manifest.forget(stage)
    other = {"teacher_sha256": "0" * 64, "data_fingerprint": "f", "k": "3", "temperature": "1.0",
             "rows_in_range": "16"}  # fmt: skip
    write_shard(root, 1, 16, torch.ones(16, 3) / 3, torch.zeros(16, 3, dtype=torch.long),
                torch.arange(16, 32), ["x"] * 16, 3, other)  # fmt: skip
    assert main(["pseudo-label", str(cfg), *over]) == 0
    got = PseudoLabelStore.load(root)
    assert got.uids == ref.uids and (got.topk_prob == ref.topk_prob).all()
    assert run.stage_done(stage)


def test_a_tampered_shard_is_relabeled_never_reblessed(tiny_data, tmp_path, capsys):
    """Bytes changed inside a finished shard: nothing reads it (the selection refuses, naming
    the stage to re-run); the re-run labels that shard again (the others are kept), the
    selection is made again, and every file equals the untouched run's."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("device: cpu\n")
    run_dir = tmp_path / "run"
    over = tiny_overrides(tiny_data, run_dir) + ["pseudo.shard_size=16"]
    for cmd in ("train-teacher", "pseudo-label", "select"):
        assert main([cmd, str(cfg), *over]) == 0
    run = RunDir(run_dir)
    it0 = run.it(0)
    root = it0.pseudo
    files = {**_shard_bytes(root), "selected": it0.selected.read_bytes(),
             "counts": it0.counts.read_bytes()}  # fmt: skip
    shard = root / f"{shard_name(1)}.safetensors"
    data = bytearray(shard.read_bytes())
    data[-8:] = b"\xff\x7f\xff\x7f\xff\x7f\xff\x7f"  # float16 max: confidences of 65504
    shard.write_bytes(bytes(data))
    mtimes = _shard_files(root)
    capsys.readouterr()
    assert main(["select", str(cfg), *over]) == 2
    out, err = capsys.readouterr()
    assert f"{shard_name(1)}.safetensors changed since {it0.stage('select')} ran" in out
    assert "noisystudent pseudo-label --iteration 0" in err and len(err.splitlines()) == 1
    assert main(["pseudo-label", str(cfg), *over]) == 0
    out = capsys.readouterr().out
    assert f"differs from the manifest (sha256): running {it0.stage('pseudo-label')} again" in out
    n_select = sum(e.get("event") == "select" for e in run.metrics())
    assert main(["select", str(cfg), *over]) == 0  # made again, from the re-labeled shards
    assert sum(e.get("event") == "select" for e in run.metrics()) == n_select + 1
    after = _shard_files(root)
    relabeled = sorted(n for n in after if after[n] != mtimes.get(n))
    assert relabeled == [f"{shard_name(1)}.safetensors", f"{shard_name(1)}.uids"]
    now = {**_shard_bytes(root), "selected": it0.selected.read_bytes(),
           "counts": it0.counts.read_bytes()}  # fmt: skip
    assert now == files
    assert run.stage_done(it0.stage("pseudo-label")) and run.stage_done(it0.stage("select"))


def _shard_bytes(root):
    return {f.name: f.read_bytes() for f in sorted(root.glob(f"{SHARD_PREFIX}*"))}
