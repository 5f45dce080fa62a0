"""`noisystudent predict` and `noisystudent.load`: after a tiny demo run, its test images written
out as PNG files get exactly the run's own evaluation predictions, from a folder, an index, a
tar shard and the Python API; bad input is a one-line error; unreadable images are skipped."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import noisystudent
from noisystudent import cli
from noisystudent.artifacts import model_meta, read_eval, save_model
from noisystudent.config import load_config
from noisystudent.data import write_index
from noisystudent.errors import UserError
from noisystudent.inputs import load_data
from noisystudent.models import create_model
from noisystudent.rundir import ModelPaths, RunDir, RunLayout, read_json, tensors_metadata

from .conftest import TINY_DEMO
from .helpers import truncated_png


@pytest.fixture(scope="module")
def one_thread_module():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny 8x8 batches: one thread is much faster on a busy CPU
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, one_thread_module) -> Path:
    root = tmp_path_factory.mktemp("tiny") / "run"
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(["demo", f"run_dir={root}", *TINY_DEMO]) == 0
    return root


@pytest.fixture(scope="module")
def test_pngs(tiny_run: Path, tmp_path_factory) -> tuple[Path, list[Path], np.ndarray]:
    """The run's test images exactly as its evaluation saw them (uint8, already at the eval
    size; PNG is lossless), in sub-folders named by class (only paths to predict)."""
    cfg = load_config(tiny_run)
    test = load_data(cfg, RunDir(tiny_run)).test
    assert test.array is not None and test.array.shape[1:] == (8, 8, 3)
    folder = tmp_path_factory.mktemp("pngs") / "test"
    paths = []
    for k, (a, y) in enumerate(zip(test.array, test.labels, strict=True)):
        p = folder / test.classes[y] / f"{k:04d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(p)
        paths.append(p)
    return folder, paths, test.array


def _last_iteration(run: Path) -> int:
    lay = RunLayout(run)
    return max(i for i in lay.iterations() if lay.it(i).model.is_file())


def _eval_classes(run: Path, i: int | None = None) -> list[str]:
    ev = read_eval(RunLayout(run).it(_last_iteration(run) if i is None else i))
    classes = read_json(RunLayout(run).it(0).model_meta)["classes"]
    assert -1 not in ev["predictions"]
    return [classes[c] for c in ev["predictions"]]


def _predict(capsys, *args: str) -> tuple[int, str, str]:
    rc = cli.main(["predict", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _index_of(path: str) -> int:
    """Test image number k of a row's path (.../<class>/<k>.png, or archive::<class>/<k>.png)."""
    return int(Path(path.split("::")[-1]).stem)


def test_predict_folder_matches_the_runs_own_evaluation(tiny_run, test_pngs, tmp_path, capsys):
    folder, paths, _ = test_pngs
    out = tmp_path / "x.csv"
    rc, stdout, err = _predict(capsys, tiny_run, folder, "--out", out)
    assert rc == 0, err
    rows = _read_csv(out)
    assert len(rows) == len(paths)
    want = _eval_classes(tiny_run)
    got = {_index_of(r["path"]): r["class_1"] for r in rows}
    assert sorted(got) == list(range(len(paths)))
    agree = sum(got[k] == want[k] for k in got)
    assert agree == len(paths), f"top-1 agrees with eval.json on {agree} of {len(paths)}"
    for r in rows:
        assert Path(r["path"]).is_file() and 0.0 <= float(r["prob_1"]) <= 1.0
    last = stdout.strip().splitlines()[-1]
    assert last.startswith(f"predicted {len(paths)} images in ") and "images/s" in last
    assert last.endswith(f"-> {out}") and "skipped" not in last


def test_predict_an_earlier_iteration_jsonl_topk(tiny_run, test_pngs, tmp_path, capsys):
    folder, paths, _ = test_pngs
    out = tmp_path / "x.jsonl"
    rc, _, err = _predict(capsys, tiny_run, folder, "--iteration", "0", "--out", out,
                          "--topk", "3", "--batch-size", "7")  # fmt: skip
    assert rc == 0, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(paths)
    want = _eval_classes(tiny_run, 0)
    for r in rows:
        assert len(r["classes"]) == len(r["probs"]) == 3
        assert r["probs"] == sorted(r["probs"], reverse=True)
        assert r["classes"][0] == want[_index_of(r["path"])]


def test_predict_index_tar_and_files_to_stdout(tiny_run, test_pngs, tmp_path, capsys):
    folder, paths, _ = test_pngs
    index = tmp_path / "some.tsv"
    write_index(index, folder, [], [(p.relative_to(folder).as_posix(), "") for p in paths[:20]])
    shard = tmp_path / "shard.tar"
    with tarfile.open(shard, "w") as tf:
        for p in paths[20:40]:
            tf.add(p, arcname=p.relative_to(folder).as_posix())
    rc, stdout, err = _predict(capsys, tiny_run, index, shard, *paths[40:45])
    assert rc == 0, err
    rows = list(csv.DictReader(io.StringIO(stdout)))
    assert [_index_of(r["path"]) for r in rows] == list(range(45))
    want = _eval_classes(tiny_run)
    assert all(r["class_1"] == want[_index_of(r["path"])] for r in rows)
    assert rows[20]["path"] == f"{shard}::{paths[20].relative_to(folder).as_posix()}"
    assert err.strip().splitlines()[-1].endswith("-> stdout")


def test_python_api_matches_the_runs_own_evaluation(tiny_run, test_pngs):
    folder, paths, array = test_pngs
    model = noisystudent.load(tiny_run)
    assert model.classes == [str(c) for c in range(10)] and model.image_size == 8
    assert model.iteration == _last_iteration(tiny_run)
    assert isinstance(model.module, torch.nn.Module) and not model.module.training
    want = _eval_classes(tiny_run)
    by_path = model.predict(paths)
    assert by_path.shape == (len(paths), 10) and by_path.dtype == torch.float32
    assert torch.allclose(by_path.sum(1), torch.ones(len(paths)), atol=1e-5)
    pil = [Image.open(p) for p in paths]
    by_pil = model.predict(pil, batch_size=64)
    u8 = torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()
    by_u8 = model.predict(u8)
    by_float = model.predict(torch.stack([model.transform(im) for im in pil]).float() / 255)
    for probs in (by_path, by_pil, by_u8, by_float):
        assert [model.classes[c] for c in probs.argmax(1).tolist()] == want
    assert torch.allclose(by_path, by_u8, atol=1e-6)
    assert torch.equal(model.transform(pil[0]), u8[0])
    # a model file by its path, and one iteration of the run
    by_file = noisystudent.load(RunLayout(tiny_run).it(0).model, device="cpu")
    assert [by_file.classes[c] for c in by_file.predict(paths).argmax(1).tolist()] == (
        _eval_classes(tiny_run, 0)
    )
    assert noisystudent.load(tiny_run, iteration=0).path == by_file.path
    with pytest.raises(ValueError, match="channels last"):
        model.predict(torch.from_numpy(array))


def test_weights_header_carries_the_image_size_and_old_files_still_load(tiny_run, tmp_path):
    src = RunLayout(tiny_run).it(0)
    head = tensors_metadata(src.model)
    assert head["image_size"] == "8"
    old = ModelPaths(tmp_path / "old")
    old.dir.mkdir()
    save_file(load_file(str(src.model)), str(old.model),
              metadata={k: v for k, v in head.items() if k != "image_size"})  # fmt: skip
    shutil.copy(src.model_meta, old.model_meta)
    assert noisystudent.load(old.model).image_size == 8  # from model.json
    meta = read_json(old.model_meta)
    meta["image_size"] = 12
    (old.model_meta).write_text(json.dumps(meta))
    shutil.copy(src.model, old.model)  # header 8, model.json 12
    with pytest.raises(UserError, match="image_size 8 vs 12"):
        noisystudent.load(old.model)


def test_import_is_cheap():
    code = "import sys, noisystudent; assert 'torch' not in sys.modules; noisystudent.load"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unreadable_images_are_skipped_and_counted(tiny_run, test_pngs, tmp_path, capsys):
    _, paths, _ = test_pngs
    folder = tmp_path / "mixed"
    folder.mkdir()
    for p in paths[:3]:
        shutil.copy(p, folder / p.name)
    bad = truncated_png(folder / "broken.png", 8)
    out = tmp_path / "x.csv"
    rc, stdout, err = _predict(capsys, tiny_run, folder, "--out", out)
    assert rc == 0, err
    assert len(_read_csv(out)) == 3
    listing = out.with_suffix(".skipped.txt")
    assert listing.read_text().splitlines() == [str(bad)]
    assert "predicted 3 images" in stdout.splitlines()[-1]
    assert f"skipped 1 unreadable images (listed in {listing})" in stdout.splitlines()[-1]
    # to stdout: the skipped images are named on stderr
    rc, stdout, err = _predict(capsys, tiny_run, folder)
    assert rc == 0 and len(stdout.splitlines()) == 4  # header + 3 rows
    assert f"skipped unreadable image '{bad}'" in err and "skipped 1 unreadable" in err
    # --on-bad error: a one-line error naming the file, no output file left
    out2 = tmp_path / "y.csv"
    rc, _, err = _predict(capsys, tiny_run, folder, "--out", out2, "--on-bad", "error")
    _one_line_error(rc, err, str(bad))
    assert not out2.exists()


def _one_line_error(rc: int, err: str, *needles: str) -> str:
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("noisystudent: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_a_folder_without_images_is_an_error(tiny_run, tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("no images here")
    rc, _, err = _predict(capsys, tiny_run, empty)
    _one_line_error(rc, err, f"input folder '{empty}' holds no images")
    rc, _, err = _predict(capsys, tiny_run, tmp_path / "nothing")
    _one_line_error(rc, err, "does not exist")


def test_a_missing_source_is_an_error(tiny_run, test_pngs, tmp_path, capsys):
    folder = test_pngs[0]
    rc, _, err = _predict(capsys, tmp_path / "no_run", folder)
    _one_line_error(rc, err, f"model source '{tmp_path / 'no_run'}' does not exist")
    assert not (tmp_path / "no_run").exists()
    rc, _, err = _predict(capsys, tiny_run, folder, "--iteration", "7")
    _one_line_error(rc, err, "no model of iteration 7")
    alone = tmp_path / "alone.safetensors"
    shutil.copy(RunLayout(tiny_run).it(0).model, alone)
    rc, _, err = _predict(capsys, alone, folder)
    _one_line_error(rc, err, "model.json")
    rc, _, err = _predict(capsys, tiny_run, folder, "--out", tmp_path / "x.txt")
    _one_line_error(rc, err, "must end in .csv or .jsonl")


def test_a_model_of_another_architecture_or_class_list_is_an_error(tiny_run, test_pngs,
                                                                    tmp_path, capsys):  # fmt: skip
    folder = test_pngs[0]
    # model.json edited: its classes no longer those in the weights file's header
    src = RunLayout(tiny_run).it(0)
    edited = ModelPaths(tmp_path / "edited")
    shutil.copytree(src.dir, edited.dir)
    meta = read_json(edited.model_meta)
    meta["classes"] = [f"c{k}" for k in range(10)]
    edited.model_meta.write_text(json.dumps(meta))
    rc, _, err = _predict(capsys, edited.model, folder)
    _one_line_error(rc, err, "does not match its model.json", "classes")
    # a model file of another run in this run's place: another architecture than the run's
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    other = create_model("cifar_resnet14", 10)
    save_model(RunLayout(run).it(1), other,
               model_meta("cifar_resnet14", 1, meta["classes"], 8, other, None, None))  # fmt: skip
    rc, _, err = _predict(capsys, run, folder)
    _one_line_error(rc, err, "does not match this run", "cifar_resnet14")
    # the same architecture for another class list: changed since the run recorded it
    three = create_model("cifar_resnet8", 3)
    save_model(RunLayout(run).it(1), three,
               model_meta("cifar_resnet8", 1, ["a", "b", "c"], 8, three, None, None))  # fmt: skip
    rc, _, err = _predict(capsys, run, folder)
    _one_line_error(rc, err, "changed after its training stage")
    # not a model file at all
    rc, _, err = _predict(capsys, test_pngs[1][0], folder)
    _one_line_error(rc, err)
