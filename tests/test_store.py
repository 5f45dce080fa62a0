"""The pseudo-label store: round trip, version and identity checks, streaming reads."""

import json

import pytest
import torch

from noisystudent.errors import UserError
from noisystudent.store import VERSION, PseudoLabelStore, StoreWriter, default_topk, shard_metadata


def _probs(n, c, seed=0):
    return torch.softmax(torch.randn(n, c, generator=torch.Generator().manual_seed(seed)) * 3, 1)


def _write(root, probs, shard_size=7, k=None, identity=None):
    c = probs.shape[1]
    w = StoreWriter(root, c, default_topk(c, k), 1.0, {"model": "m"}, shard_size, identity)
    for a in range(0, len(probs), 5):  # batches of 5 across shards of 7
        w.add(probs[a : a + 5], [f"img/{j}.png" for j in range(a, min(len(probs), a + 5))])
    return w.close()


def test_round_trip_full_vector(tmp_path):
    probs = _probs(23, 4)
    meta = _write(tmp_path, probs)
    assert meta["count"] == 23 and meta["k"] == 4 and len(meta["shards"]) == 4
    s = PseudoLabelStore.load(tmp_path)
    assert s.uids == [f"img/{j}.png" for j in range(23)]
    assert torch.allclose(s.dense(torch.arange(23)), probs, atol=1e-3)  # fp16 storage
    assert torch.equal(s.pred, probs.argmax(1))
    assert torch.allclose(s.max_prob, probs.max(1).values)
    assert s.topk_idx.dtype == torch.int16 and s.topk_prob.dtype == torch.float16


def test_topk_truncation_renormalises(tmp_path):
    probs = _probs(10, 300)
    _write(tmp_path, probs)  # 300 classes -> k = 10 by default
    s = PseudoLabelStore.load(tmp_path)
    assert s.meta["k"] == 10 and s.topk_prob.shape == (10, 10)
    d = s.dense(torch.tensor([3, 3, 0]))
    assert torch.allclose(d.sum(1), torch.ones(3)) and d.shape == (3, 300)
    assert (d[0] > 0).sum() == 10


def test_iter_chunks_streams_the_same_rows(tmp_path):
    probs = _probs(50, 5)
    _write(tmp_path, probs, shard_size=16)
    s = PseudoLabelStore.load(tmp_path)
    got, starts = [], []
    for start, c in s.iter_chunks(("max_prob", "pred"), chunk=6):
        starts.append(start)
        got.append(c["pred"])
        assert len(c["pred"]) <= 6
    assert torch.equal(torch.cat(got), probs.argmax(1)) and starts[0] == 0


def test_version_and_format_checked(tmp_path):
    _write(tmp_path, _probs(5, 3))
    meta = json.loads((tmp_path / "meta.json").read_text())
    meta["version"] = VERSION + 1
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="version"):
        PseudoLabelStore.load(tmp_path)
    (tmp_path / "meta.json").unlink()
    with pytest.raises(UserError, match="meta.json missing"):
        PseudoLabelStore.load(tmp_path)


def test_identity_mismatch_refused_and_recorded_in_shards(tmp_path):
    ident = {"teacher_sha256": "abc", "data_fingerprint": "f1"}
    _write(tmp_path, _probs(9, 3), identity=ident)
    PseudoLabelStore.load(tmp_path, expect=ident)
    with pytest.raises(UserError, match="different teacher_sha256"):
        PseudoLabelStore.load(tmp_path, expect={"teacher_sha256": "xyz"})
    md = shard_metadata(tmp_path / "shard-00000.safetensors")
    assert md["teacher_sha256"] == "abc" and md["start"] == "0" and md["version"] == str(VERSION)


def test_missing_shard_is_an_error(tmp_path):
    _write(tmp_path, _probs(20, 3))
    (tmp_path / "shard-00001.safetensors").unlink()
    with pytest.raises(UserError, match="shard-00001.safetensors' is missing"):
        PseudoLabelStore.load(tmp_path)
