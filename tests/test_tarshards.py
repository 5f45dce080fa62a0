"""Unlabeled images in WebDataset-style tar shards, read in place by offset."""

import tarfile

import numpy as np
import pytest

from noisystudent.cli import main
from noisystudent.data import decode_to_array, scan_unlabeled
from noisystudent.errors import UserError
from noisystudent.store import PseudoLabelStore

from .conftest import make_class_folders, tiny_overrides


def _tar(src, dest, names):
    with tarfile.open(dest, "w") as tf:
        for n in names:
            tf.add(src / n, arcname=n)


def test_tar_members_are_images_with_uids_and_hidden_labels(tmp_path):
    src = make_class_folders(tmp_path / "src", 3)
    (tmp_path / "u").mkdir()
    names = sorted(p.relative_to(src).as_posix() for p in src.rglob("*.png"))
    _tar(src, tmp_path / "u" / "shard-000.tar", names[:5])
    _tar(src, tmp_path / "u" / "shard-001.tar", names[5:])
    s = scan_unlabeled(tmp_path / "u", ["blue", "green", "red"])
    assert len(s) == 9 and s.uids[0] == "shard-000.tar/blue/000.png"
    assert s.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    arr = decode_to_array(s, 16, None, "unlabeled", skip_bad=False)
    from PIL import Image

    want = np.asarray(Image.open(src / "green" / "001.png").convert("RGB"))
    assert np.array_equal(arr.array[4], want)
    single = scan_unlabeled(tmp_path / "u" / "shard-001.tar", ["blue", "green", "red"])
    assert len(single) == 4


def test_compressed_tar_refused(tmp_path):
    src = make_class_folders(tmp_path / "src", 1)
    (tmp_path / "u").mkdir()
    with tarfile.open(tmp_path / "u" / "x.tar.gz", "w:gz") as tf:
        tf.add(src / "red" / "000.png", arcname="red/000.png")
    with pytest.raises(UserError, match="compressed archive"):
        scan_unlabeled(tmp_path / "u", ["red"])


def test_pipeline_pseudo_labels_tar_shards(tiny_data, tmp_path):
    u = tmp_path / "tars"
    u.mkdir()
    src = tiny_data["unlabeled"]
    names = sorted(p.relative_to(src).as_posix() for p in src.rglob("*.png"))
    _tar(src, u / "a.tar", names[:30])
    _tar(src, u / "b.tar", names[30:])
    cfg = tmp_path / "c.yaml"
    cfg.write_text("device: cpu\n")
    over = tiny_overrides({**tiny_data, "unlabeled": u}, tmp_path / "run")
    assert main(["train-teacher", str(cfg), *over]) == 0
    assert main(["pseudo-label", str(cfg), *over]) == 0
    store = PseudoLabelStore.load(tmp_path / "run" / "iter0" / "pseudo")
    assert (
        len(store) == 60
        and store.uids[0].startswith("a.tar/")
        and store.uids[-1].startswith("b.tar/")
    )
