"""Sharded pseudo-labeling in one process: fixed ranges, a lost shard is the only one re-labeled,
and shards from another teacher are refused."""

import json

import pytest

from noisystudent.cli import main
from noisystudent.errors import UserError
from noisystudent.store import PseudoLabelStore

from .conftest import tiny_overrides


def test_only_the_missing_shard_is_relabeled(tiny_data, tmp_path, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("device: cpu\n")
    run = tmp_path / "run"
    over = tiny_overrides(tiny_data, run) + ["pseudo.shard_size=16"]
    assert main(["train-teacher", str(cfg), *over]) == 0
    assert main(["pseudo-label", str(cfg), *over]) == 0
    root = run / "iter0" / "pseudo"
    ref = PseudoLabelStore.load(root)
    assert [s["count"] for s in ref.meta["shards"]] == [16, 16, 16, 12]
    assert ref.index.tolist() == list(range(60))  # each row's position in the unlabeled set
    before = {f.name: f.stat().st_mtime_ns for f in root.glob("shard-*")}
    # lose shard 2's output (and the stage's "done")
    (root / "shard-00002.safetensors").unlink()
    m = json.loads((run / "manifest.json").read_text())
    del m["stages"]["iter0/pseudo-label"]
    (run / "manifest.json").write_text(json.dumps(m))
    assert main(["pseudo-label", str(cfg), *over]) == 0
    after = {f.name: f.stat().st_mtime_ns for f in root.glob("shard-*")}
    changed = sorted(n for n in after if after[n] != before.get(n))
    assert changed == ["shard-00002.safetensors", "shard-00002.uids"]
    got = PseudoLabelStore.load(root)
    assert got.uids == ref.uids and (got.topk_prob == ref.topk_prob).all()
    assert (got.index == ref.index).all()

    # a shard written by another teacher is refused, not mixed in
    m = json.loads((run / "manifest.json").read_text())
    del m["stages"]["iter0/pseudo-label"]
    (run / "manifest.json").write_text(json.dumps(m))
    (root / "shard-00001.safetensors").unlink()
    import torch

    from noisystudent.store import write_shard

    write_shard(root, 1, 16, torch.ones(16, 3) / 3, torch.zeros(16, 3, dtype=torch.long),
                torch.arange(16, 32), ["x"] * 16, 3, {"teacher_sha256": "0" * 64, "data_fingerprint": "f", "k": "3",
                               "temperature": "1.0", "rows_in_range": "16"})  # fmt: skip
    capsys.readouterr()
    assert main(["pseudo-label", str(cfg), *over]) == 2
    assert "different teacher_sha256" in capsys.readouterr().err
    with pytest.raises(UserError, match="meta.json missing"):  # never finalised
        PseudoLabelStore.load(root, expect={"teacher_sha256": "0" * 64})
