import pickle

import numpy as np
import pytest
from PIL import Image

from noisystudent.data import (
    IndexColumn,
    decode_to_array,
    digits_sets,
    load_rgb,
    load_set,
    scan_class_folders,
    scan_unlabeled,
    split_dataset,
)
from noisystudent.errors import UserError

from .conftest import make_class_folders


def _save_modes(d):
    d.mkdir(parents=True, exist_ok=True)
    g = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(g).save(d / "gray.png")
    Image.fromarray(g).save(d / "gray.jpg")
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:4, :, 3] = 255  # top half opaque red, bottom half transparent
    Image.fromarray(rgba).save(d / "rgba.png")
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(d / "rgb.jpg", quality=95)
    Image.fromarray(g.astype(np.uint16) * 256).save(d / "deep16.png")
    Image.fromarray(np.full((8, 8, 3), 30, np.uint8)).convert("P").save(d / "palette.gif")


def test_any_pillow_mode_becomes_rgb(tmp_path):
    _save_modes(tmp_path)
    for name in ["gray.png", "gray.jpg", "rgba.png", "rgb.jpg", "deep16.png", "palette.gif"]:
        img = load_rgb(tmp_path / name)
        assert img.mode == "RGB" and img.size == (8, 8), name
    rgba = np.asarray(load_rgb(tmp_path / "rgba.png"))
    assert tuple(rgba[0, 0]) == (200, 0, 0)  # opaque part kept
    assert tuple(rgba[7, 0]) == (255, 255, 255)  # transparent part on white
    deep = np.asarray(load_rgb(tmp_path / "deep16.png"))
    gray = np.asarray(load_rgb(tmp_path / "gray.png"))
    assert np.abs(deep.astype(int) - gray.astype(int)).max() <= 1  # 16-bit scaled to 8-bit


def test_class_folders_sorted_and_mixed_formats(tmp_path):
    for c in ["zebra", "ant"]:
        _save_modes(tmp_path / c)
    s = scan_class_folders(tmp_path)
    assert s.classes == ["ant", "zebra"]
    assert len(s) == 12 and s.labels.tolist() == [0] * 6 + [1] * 6
    arr = decode_to_array(s, 16, tmp_path / "cache", "labeled", skip_bad=False)
    assert arr.array.shape == (12, 16, 16, 3) and arr.array.dtype == np.uint8


def test_missing_and_empty_folders_are_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        scan_class_folders(tmp_path / "nope")
    (tmp_path / "a").mkdir()
    make_class_folders(tmp_path, 1, classes=["b"])
    with pytest.raises(UserError, match="class folder '.*a' holds no images"):
        scan_class_folders(tmp_path)
    with pytest.raises(UserError, match="no class sub-folders"):
        scan_class_folders(tmp_path / "b")


def test_corrupt_image_named_in_labeled_and_skipped_in_unlabeled(tmp_path):
    make_class_folders(tmp_path / "l", 2)
    bad = tmp_path / "l" / "red" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    s = scan_class_folders(tmp_path / "l")
    with pytest.raises(UserError, match="broken.jpg"):
        decode_to_array(s, 16, None, "labeled", skip_bad=False)
    u = scan_unlabeled(tmp_path / "l", s.classes)
    out = decode_to_array(u, 16, None, "unlabeled", skip_bad=True)
    assert out.skipped == ["red/broken.jpg"] and len(out) == len(u) - 1


def test_unlabeled_uids_and_hidden_labels(tmp_path):
    make_class_folders(tmp_path / "u", 2)
    Image.new("RGB", (8, 8)).save(tmp_path / "u" / "loose.png")
    (tmp_path / "u" / "nested" / "deep").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "u" / "nested" / "deep" / "x.png")
    u = scan_unlabeled(tmp_path / "u", ["blue", "green", "red"])
    assert "loose.png" in u.uids and "nested/deep/x.png" in u.uids and "red/001.png" in u.uids
    lab = dict(zip(u.uids, u.labels.tolist(), strict=True))
    assert lab["loose.png"] == -1 and lab["nested/deep/x.png"] == -1 and lab["red/001.png"] == 2


def test_decode_cache_is_reused(tmp_path):
    make_class_folders(tmp_path / "l", 3)
    s = scan_class_folders(tmp_path / "l")
    a = decode_to_array(s, 16, tmp_path / "c", "labeled", skip_bad=False)
    files = list((tmp_path / "c").glob("*.npz"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    b = decode_to_array(s, 16, tmp_path / "c", "labeled", skip_bad=False)
    assert np.array_equal(a.array, b.array) and files[0].stat().st_mtime_ns == mtime


def test_split_writes_index_files_without_copying(tmp_path):
    make_class_folders(tmp_path / "src", 10)
    info = split_dataset(tmp_path / "src", tmp_path / "split", 3, seed=0)
    assert info["labeled"] == 9 and info["unlabeled"] == 21
    assert not list((tmp_path / "split").rglob("*.png"))
    lab = load_set(tmp_path / "split" / "labeled.tsv", "labeled")
    unl = load_set(tmp_path / "split" / "unlabeled.tsv", "unlabeled", lab.classes)
    assert np.bincount(lab.labels).tolist() == [3, 3, 3]
    assert not set(lab.uids) & set(unl.uids) and len(unl) == 21
    assert (unl.labels >= 0).all()  # hidden labels kept for auditing
    again = split_dataset(tmp_path / "src", tmp_path / "split2", 3, seed=0)
    assert (tmp_path / "split2" / "labeled.tsv").read_text().split("\n")[3:] == (
        tmp_path / "split" / "labeled.tsv"
    ).read_text().split("\n")[3:] and again == {**info}
    with pytest.raises(UserError, match="fewer than --labels-per-class"):
        split_dataset(tmp_path / "src", tmp_path / "s3", 11)


def test_index_keeps_uids_in_the_file(tmp_path):
    """An index file's uids and paths are read from the file per access (IndexColumn), equal to
    the folder scan, also after a subset, a pickle round trip, blank lines and CRLF endings."""
    make_class_folders(tmp_path / "src", 4)
    split_dataset(tmp_path / "src", tmp_path / "split", 2, seed=0)
    tsv = tmp_path / "split" / "unlabeled.tsv"
    unl = load_set(tsv, "unlabeled")
    full = scan_class_folders(tmp_path / "src")
    by_uid = dict(zip(full.uids, zip(full.paths, full.labels.tolist(), strict=True), strict=True))
    assert isinstance(unl.uids, IndexColumn) and len(unl) == 6
    assert [(p, int(c)) for p, c in zip(unl.paths, unl.labels, strict=True)] == [
        by_uid[u] for u in unl.uids
    ]
    sub = unl.subset(np.array([4, 1]))
    assert isinstance(sub.uids, IndexColumn) and list(sub.uids) == [unl.uids[4], unl.uids[1]]
    assert sub.paths[-1] == by_uid[unl.uids[1]][0] and np.asarray(sub.image(0)).shape == (16, 16, 3)
    assert list(pickle.loads(pickle.dumps(sub)).uids) == list(sub.uids)
    lines = tsv.read_text().splitlines()
    messy = tmp_path / "messy.tsv"
    messy.write_bytes(("\r\n".join(lines[:4] + ["", *lines[4:]]) + "\r\n\n").encode())
    again = load_set(messy, "unlabeled")
    assert list(again.uids) == list(unl.uids) and (again.labels == unl.labels).all()
    bad = tmp_path / "bad.tsv"
    bad.write_text("\n".join([*lines[:4], "no-tab-here"]) + "\n")
    with pytest.raises(UserError, match="line 5 is not 'uid<TAB>class'"):
        load_set(bad, "unlabeled")


def test_digits_builtin_split():
    lab, unl, test = digits_sets(16, 5, seed=0)
    assert len(lab) == 50 and np.bincount(lab.labels).tolist() == [5] * 10
    assert len(lab) + len(unl) + len(test) == 1797
    assert not set(lab.uids) & set(unl.uids) and not set(test.uids) & set(unl.uids)
    assert lab.array.shape[1:] == (16, 16, 3)
    lab2, _, _ = digits_sets(16, 5, seed=0)
    assert lab2.uids == lab.uids
