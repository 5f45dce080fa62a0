"""The pseudo-label store, built the way the pseudo-label stage builds it (labeling.label_shards,
then labeling.collect_shards + store.write_meta): round trip, image index, version and identity
checks, streaming reads; and data.hidden_labels, which joins store rows to hidden labels."""

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image
from safetensors.torch import load_file

from noisystudent.data import BadImageLog, ImageSet, hidden_labels
from noisystudent.errors import UserError
from noisystudent.fingerprints import set_fingerprint
from noisystudent.labeling import collect_shards, label_shards
from noisystudent.rundir import save_tensors
from noisystudent.runtime import Runtime
from noisystudent.store import (
    VERSION,
    PseudoLabelStore,
    default_topk,
    shard_metadata,
    write_meta,
    write_shard,
)

SIZE = 4  # image side: the images are only carriers of their row id


class Lookup(nn.Module):
    """A 'teacher' whose logits for an image are a fixed table row: the image's id, written in
    pixel (0, 0) as R + 256 G. So the stored probabilities are known exactly."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer("table", logits.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = x[:, 0, 0, 0].long() + 256 * x[:, 1, 0, 0].long()
        return self.table[ids]


def _pixels(n: int) -> np.ndarray:
    a = np.zeros((n, SIZE, SIZE, 3), dtype=np.uint8)
    a[:, 0, 0, 0] = np.arange(n) % 256
    a[:, 0, 0, 1] = np.arange(n) // 256
    return a


def _labels(n: int, c: int) -> np.ndarray:
    y = np.arange(n, dtype=np.int64) % c
    y[::3] = -1  # every third image has no hidden label
    return y


def _images(n: int, c: int) -> ImageSet:
    return ImageSet(
        [f"c{j}" for j in range(c)],
        [f"img/{i}.png" for i in range(n)],
        _labels(n, c),
        array=_pixels(n),
    )


def _logits(n: int, c: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, c, generator=torch.Generator().manual_seed(seed)) * 3


def _identity(images: ImageSet, k: int, temperature: float) -> dict[str, str]:
    return {
        "teacher_sha256": "a" * 64,
        "data_fingerprint": set_fingerprint(images, None),
        "k": str(k),
        "temperature": str(temperature),
    }


def _label(root, images, logits, shard_size=7, topk=None, temperature=1.0, batch=5, identity=None):
    """The pseudo-label stage's sequence: label every shard, collect them, write meta.json."""
    c = logits.shape[1]
    k = default_topk(c, topk)
    ident = identity or _identity(images, k, temperature)
    label_shards(Lookup(logits), images, SIZE, root, c, k, temperature, ident, shard_size, batch,
                 Runtime(torch.device("cpu"), "fp32", "off"))  # fmt: skip
    shards = collect_shards(root, len(images), shard_size, ident)
    return write_meta(root, c, k, temperature, {"model": "lookup"}, shards, ident)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def test_round_trip_full_vector(tmp_path):
    logits = _logits(23, 4)
    meta = _label(tmp_path, _images(23, 4), logits, temperature=2.0)
    assert meta["count"] == 23 and meta["k"] == 4 and meta["version"] == VERSION == 3
    assert [(s["start"], s["count"]) for s in meta["shards"]] == [(0, 7), (7, 7), (14, 7), (21, 2)]
    s = PseudoLabelStore.load(tmp_path)
    probs = torch.softmax(logits / 2.0, 1)
    assert s.uids == [f"img/{j}.png" for j in range(23)]
    assert torch.allclose(s.dense(torch.arange(23)), probs, atol=1e-3)  # fp16 storage
    assert torch.equal(s.pred, probs.argmax(1))
    assert torch.allclose(s.max_prob, probs.max(1).values, atol=1e-3)
    assert s.topk_idx.dtype == torch.int16 and s.topk_prob.dtype == torch.float16
    assert s.index.dtype == torch.int64 and torch.equal(s.index, torch.arange(23))


def test_topk_truncation_renormalises(tmp_path):
    logits = _logits(10, 300)
    _label(tmp_path, _images(10, 300), logits)  # 300 classes -> k = 10 by default
    s = PseudoLabelStore.load(tmp_path)
    assert s.meta["k"] == 10 and s.topk_prob.shape == (10, 10)
    assert torch.equal(s.topk_idx[:, 0].long(), logits.argmax(1))
    d = s.dense(torch.tensor([3, 3, 0]))
    assert torch.allclose(d.sum(1), torch.ones(3)) and d.shape == (3, 300)
    assert (d[0] > 0).sum() == 10
    top = torch.softmax(logits[3], 0).topk(10)
    assert torch.allclose(d[0, top.indices], top.values / top.values.sum(), atol=1e-3)


def test_iter_chunks_streams_the_same_rows(tmp_path):
    logits = _logits(50, 5)
    _label(tmp_path, _images(50, 5), logits, shard_size=16)
    s = PseudoLabelStore.load(tmp_path)
    got, index, starts = [], [], []
    for start, c in s.iter_chunks(("max_prob", "pred", "index"), chunk=6):
        starts.append(start)
        got.append(c["pred"])
        index.append(c["index"])
        assert len(c["pred"]) <= 6 and len(c["index"]) == len(c["pred"])
    assert torch.equal(torch.cat(got), logits.argmax(1)) and starts[0] == 0
    assert torch.equal(torch.cat(index), torch.arange(50))
    assert starts == [0, 6, 12, 16, 22, 28, 32, 38, 44, 48]  # chunks never cross a shard


def test_index_is_the_image_position_when_an_unreadable_image_is_skipped(tmp_path):
    """File-backed images, one unreadable in the middle of shard 1: the shard has a row fewer,
    every later row keeps its image's position (not its row number) as its index."""
    n, c = 20, 3
    files = tmp_path / "images"
    files.mkdir()
    paths = []
    for i, a in enumerate(_pixels(n)):
        p = files / f"{i:03d}.png"
        Image.fromarray(a).save(p)
        paths.append(p)
    paths[9].write_bytes(b"not an image")
    images = ImageSet(["a", "b", "c"], [p.name for p in paths], _labels(n, c), paths=paths,
                      bad_log=BadImageLog("unlabeled", n, skip=True, max_fraction=0.5))  # fmt: skip
    logits = _logits(n, c)
    meta = _label(tmp_path / "pseudo", images, logits, shard_size=7, batch=4)
    assert images.bad_log.uids == ["009.png"]
    assert [(s["start"], s["count"]) for s in meta["shards"]] == [(0, 7), (7, 6), (13, 6)]
    s = PseudoLabelStore.load(tmp_path / "pseudo")
    want = [i for i in range(n) if i != 9]
    assert s.index.tolist() == want
    assert s.uids == [images.uids[i] for i in want]
    assert torch.equal(s.pred, logits[want].argmax(1))
    assert torch.equal(hidden_labels(images, s.index), torch.from_numpy(images.labels[want]))
    md = shard_metadata(tmp_path / "pseudo" / "shard-00002.safetensors")
    assert md["start"] == "14" and s.index[13] == 14  # store row 13 is image 14


def test_version_and_format_checked(tmp_path):
    _label(tmp_path, _images(5, 3), _logits(5, 3))
    meta = json.loads((tmp_path / "meta.json").read_text())
    meta["version"] = VERSION + 1
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=f"is version {VERSION + 1}; this noisystudent reads"):
        PseudoLabelStore.load(tmp_path)
    meta["version"], meta["format"] = VERSION, "something-else"
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="is not a pseudo-label store"):
        PseudoLabelStore.load(tmp_path)
    (tmp_path / "meta.json").unlink()
    with pytest.raises(UserError, match="meta.json missing"):
        PseudoLabelStore.load(tmp_path)


def test_old_version_store_is_refused_with_one_line_saying_to_relabel(tmp_path):
    root = tmp_path / "iter0" / "pseudo"
    _label(root, _images(9, 3), _logits(9, 3))
    meta = json.loads((root / "meta.json").read_text())
    meta["version"] = 2
    (root / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError) as e:
        PseudoLabelStore.load(root)
    assert str(e.value) == (
        f"pseudo-label store '{root}' is version 2; this noisystudent reads version 3: delete "
        f"'{root}' and re-run `noisystudent pseudo-label` (or `noisystudent run`) to re-label"
    )


def test_shard_without_index_is_refused_like_an_old_version(tmp_path):
    _label(tmp_path, _images(12, 3), _logits(12, 3))
    f = tmp_path / "shard-00001.safetensors"
    md = shard_metadata(f)
    t = load_file(str(f))
    del t["index"]  # as a version-2 shard
    save_tensors(f, t, md)
    with pytest.raises(UserError) as e:
        PseudoLabelStore.load(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and f"'{f}' has no `index` column" in msg
    assert "reads version 3" in msg and "re-run `noisystudent pseudo-label`" in msg
    f.write_bytes(b"\0" * 16)
    with pytest.raises(UserError, match="shard-00001.safetensors' is unreadable; delete"):
        PseudoLabelStore.load(tmp_path)


def test_an_older_format_shard_left_by_an_interrupted_labeling_is_labeled_again(tmp_path):
    images, logits = _images(12, 3), _logits(12, 3)
    _label(tmp_path, images, logits)
    want = PseudoLabelStore.load(tmp_path)
    f = tmp_path / "shard-00001.safetensors"
    t = load_file(str(f))
    del t["index"]  # a version-2 shard from an older noisystudent, same identity
    save_tensors(f, t, {**shard_metadata(f), "version": "2"})
    (tmp_path / "meta.json").unlink()  # the stage had not finished
    _label(tmp_path, images, logits)
    got = PseudoLabelStore.load(tmp_path)
    assert torch.equal(got.index, want.index) and torch.equal(got.topk_prob, want.topk_prob)
    assert shard_metadata(f)["version"] == str(VERSION)


def test_identity_mismatch_refused_and_recorded_in_shards(tmp_path):
    images = _images(9, 3)
    ident = _identity(images, 3, 1.0)
    _label(tmp_path, images, _logits(9, 3), identity=ident)
    PseudoLabelStore.load(tmp_path, expect=ident)
    with pytest.raises(UserError, match="different teacher_sha256"):
        PseudoLabelStore.load(tmp_path, expect={"teacher_sha256": "xyz"})
    md = shard_metadata(tmp_path / "shard-00000.safetensors")
    assert md["teacher_sha256"] == "a" * 64 and md["start"] == "0"
    assert md["version"] == str(VERSION) and md["data_fingerprint"] == ident["data_fingerprint"]


def test_missing_shard_is_an_error(tmp_path):
    _label(tmp_path, _images(20, 3), _logits(20, 3))
    (tmp_path / "shard-00001.safetensors").unlink()
    with pytest.raises(UserError, match="shard-00001.safetensors' is missing"):
        PseudoLabelStore.load(tmp_path)


def test_write_shard_refuses_columns_of_different_lengths(tmp_path):
    p, i = torch.full((4, 3), 1 / 3), torch.zeros(4, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="do not match"):
        write_shard(tmp_path, 0, 0, p, i, torch.arange(3), ["a", "b", "c", "d"], 3)
    assert not list(tmp_path.iterdir())  # nothing written


class _NoUids(list):
    def __getitem__(self, i):
        raise AssertionError("hidden_labels must not touch the uids")

    def __iter__(self):
        raise AssertionError("hidden_labels must not touch the uids")


def test_hidden_labels_index_the_label_array(tmp_path):
    labels = np.array([2, -1, 0, 1, -1, 2], dtype=np.int64)
    images = ImageSet(["a", "b", "c"], _NoUids(["u"] * 6), labels, array=_pixels(6))
    got = hidden_labels(images, torch.tensor([5, 1, 0, 0, 3]))
    assert got.dtype == torch.int64 and got.tolist() == [2, -1, 2, 2, 1]
    assert hidden_labels(images, np.array([4, 2], dtype=np.int32)).tolist() == [-1, 0]
    assert hidden_labels(images, torch.zeros(0, dtype=torch.long)).shape == (0,)
    with pytest.raises(UserError, match="image index 6 is outside the set of 6 images"):
        hidden_labels(images, torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="1-D integer"):
        hidden_labels(images, torch.tensor([0.0, 1.0]))
