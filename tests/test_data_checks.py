"""Data a classifier cannot learn from, or sets that share files: fewer than two labeled
classes is an error; the same folder as labeled and unlabeled (or test) data is an error;
files shared between sets are a one-line warning with the count, printed once."""

from __future__ import annotations

import time

import numpy as np
import pytest

from noisystudent import data as data_mod
from noisystudent.cli import main
from noisystudent.data import load_set, overlap, scan_class_folders, split_dataset, write_index
from noisystudent.errors import UserError

from .conftest import make_class_folders, tiny_overrides
from .conftest import one_line_error as _err


def _argv(cfg, data, run_dir, *extra):
    """train-teacher for one epoch: loads (and checks) all three sets, trains a little."""
    return ["train-teacher", cfg, *tiny_overrides(data, run_dir), "teacher.epochs=1", *extra]


# ---------------------------------------------------------------------------------------------
# fewer than two classes
def test_one_labeled_class_is_an_error(capsys, cfg, tmp_path):
    data = {k: make_class_folders(tmp_path / k, n, seed=s, classes=["red"])
            for k, n, s in [("labeled", 4, 1), ("unlabeled", 6, 2), ("test", 3, 3)]}  # fmt: skip
    run = tmp_path / "run"
    err = _err(capsys, _argv(cfg, data, run))
    assert "labeled data '" in err and "has 1 class (red)" in err
    assert "at least two class folders" in err and "data.labeled" in err
    assert not (run / "iter0").exists()  # nothing trained


def test_zero_labeled_classes_is_an_error(capsys, cfg, tiny_data, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    err = _err(capsys, _argv(cfg, tiny_data, tmp_path / "run", f"data.labeled={empty}"))
    assert "has no class sub-folders" in err and "at least two class folders" in err
    assert "data.labeled" in err


def test_one_class_index_and_split_are_errors(capsys, tmp_path):
    make_class_folders(tmp_path / "src", 3, classes=["red"])
    err = _err(capsys, ["split", str(tmp_path / "src"), str(tmp_path / "s"),
                        "--labels-per-class", "1"])  # fmt: skip
    assert "has 1 class folder (red)" in err and "at least two class folders" in err
    # an index whose images are all of one class, though it names two
    make_class_folders(tmp_path / "two", 2, classes=["blue", "red"])
    tsv = tmp_path / "lab.tsv"
    write_index(tsv, tmp_path / "two", ["blue", "red"], [("red/000.png", "red")])
    s = load_set(tsv, "labeled")
    with pytest.raises(UserError, match=r"lab.tsv' has 1 class \(red\); .*at least two class"):
        data_mod.check_classes(s, tsv, "labeled")
    # a row of a class the index does not list would be trained on as class -1
    write_index(tsv, tmp_path / "two", ["blue", "red"],
                [("red/000.png", "red"), ("blue/000.png", "bleu")])  # fmt: skip
    with pytest.raises(UserError, match=r"1 rows whose class is not in .*'blue/000.png'"):
        data_mod.check_classes(load_set(tsv, "labeled"), tsv, "labeled")


# ---------------------------------------------------------------------------------------------
# the same folder twice
def test_unlabeled_folder_equal_to_labeled_is_an_error(capsys, cfg, tiny_data, tmp_path):
    lab = tiny_data["labeled"]
    (tmp_path / "link").symlink_to(lab)  # the same folder under another name
    for same in (lab, tmp_path / "link", f"{lab}/../labeled/"):
        err = _err(capsys, _argv(cfg, tiny_data, tmp_path / "run", f"data.unlabeled={same}"))
        assert "data.unlabeled" in err and "is the same folder as data.labeled" in err


def test_test_folder_equal_to_labeled_is_an_error(capsys, cfg, tiny_data, tmp_path):
    (tmp_path / "link").symlink_to(tiny_data["labeled"])
    err = _err(capsys, _argv(cfg, tiny_data, tmp_path / "run", f"data.test={tmp_path / 'link'}"))
    assert "data.test" in err and "same folder as data.labeled" in err and "held-out" in err


# ---------------------------------------------------------------------------------------------
# shared files: a warning with the count, once
def _warnings(err: str) -> list[str]:
    assert "Traceback" not in err
    return [line for line in err.splitlines() if "warning" in line]


def test_overlap_is_one_warning_with_the_count(capsys, cfg, tmp_path):
    pool = tmp_path / "pool"
    data = {
        "labeled": make_class_folders(pool / "lab", 4, seed=1),  # 12 images inside the pool
        "unlabeled": pool,
        "test": make_class_folders(pool / "test", 2, seed=3),  # 6 test images inside the pool
    }
    make_class_folders(pool / "extra", 5, seed=2)
    code = main(_argv(cfg, data, tmp_path / "run"))
    err = capsys.readouterr().err
    assert code == 0, err
    assert _warnings(err) == [
        f"noisystudent: warning: 12 unlabeled images are also in data.labeled ('{pool / 'lab'}'); "
        "they are kept and pseudo-labeled too (remove them from data.unlabeled to avoid it)",
        f"noisystudent: warning: 6 test images are also in data.unlabeled ('{pool}'), so test "
        "accuracy is optimistic; use a held-out data.test",
    ]


def test_overlap_warning_is_printed_once_per_run(capsys, cfg, tmp_path):
    pool = tmp_path / "pool"
    data = {
        "labeled": make_class_folders(pool / "lab", 4, seed=1),
        "unlabeled": pool,
        "test": make_class_folders(tmp_path / "test", 2, seed=3),
    }
    make_class_folders(pool / "extra", 3, seed=2)
    over = ["models=[cifar_resnet8,cifar_resnet8]", "student.epochs=1", "teacher.epochs=1"]
    code = main(["run", cfg, *tiny_overrides(data, tmp_path / "run"), *over])
    err = capsys.readouterr().err
    assert code == 0, err
    assert len(_warnings(err)) == 1 and "12 unlabeled images are also in data.labeled" in err


def test_overlap_through_index_files(tmp_path):
    """A split's index files share a root but no file; the split's source used as the unlabeled
    folder holds every labeled image; a test index over labeled files is counted too."""
    src = make_class_folders(tmp_path / "src", 5)
    split_dataset(src, tmp_path / "split", 2)
    lab = load_set(tmp_path / "split" / "labeled.tsv", "labeled")
    unl = load_set(tmp_path / "split" / "unlabeled.tsv", "unlabeled", lab.classes)
    assert overlap(unl, lab) == 0
    whole = load_set(src, "unlabeled", lab.classes)
    assert overlap(whole, lab) == overlap(lab, whole) == 6
    test_tsv = tmp_path / "test.tsv"
    write_index(test_tsv, src, lab.classes, [(lab.uids[0], "blue"), (unl.uids[0], "red")])
    test = load_set(test_tsv, "test", lab.classes)
    assert overlap(test, lab) == 1 and overlap(test, unl) == 1
    # folders side by side: nothing is compared at all
    other = scan_class_folders(make_class_folders(tmp_path / "other", 5))
    assert overlap(other, scan_class_folders(src)) == 0


def test_overlap_check_cost_for_a_large_index(tmp_path):
    """200k-row labeled and unlabeled index files over the same root (the worst case: every
    uid compared): the check stays well under a second per 100k images."""
    n = 200_000
    root = tmp_path / "root"
    rows = lambda k0: ((f"c{k % 2}/{k:07d}.png", f"c{k % 2}") for k in range(k0, k0 + n))  # noqa: E731
    write_index(tmp_path / "lab.tsv", root, ["c0", "c1"], rows(0))
    write_index(tmp_path / "unl.tsv", root, ["c0", "c1"], rows(n - 500))
    lab = load_set(tmp_path / "lab.tsv", "labeled")
    unl = load_set(tmp_path / "unl.tsv", "unlabeled", lab.classes)
    t = time.perf_counter()
    assert overlap(unl, lab) == 500
    assert time.perf_counter() - t < 4.0  # ~0.3 s here; generous for a loaded CI machine


def test_warning_only_on_rank_zero(capsys, monkeypatch):
    monkeypatch.setattr(data_mod.dist, "is_main", lambda: False)
    data_mod.warn_once("from another rank")
    monkeypatch.setattr(data_mod.dist, "is_main", lambda: True)
    data_mod.warn_once("from rank zero")
    data_mod.warn_once("from rank zero")
    assert capsys.readouterr().err == "noisystudent: warning: from rank zero\n"


def test_valid_separate_sets_print_nothing(capsys, tiny_data, tmp_path):
    from noisystudent.inputs import load_data
    from noisystudent.rundir import RunDir

    from .helpers import tiny_cfg

    run = RunDir(tmp_path / "run")
    d = load_data(tiny_cfg(tiny_data, run.root), run)
    assert len(d.labeled) == 12 and len(d.unlabeled) == 60 and len(d.test) == 18
    assert capsys.readouterr().err == ""
    assert np.array_equal(d.labeled.labels, np.repeat([0, 1, 2], 4))
