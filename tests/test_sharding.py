"""Sharded pseudo-labeling in one process: fixed ranges, a lost shard is the only one re-labeled,
and shards from another teacher are refused."""

import pytest
import torch

from noisystudent.cli import main
from noisystudent.errors import UserError
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

    # a shard written by another teacher is refused, not mixed in
    assert run.manifest.forget(stage)
    (root / f"{shard_name(1)}.safetensors").unlink()
    other = {"teacher_sha256": "0" * 64, "data_fingerprint": "f", "k": "3", "temperature": "1.0",
             "rows_in_range": "16"}  # fmt: skip
    write_shard(root, 1, 16, torch.ones(16, 3) / 3, torch.zeros(16, 3, dtype=torch.long),
                torch.arange(16, 32), ["x"] * 16, 3, other)  # fmt: skip
    capsys.readouterr()
    assert main(["pseudo-label", str(cfg), *over]) == 2
    err = capsys.readouterr().err
    assert "different teacher_sha256" in err and shard_name(1) in err
    assert not run.stage_done(stage) and not it0.pseudo_meta.exists()
    with pytest.raises(UserError, match="meta.json missing"):  # never finalised
        PseudoLabelStore.load(root, expect={"teacher_sha256": "0" * 64})
