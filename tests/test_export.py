"""`noisystudent export` (ONNX, TorchScript) and `noisystudent evaluate --test-dir` on a tiny
finished run: the exported files agree with PyTorch on the run's test images at two batch
sizes and both input kinds, the description beside them says how to feed them, evaluating the
run's own test images written out as class folders reproduces its eval.json without changing
the run, and bad input is one line with exit code 2."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from noisystudent import cli
from noisystudent import export as export_mod
from noisystudent.artifacts import load_model
from noisystudent.config import load_config
from noisystudent.data import digits_sets
from noisystudent.export import description_path
from noisystudent.rundir import RunDir, RunLayout, read_json

from .conftest import TINY_DEMO

AGREE = re.compile(r"argmax agreement 100\.00% \((\d+)/\1\), max abs probability diff\w* (\S+) ")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished teacher + student digits run at 8x8 (a few seconds of training)."""
    root = tmp_path_factory.mktemp("export") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            assert cli.main(["demo", f"run_dir={root}", *TINY_DEMO]) == 0
    finally:
        torch.set_num_threads(threads)
    return root


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _test_images(run: Path) -> np.ndarray:
    cfg = load_config(run)
    return digits_sets(cfg.data.image_size, cfg.data.labels_per_class, seed=cfg.seed)[2].array


def _nchw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def _torch_argmax(run: Path, i: int, x: torch.Tensor) -> np.ndarray:
    model, _ = load_model(RunDir(run), i)
    return model.eval()(x).argmax(1).numpy()


def _export(capsys, *argv: str) -> tuple[str, float]:
    assert cli.main(["export", *argv]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    m = AGREE.search(out)
    assert m, out
    return out, float(m.group(2))


def _err(capsys, argv: list[str]) -> str:
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def _digests(run: Path) -> dict[str, str]:
    lay = RunLayout(run)
    files = [lay.manifest, lay.config, lay.summary]
    for i in lay.iterations():
        files += [lay.it(i).eval, lay.it(i).model, lay.it(i).model_meta]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


# --------------------------------------------------------------------------------------------
# export
def test_onnx_export_agrees_with_pytorch(run: Path, capsys) -> None:
    out, diff = _export(capsys, str(run), "--format", "onnx")
    assert diff <= 1e-4
    path = RunLayout(run).it(1).export(".onnx")  # default: the last trained model, in the run
    assert path.is_file() and str(path) in out
    desc = read_json(description_path(path))
    meta = read_json(RunLayout(run).it(1).model_meta)
    assert desc["classes"] == meta["classes"] and desc["image_size"] == meta["image_size"] == 8
    assert desc["input"]["dtype"] == "uint8" and desc["input"]["layout"] == "NCHW"
    assert "bilinear" in desc["preprocess"]["resize"].lower()
    assert desc["verification"]["argmax_agreement"] == 100.0
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.onnx", "model.onnx.json"]

    x = _nchw(_test_images(run))
    want = _torch_argmax(run, 1, x)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    assert inp.type == "tensor(uint8)" and inp.shape[1:] == [3, 8, 8]
    for b in (1, 37):  # dynamic batch size
        got = np.concatenate(
            [sess.run(None, {inp.name: x[k : k + b].numpy()})[0] for k in range(0, len(x), b)]
        )
        assert got.shape == (len(x), 10)
        assert (got.argmax(1) == want).all()


def test_onnx_float_input(run: Path, capsys, tmp_path: Path) -> None:
    target = tmp_path / "out" / "digits.onnx"
    _, diff = _export(
        capsys, str(run), "--format", "onnx", "--iteration", "0", "--input-dtype", "float32",
        "--out", str(target),
    )  # fmt: skip
    assert diff <= 1e-4
    desc = json.loads((tmp_path / "out" / "digits.onnx.json").read_text())
    assert desc["iteration"] == 0 and desc["input"]["dtype"] == "float32"
    assert desc["input"]["range"] == "[0, 1]"
    x = _nchw(_test_images(run)).float() / 255.0
    want = _torch_argmax(run, 0, x)
    sess = ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    assert inp.type == "tensor(float)"
    for b in (2, 100):
        got = np.concatenate(
            [sess.run(None, {inp.name: x[k : k + b].numpy()})[0] for k in range(0, len(x), b)]
        )
        assert (got.argmax(1) == want).all()


@pytest.mark.filterwarnings("ignore:.*deprecated:FutureWarning")
def test_torchscript_export_takes_uint8_and_float(run: Path, capsys) -> None:
    out, diff = _export(capsys, str(run), "--format", "torchscript")
    assert diff <= 1e-4 and "uint8 input and float32 input" in out
    path = RunLayout(run).it(1).export(".pt")
    desc = read_json(description_path(path))
    assert desc["classes"] == [str(c) for c in range(10)] and desc["image_size"] == 8
    module = torch.jit.load(str(path)).eval()
    x = _nchw(_test_images(run))
    want = _torch_argmax(run, 1, x)
    with torch.no_grad():
        for inp in (x, x.float() / 255.0):
            for b in (1, 64):
                got = torch.cat([module(inp[k : k + b]) for k in range(0, len(x), b)])
                assert (got.argmax(1).numpy() == want).all()


def test_export_refused_beyond_tolerance(run: Path, capsys, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(export_mod, "TOLERANCE", 0.0)  # ONNX differs by ~1e-7: refused
    target = tmp_path / "x" / "m.onnx"
    err = _err(capsys, ["export", str(run), "--format", "onnx", "--out", str(target)])
    assert "export refused" in err and "nothing was written" in err
    assert list(target.parent.iterdir()) == []  # no file, no temporary left


def test_export_bad_input(run: Path, capsys, tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    err = _err(capsys, ["export", str(run), "--format", "onnx", "--out", str(blocker / "m.onnx")])
    assert "cannot write the export" in err and "a_file" in err
    err = _err(capsys, ["export", str(run), "--format", "tflite"])
    assert "unknown --format 'tflite'" in err and "onnx" in err
    # a run directory with its config but no trained model
    empty = tmp_path / "untrained"
    empty.mkdir()
    RunLayout(empty).config.write_text(RunLayout(run).config.read_text())
    err = _err(capsys, ["export", str(empty), "--format", "torchscript"])
    assert "no trained model" in err
    err = _err(capsys, ["export", str(tmp_path / "nope"), "--format", "onnx"])
    assert "nope" in err
    # an --out whose description would overwrite the run's model.json
    before = _digests(run)
    meta = RunLayout(run).it(1).model_meta
    err = _err(capsys, ["export", str(run), "--format", "onnx", "--out", str(meta.with_suffix(""))])
    assert "a file of the run" in err
    assert _digests(run) == before


# --------------------------------------------------------------------------------------------
# evaluate --test-dir
def _write_test_folder(run: Path, root: Path) -> Path:
    """The run's test images as PNG class folders; file k.png is test image k."""
    cfg = load_config(run)
    test = digits_sets(cfg.data.image_size, cfg.data.labels_per_class, seed=cfg.seed)[2]
    for k, (a, y) in enumerate(zip(test.array, test.labels, strict=True)):
        d = root / test.classes[int(y)]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(d / f"{k:04d}.png")
    return root


def test_evaluate_test_dir_reproduces_the_runs_eval(run: Path, capsys, tmp_path: Path) -> None:
    folder = _write_test_folder(run, tmp_path / "my test set")
    before = _digests(run)
    assert cli.main(["evaluate", str(run), "--test-dir", str(folder)]) == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    lay = RunLayout(run)
    path = lay.it(1).eval_on("my_test_set")  # default: the last trained model
    assert path.is_file() and out.endswith(f"results: {path}")
    res, own = read_json(path), read_json(lay.it(1).eval)
    assert res["top1"] == pytest.approx(own["top1"]) and res["n"] == own["n"]
    assert res["top5"] == pytest.approx(own["top5"])
    # image by image: file k is the run's test image k
    by_file = {int(Path(u).stem): p for u, p in zip(res["uids"], res["predictions"], strict=True)}
    assert [by_file[k] for k in range(len(by_file))] == own["predictions"]
    cm = np.asarray(res["confusion"]["counts"])
    assert cm.shape == (10, 10) and cm.sum() == res["n"]
    assert 100.0 * np.trace(cm) / res["n"] == pytest.approx(res["top1"])
    assert res["classes"] == [str(c) for c in range(10)]
    assert _digests(run) == before  # read-only: manifest, config, summary, eval.json, models

    # another iteration, and the run's own config overrides do not make it "another config"
    assert cli.main(["evaluate", str(run), "--test-dir", str(folder), "--iteration", "0",
                     "eval_batch_size=7"]) == 0  # fmt: skip
    res0 = read_json(lay.it(0).eval_on("my_test_set"))
    assert res0["top1"] == pytest.approx(read_json(lay.it(0).eval)["top1"])
    assert _digests(run) == before


def test_evaluate_test_dir_other_classes(run: Path, capsys, tmp_path: Path) -> None:
    folder = _write_test_folder(run, tmp_path / "set")
    (folder / "9").rename(folder / "nine")
    err = _err(capsys, ["evaluate", str(run), "--test-dir", str(folder)])
    assert "other classes than the model" in err and "'nine'" in err and "'9'" in err
    err = _err(capsys, ["evaluate", str(run), "--test-dir", str(tmp_path / "missing")])
    assert "does not exist" in err
