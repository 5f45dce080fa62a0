"""fingerprints.set_fingerprint: the identity of an image set as a stage read it.

Unit tests on real small PNG files (no training): what changes a fingerprint in "listing" mode
(uids, labels, file sizes and mtimes, an index file's or a single tar's own bytes) and in
"content" mode (the files' bytes), what does not, and, through the CLI, that a stage re-runs
when its set's fingerprint changes (and only then)."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from noisystudent import data
from noisystudent.cli import main
from noisystudent.data import ImageSet, load_set, write_index
from noisystudent.fingerprints import MODES, set_fingerprint
from noisystudent.rundir import RunDir

from .conftest import CLASSES, make_class_folders, make_image, tiny_overrides


def load(spec: Path, what: str = "labeled") -> ImageSet:
    """The set at `spec` as inputs.load_data scans it (data.load_set). A single .tar is scanned
    with data.scan_unlabeled, which reads it: load_set takes any file for an index file (see
    test_load_set_reads_a_single_tar_as_the_unlabeled_set)."""
    if spec.suffix == ".tar":
        return data.scan_unlabeled(spec, CLASSES)
    return load_set(spec, what, CLASSES if what == "unlabeled" else None)


def fp(spec: Path, mode: str = "listing", what: str = "labeled") -> str:
    """The fingerprint of the set at `spec`, scanned afresh (as every command does)."""
    return set_fingerprint(load(spec, what), spec, mode)


def save_stored(path: Path, cls: int, seed: int) -> None:
    """A 16 px PNG without compression: its size does not depend on its pixels, so another
    image saved this way over it is a same-size edit."""
    make_image(cls, np.random.default_rng(seed)).save(path, compress_level=0)


def same_size_edit(path: Path, cls: int, seed: int) -> None:
    """Other pixels in the same number of bytes, with the file's mtime put back (what a copy
    tool that keeps mtimes does): the listing is unchanged, the content is not."""
    st = os.stat(path)
    old = path.read_bytes()
    save_stored(path, cls, seed)
    assert path.stat().st_size == st.st_size and path.read_bytes() != old
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_mtime_ns == st.st_mtime_ns


def index_of(tmp_path: Path, folder: Path, name: str = "labeled.tsv") -> Path:
    s = data.scan_class_folders(folder)
    path = tmp_path / "split" / name
    path.parent.mkdir(exist_ok=True)
    write_index(
        path, folder, s.classes, ((u, s.classes[c]) for u, c in zip(s.uids, s.labels, strict=True))
    )
    return path


def write_tar(path: Path, members: dict[str, bytes], mtime: int = 1_700_000_000) -> None:
    """An uncompressed tar of the given members, written with tarfile."""
    with tarfile.open(path, "w") as tf:
        for name, blob in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(blob), mtime
            tf.addfile(info, io.BytesIO(blob))


def png_bytes(cls: int, seed: int) -> bytes:
    b = io.BytesIO()
    make_image(cls, np.random.default_rng(seed)).save(b, format="PNG", compress_level=0)
    return b.getvalue()


def tar_members(seed: int = 0) -> dict[str, bytes]:
    return {f"{c}/{k:03d}.png": png_bytes(ci, seed * 100 + ci * 10 + k)
            for ci, c in enumerate(CLASSES) for k in range(2)}  # fmt: skip


def tar_folder(tmp_path: Path) -> Path:
    u = tmp_path / "tars"
    u.mkdir(exist_ok=True)
    write_tar(u / "shard-000000.tar", tar_members())
    return u


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return make_class_folders(tmp_path / "labeled", 3, seed=1)


# ---------------------------------------------------------------------------------------------
# listing mode on a class-folder set
@pytest.mark.parametrize("mode", MODES)
def test_nothing_changed_same_fingerprint_across_scans(folder, mode):
    a = fp(folder, mode)
    assert fp(folder, mode) == a  # a second load_set of the same files
    s = load_set(folder, "labeled")
    assert set_fingerprint(s, folder, mode) == set_fingerprint(s, folder, mode) == a
    # reading every file (as training does) or re-setting the same mtime changes nothing
    for p in folder.rglob("*.png"):
        p.read_bytes()
        st = p.stat()
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert fp(folder, mode) == a


def test_listing_changes_with_a_file_size(folder):
    p = folder / "green" / "001.png"
    st = p.stat()
    before = fp(folder)
    make_image(1, np.random.default_rng(3), size=20).save(p)  # another image, another size
    assert p.stat().st_size != st.st_size
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime put back: only the size differs
    assert fp(folder) != before


def test_listing_changes_with_a_file_mtime(folder):
    p = folder / "green" / "001.png"
    before = fp(folder)
    content = p.read_bytes()
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # `touch`: same bytes
    assert p.read_bytes() == content
    after = fp(folder)
    assert after != before
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # put back: the old fingerprint again
    assert fp(folder) == before


@pytest.mark.parametrize("mode", MODES)
def test_an_added_file_changes_it(folder, mode):
    before = fp(folder, mode)
    save_stored(folder / "red" / "new.png", 2, seed=5)
    assert fp(folder, mode) != before


@pytest.mark.parametrize("mode", MODES)
def test_a_removed_file_changes_it(folder, mode):
    before = fp(folder, mode)
    (folder / "blue" / "002.png").unlink()
    assert fp(folder, mode) != before


@pytest.mark.parametrize("mode", MODES)
def test_a_renamed_file_changes_it(folder, mode):
    before = fp(folder, mode)
    os.rename(folder / "blue" / "000.png", folder / "blue" / "zzz.png")  # same bytes and mtime
    assert fp(folder, mode) != before


@pytest.mark.parametrize("mode", MODES)
def test_a_file_moved_to_another_class_changes_it(folder, mode):
    """A labeling fix: the same file (bytes, size, mtime) now in another class folder."""
    before = fp(folder, mode)
    before_labels = load_set(folder, "labeled").labels.tolist()
    os.rename(folder / "red" / "000.png", folder / "blue" / "moved.png")
    after = load_set(folder, "labeled")
    assert sorted(after.labels.tolist()) != sorted(before_labels)
    assert fp(folder, mode) != before


def test_moving_a_file_back_restores_the_fingerprint(folder):
    """The fingerprint is a function of the set as it is now, not of its history."""
    before = fp(folder)
    os.rename(folder / "red" / "000.png", folder / "blue" / "moved.png")
    assert fp(folder) != before
    os.rename(folder / "blue" / "moved.png", folder / "red" / "000.png")  # rename keeps mtime
    assert fp(folder) == before


# ---------------------------------------------------------------------------------------------
# content mode: the documented reason for the option
def test_content_mode_catches_a_same_size_edit_with_its_mtime_restored(folder):
    p = folder / "red" / "001.png"
    save_stored(p, 2, seed=11)
    listing, content = fp(folder, "listing"), fp(folder, "content")
    same_size_edit(p, 0, seed=12)  # a red image becomes a blue one, size and mtime unchanged
    assert fp(folder, "listing") == listing  # listing mode cannot see it (as documented)
    assert fp(folder, "content") != content
    same_size_edit(p, 2, seed=11)  # the original bytes again
    assert fp(folder, "content") == content


def test_content_mode_ignores_mtimes(folder):
    before = fp(folder, "content")
    p = folder / "green" / "000.png"
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    assert fp(folder, "content") == before


@pytest.mark.parametrize("kind", ["folder", "index", "tar folder", "single tar", "memory"])
def test_the_two_modes_never_give_equal_strings(tmp_path, folder, kind):
    src: Path | None = None
    if kind == "memory":
        s = data.digits_sets(8, 2)[0]
    else:
        if kind == "folder":
            src = folder
        elif kind == "index":
            src = index_of(tmp_path, folder)
        else:
            src = tar_folder(tmp_path)
            src = src / "shard-000000.tar" if kind == "single tar" else src
        s = load(src, "unlabeled" if "tar" in kind else "labeled")
    listing, content = (set_fingerprint(s, src, m) for m in MODES)
    assert listing.startswith("listing:") and content.startswith("content:")
    assert listing != content  # (a set in memory hashes the same pixels in both modes)


def test_an_unknown_mode_is_an_error(folder):
    with pytest.raises(ValueError, match="not one of"):
        set_fingerprint(load_set(folder, "labeled"), folder, "mtime")


# ---------------------------------------------------------------------------------------------
# missing files
@pytest.mark.parametrize("mode", MODES)
def test_a_missing_file_counts_as_changed_not_as_an_error(folder, mode):
    s = load_set(folder, "labeled")  # listed, then deleted before the fingerprint is taken
    before = set_fingerprint(s, folder, mode)
    (folder / "green" / "002.png").unlink()
    gone = set_fingerprint(s, folder, mode)
    assert gone != before and gone.startswith(f"{mode}:")
    assert set_fingerprint(s, folder, mode) == gone  # and it stays that, no error


@pytest.mark.parametrize("mode", MODES)
def test_an_index_listing_a_missing_file_is_fingerprinted(tmp_path, folder, mode):
    idx = index_of(tmp_path, folder)
    before = fp(idx, mode)
    (folder / "blue" / "001.png").unlink()
    assert fp(idx, mode) != before  # the index still lists it: missing, not an error


# ---------------------------------------------------------------------------------------------
# index files
def test_an_index_set_changes_when_the_index_file_changes(tmp_path, folder):
    idx = index_of(tmp_path, folder)
    before = fp(idx)
    assert fp(idx) == before
    s = load_set(idx, "labeled")
    with open(idx, "a") as f:
        f.write("\n")  # read_index skips blank lines: same uids, labels and files, other bytes
    s2 = load_set(idx, "labeled")
    assert list(s2.uids) == list(s.uids) and s2.labels.tolist() == s.labels.tolist()
    assert fp(idx) != before


def test_an_index_row_moved_to_another_class_changes_it(tmp_path, folder):
    idx = index_of(tmp_path, folder)
    before = fp(idx)
    text = idx.read_text()
    assert "blue/000.png\tblue\n" in text
    idx.write_text(text.replace("blue/000.png\tblue\n", "blue/000.png\tred\n"))
    assert load_set(idx, "labeled").labels[0] == CLASSES.index("red")
    assert fp(idx) != before


def test_an_index_set_changes_when_a_listed_image_changes(tmp_path, folder):
    idx = index_of(tmp_path, folder)
    p = folder / "red" / "002.png"
    save_stored(p, 2, seed=3)
    listing, content = fp(idx), fp(idx, "content")
    st = p.stat()
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    assert fp(idx) != listing and fp(idx, "content") == content
    same_size_edit(p, 1, seed=4)
    assert fp(idx, "content") != content


# ---------------------------------------------------------------------------------------------
# tar shards (unlabeled)
@pytest.mark.parametrize("mode", MODES)
def test_a_tar_shard_set_changes_when_the_archive_changes(tmp_path, mode):
    u = tar_folder(tmp_path)
    shard = u / "shard-000000.tar"
    s = load_set(u, "unlabeled", CLASSES)
    assert len(s) == 6 and s.uids[0] == "shard-000000.tar/blue/000.png"
    before = fp(u, mode, "unlabeled")
    assert fp(u, mode, "unlabeled") == before
    st = shard.stat()
    members = tar_members()
    members["green/001.png"] = png_bytes(0, 999)  # one member's pixels, same size
    write_tar(shard, members)
    # a later write's mtime (set here: within one clock tick the kernel may give the same one)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert shard.stat().st_size == st.st_size
    assert fp(u, mode, "unlabeled") != before
    # a second shard added
    write_tar(u / "shard-000001.tar", tar_members(seed=1))
    assert len(load_set(u, "unlabeled", CLASSES)) == 12


def test_a_tar_edit_that_keeps_size_and_mtime(tmp_path):
    """In a folder of shards, listing mode sees each archive's size and mtime only; content mode
    reads it. A single tar given as the set is hashed itself, so listing mode sees it too."""
    u = tar_folder(tmp_path)
    shard = u / "shard-000000.tar"
    st = shard.stat()
    listing, content = fp(u, "listing", "unlabeled"), fp(u, "content", "unlabeled")
    one, one_content = fp(shard, "listing", "unlabeled"), fp(shard, "content", "unlabeled")
    members = tar_members()
    members["red/000.png"] = png_bytes(1, 4242)
    write_tar(shard, members)
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert shard.stat().st_size == st.st_size
    assert fp(u, "listing", "unlabeled") == listing
    assert fp(u, "content", "unlabeled") != content
    assert fp(shard, "listing", "unlabeled") != one  # the single tar's own bytes
    assert fp(shard, "content", "unlabeled") != one_content


def test_a_single_tar_set_as_source_file(tmp_path):
    u = tar_folder(tmp_path)
    shard = u / "shard-000000.tar"
    s = load(shard, "unlabeled")
    assert len(s) == 6
    before = set_fingerprint(s, shard, "listing")
    assert set_fingerprint(load(shard, "unlabeled"), shard, "listing") == before
    shard.unlink()  # gone: changed, not an error
    assert set_fingerprint(s, shard, "listing") != before
    assert set_fingerprint(s, shard, "content") != set_fingerprint(s, shard, "listing")


def test_load_set_reads_a_single_tar_as_the_unlabeled_set(tmp_path):
    shard = tar_folder(tmp_path) / "shard-000000.tar"
    s = load_set(shard, "unlabeled", CLASSES)
    assert list(s.uids) == list(data.scan_unlabeled(shard, CLASSES).uids)


def test_a_folder_with_images_and_tar_shards(tmp_path):
    u = tar_folder(tmp_path)
    shutil.copytree(make_class_folders(tmp_path / "loose", 1, seed=7), u / "loose")
    before = fp(u, "listing", "unlabeled")
    assert len(load_set(u, "unlabeled", CLASSES)) == 9
    (u / "loose" / "red" / "000.png").unlink()
    assert fp(u, "listing", "unlabeled") != before


# ---------------------------------------------------------------------------------------------
# sets in memory
@pytest.mark.parametrize("mode", MODES)
def test_an_in_memory_set_changes_with_one_pixel(mode):
    lab = data.digits_sets(8, 2)[0]
    assert lab.paths is None and lab.array is not None
    before = set_fingerprint(lab, None, mode)
    assert set_fingerprint(data.digits_sets(8, 2)[0], None, mode) == before  # built again
    arr = lab.array.copy()
    arr[3, 4, 5, 1] ^= 1
    changed = ImageSet(lab.classes, list(lab.uids), lab.labels.copy(), array=arr)
    assert set_fingerprint(changed, None, mode) != before
    relabeled = ImageSet(lab.classes, list(lab.uids), lab.labels.copy(), array=lab.array)
    relabeled.labels[0] = (relabeled.labels[0] + 1) % 10
    assert set_fingerprint(relabeled, None, mode) != before
    assert set_fingerprint(data.digits_sets(8, 3)[0], None, mode) != before


# ---------------------------------------------------------------------------------------------
# through the CLI: `noisystudent train-teacher` re-runs iter0/train exactly when it should
RERUN = "labeled data changed since iter0/train ran: running iter0/train again"


def _teacher(data_, run_dir: Path, capsys, *extra: str) -> str:
    cfg = run_dir.parent / "cfg.yaml"
    cfg.write_text("device: cpu\n")
    capsys.readouterr()
    over = tiny_overrides(data_, run_dir, models="[cifar_resnet8]")
    assert main(["train-teacher", str(cfg), *over, *extra]) == 0
    return capsys.readouterr().out


def _trained(run_dir: Path) -> dict:
    """iter0/train's recorded outputs (relative path -> size and sha256)."""
    return RunDir(run_dir).manifest.entry("iter0/train")["outputs"]


@pytest.fixture
def edit_ready(tiny_data):
    """tiny_data with its labeled red/000.png saved uncompressed, so it can be edited in place
    to other pixels in the same bytes."""
    save_stored(tiny_data["labeled"] / "red" / "000.png", 2, seed=9)
    return tiny_data


def test_cli_content_mode_retrains_after_a_same_size_same_mtime_edit(
    edit_ready, tmp_path, capsys, one_thread
):
    run_dir = tmp_path / "run"
    out = _teacher(edit_ready, run_dir, capsys, "data.fingerprint=content")
    assert "[iter 0] training teacher" in out
    fp_before = RunDir(run_dir).manifest.entry("iter0/train")["data"]["data:labeled"]
    assert fp_before.startswith("content:")
    same_size_edit(edit_ready["labeled"] / "red" / "000.png", 0, seed=10)  # a red one -> blue
    out = _teacher(edit_ready, run_dir, capsys, "data.fingerprint=content")
    assert RERUN in out and "[iter 0] training teacher" in out  # trained again
    assert RunDir(run_dir).manifest.entry("iter0/train")["data"]["data:labeled"] != fp_before
    # nothing changed since: nothing runs
    out = _teacher(edit_ready, run_dir, capsys, "data.fingerprint=content")
    assert "changed since" not in out and "training teacher" not in out


def test_cli_content_mode_retrain_equals_a_fresh_run(edit_ready, tmp_path, capsys, one_thread):
    run_dir = tmp_path / "run"
    _teacher(edit_ready, run_dir, capsys, "data.fingerprint=content")
    before = _trained(run_dir)
    same_size_edit(edit_ready["labeled"] / "red" / "000.png", 0, seed=10)
    assert RERUN in _teacher(edit_ready, run_dir, capsys, "data.fingerprint=content")
    fresh = tmp_path / "fresh"
    _teacher(edit_ready, fresh, capsys, "data.fingerprint=content")
    assert _trained(fresh) != before  # the edit changes what a teacher learns
    assert _trained(run_dir) == _trained(fresh)


def test_cli_listing_mode_does_not_notice_a_same_size_same_mtime_edit(
    edit_ready, tmp_path, capsys, one_thread
):
    """As documented: listing mode trusts sizes and mtimes (data.fingerprint=content is for
    data whose mtimes cannot be trusted)."""
    run_dir = tmp_path / "run"
    _teacher(edit_ready, run_dir, capsys)
    before = _trained(run_dir)
    model = RunDir(run_dir).it(0).model
    mtime = model.stat().st_mtime_ns
    same_size_edit(edit_ready["labeled"] / "red" / "000.png", 0, seed=10)
    out = _teacher(edit_ready, run_dir, capsys)
    assert "changed since" not in out and "training teacher" not in out
    assert _trained(run_dir) == before and model.stat().st_mtime_ns == mtime


def test_cli_switching_the_fingerprint_mode_is_accepted_and_reruns_once(
    tiny_data, tmp_path, capsys, one_thread
):
    run_dir = tmp_path / "run"
    _teacher(tiny_data, run_dir, capsys)  # listing (the default)
    before = _trained(run_dir)
    out = _teacher(tiny_data, run_dir, capsys, "data.fingerprint=content")  # a runtime key
    assert out.count(RERUN) == 1 and "[iter 0] training teacher" in out
    assert _trained(run_dir) == before  # same images, same seed: the same model again
    out = _teacher(tiny_data, run_dir, capsys, "data.fingerprint=content")
    assert "changed since" not in out and "training teacher" not in out
    out = _teacher(tiny_data, run_dir, capsys)  # and back
    assert out.count(RERUN) == 1
    assert _trained(run_dir) == before
