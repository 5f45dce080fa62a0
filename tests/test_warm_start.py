"""Warm start (teacher.pretrained): the first teacher from a weights file made here, or from
timm's own weights with timm stubbed out (nothing is downloaded)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from noisystudent.artifacts import model_meta, save_model
from noisystudent.cli import main
from noisystudent.config import load_config
from noisystudent.models import create_model, head_modules
from noisystudent.rundir import RunLayout, load_tensors, read_json, read_lines_json
from noisystudent.warmstart import head_keys

from .conftest import one_line_error as _err
from .conftest import tiny_overrides
from .helpers import Malicious

SOURCE_CLASSES = ["a", "b", "c", "d", "e"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def source():
    """A 5-class cifar_resnet8 whose every weight differs from a fresh model's (noise on all of
    them, BatchNorm statistics too), so loaded weights are told apart from initialised ones."""
    torch.manual_seed(123)
    m = create_model("cifar_resnet8", len(SOURCE_CLASSES))
    with torch.no_grad():
        for v in m.net.state_dict().values():
            if v.is_floating_point():
                v.add_(torch.rand_like(v) * 0.1 + 0.01)
    return m


def _plain(m) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in m.net.state_dict().items()}


def make_file(kind: str, m, folder: Path) -> Path:
    """The weights of `m` in one of the formats a user may bring."""
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "safetensors":  # the plain net's state dict (timm / torchvision style keys)
        save_file(_plain(m), str(p := folder / "net.safetensors"))
    elif kind == "torch":
        torch.save(_plain(m), p := folder / "net.pt")
    elif kind == "timm_checkpoint":  # timm's train.py: a dict with "state_dict", DDP prefixes
        sd = {f"module.{k}": v for k, v in _plain(m).items()}
        torch.save({"epoch": 3, "arch": "cifar_resnet8", "state_dict": sd}, p := folder / "c.pth")
    elif kind == "noisystudent":  # another run's model.safetensors (Classifier keys: "net.")
        paths = RunLayout(folder / "other_run").it(0)
        meta = model_meta("cifar_resnet8", 0, SOURCE_CLASSES, 16, m, None, None)
        save_model(paths, m, meta)
        p = paths.model
    else:
        raise ValueError(kind)
    return p


def _argv(data, run, *extra, models="[cifar_resnet8]"):
    over = tiny_overrides(data, run, models=models)
    return [str(run.parent / "cfg.yaml"), *over, "teacher.epochs=1", "device=cpu", *extra]


@pytest.fixture
def cfg_file(tmp_path):
    (tmp_path / "cfg.yaml").write_text("seed: 0\n")


@pytest.mark.parametrize("kind", ["safetensors", "torch", "timm_checkpoint", "noisystudent"])
def test_teacher_starts_from_the_file(kind, source, tiny_data, tmp_path, cfg_file, capsys):
    """lr=0: the trained teacher's parameters are the ones loaded. The trunk equals the file's,
    the head is new (3 classes, the file has 5), the run completes and records the source."""
    f = make_file(kind, source, tmp_path / "weights")
    run = tmp_path / "run"
    argv = ["train-teacher", *_argv(tiny_data, run, f"teacher.pretrained={f}", "teacher.lr=0")]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "teacher starts from pretrained weights" in out and "net.fc" not in out
    assert "head re-initialised for 3 classes (fc.weight, fc.bias)" in out

    layout = RunLayout(run)
    weights = load_tensors(layout.it(0).model)
    src = _plain(source)
    params = {n for n, _ in create_model("cifar_resnet8", 3).net.named_parameters()}
    trunk = [k for k in params if not k.startswith("fc.")]
    assert len(trunk) > 10
    for k in trunk:  # parameters (BatchNorm running statistics move in training mode)
        assert torch.equal(weights[f"net.{k}"], src[k]), k
    assert weights["net.fc.weight"].shape == (3, 64) and src["fc.weight"].shape == (5, 64)
    torch.manual_seed(0)  # the run's seed: the head is the one the model was built with
    fresh = create_model("cifar_resnet8", 3)
    assert torch.equal(weights["net.fc.weight"], fresh.net.fc.weight)

    n_tensors = len(src) - 2
    meta = read_json(layout.it(0).model_meta)
    rec = meta["pretrained"]
    assert rec["source"] == str(f) and rec["loaded"] == n_tensors
    assert rec["reinitialised"] == ["fc.weight", "fc.bias"] and len(rec["sha256"]) == 64
    events = [e for e in read_lines_json(layout.metrics)[0] if e.get("event") == "init"]
    assert events and events[0]["loaded"] == n_tensors and events[0]["source"] == str(f)
    manifest = json.loads(layout.manifest.read_text())
    assert str(f.resolve()) in manifest["stages"]["iter0/train"]["input_sha256"]


def test_summary_and_report_record_the_source(source, tiny_data, tmp_path, cfg_file, capsys):
    """A whole run (teacher + one student): the summary's teacher row says where its weights
    came from (students none); the report's recipe says so too."""
    f = make_file("torch", source, tmp_path / "weights")
    run = tmp_path / "run"
    argv = _argv(tiny_data, run, f"teacher.pretrained={f}", "student.epochs=1",
                 models="[cifar_resnet8,cifar_resnet8]")  # fmt: skip
    assert main(["run", *argv]) == 0, capsys.readouterr().err
    rows = read_json(RunLayout(run).summary)["iterations"]
    assert rows[0]["pretrained"]["source"] == str(f) and "pretrained" not in rows[1]
    assert "pretrained" not in read_json(RunLayout(run).it(1).model_meta)
    assert f"pretrained: {f}" in RunLayout(run).report.read_text()


def test_no_pretrained_keeps_model_json_and_weights(tiny_data, tmp_path, cfg_file, capsys):
    """teacher.pretrained=null (default) is the random init from the seed, as before: the
    weights equal a model built from that seed (lr=0) and model.json has no 'pretrained'."""
    run = tmp_path / "run"
    assert main(["train-teacher", *_argv(tiny_data, run, "teacher.lr=0")]) == 0
    capsys.readouterr()
    torch.manual_seed(0)
    fresh = create_model("cifar_resnet8", 3)
    weights = load_tensors(RunLayout(run).it(0).model)
    for k, v in fresh.net.named_parameters():
        assert torch.equal(weights[f"net.{k}"], v), k
    assert "pretrained" not in read_json(RunLayout(run).it(0).model_meta)
    events = read_lines_json(RunLayout(run).metrics)[0]
    assert not [e for e in events if e.get("event") == "init"]


def test_same_classes_load_the_head_too(tiny_data, tmp_path, cfg_file, capsys):
    """A file with a head for these 3 classes: nothing is re-initialised."""
    torch.manual_seed(7)
    m = create_model("cifar_resnet8", 3)
    f = make_file("safetensors", m, tmp_path / "weights")
    run = tmp_path / "run"
    argv = ["train-teacher", *_argv(tiny_data, run, f"teacher.pretrained={f}", "teacher.lr=0")]
    assert main(argv) == 0, capsys.readouterr().err
    assert "head loaded too" in capsys.readouterr().out
    weights = load_tensors(RunLayout(run).it(0).model)
    assert torch.equal(weights["net.fc.weight"], m.net.fc.weight)
    assert read_json(RunLayout(run).it(0).model_meta)["pretrained"]["reinitialised"] == []


def test_changed_file_retrains_the_teacher(source, tiny_data, tmp_path, cfg_file, capsys):
    """The file is an input of iter0/train: the same command again does nothing; after the
    file changes, the teacher trains again (from the new weights)."""
    f = make_file("torch", source, tmp_path / "weights")
    run = tmp_path / "run"
    argv = ["train-teacher", *_argv(tiny_data, run, f"teacher.pretrained={f}", "teacher.lr=0")]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(argv) == 0
    assert "training teacher" not in capsys.readouterr().out  # done: nothing to do
    sd = _plain(source)
    sd["stem.0.weight"] = sd["stem.0.weight"] + 1.0
    torch.save(sd, f)
    assert main(argv) == 0
    assert "training teacher" in capsys.readouterr().out
    weights = load_tensors(RunLayout(run).it(0).model)
    assert torch.equal(weights["net.stem.0.weight"], sd["stem.0.weight"])


# one-line errors -------------------------------------------------------------------------
def test_missing_file(tiny_data, tmp_path, cfg_file, capsys):
    f = tmp_path / "nope.safetensors"
    err = _err(capsys, ["train-teacher", *_argv(tiny_data, tmp_path / "run",
                                                 f"teacher.pretrained={f}")])  # fmt: skip
    assert "not found" in err and str(f) in err and "teacher.pretrained" in err


def test_random_bytes(tiny_data, tmp_path, cfg_file, capsys):
    for name in ("junk.pt", "junk.safetensors"):
        f = tmp_path / name
        f.write_bytes(os.urandom(2000))
        err = _err(capsys, ["train-teacher", *_argv(tiny_data, tmp_path / "run",
                                                     f"teacher.pretrained={f}")])  # fmt: skip
        assert str(f) in err and ("not a weights file" in err or "not a readable" in err)


def test_fake_safetensors_header(tiny_data, tmp_path, cfg_file, capsys):
    f = tmp_path / "bad.safetensors"
    f.write_bytes((20).to_bytes(8, "little") + b'{"broken": [1, 2' + b"\0" * 50)
    err = _err(capsys, ["train-teacher", *_argv(tiny_data, tmp_path / "run",
                                                 f"teacher.pretrained={f}")])  # fmt: skip
    assert str(f) in err and "not a readable safetensors file" in err


def test_pickle_with_code_is_refused_and_not_run(tiny_data, tmp_path, cfg_file, capsys):
    marker = tmp_path / "pwned"
    f = tmp_path / "evil.pt"
    torch.save({"state_dict": {"fc.weight": torch.zeros(1)}, "x": Malicious(marker)}, f)
    err = _err(capsys, ["train-teacher", *_argv(tiny_data, tmp_path / "run",
                                                 f"teacher.pretrained={f}")])  # fmt: skip
    assert "pickled code" in err and str(f) in err and "weights_only" in err
    assert not marker.exists()


def test_bare_pickle_with_code_is_refused_and_not_run(tiny_data, tmp_path, cfg_file, capsys):
    import pickle

    marker = tmp_path / "pwned"
    f = tmp_path / "evil.pkl"
    f.write_bytes(pickle.dumps({"fc.weight": Malicious(marker)}, protocol=4))
    err = _err(capsys, ["train-teacher", *_argv(tiny_data, tmp_path / "run",
                                                 f"teacher.pretrained={f}")])  # fmt: skip
    assert "pickle" in err and "nothing in it ran" in err and str(f) in err
    assert not marker.exists()


@pytest.mark.parametrize("what", ["list", "empty", "not_tensors"])
def test_not_a_state_dict(what, tiny_data, tmp_path, cfg_file, capsys):
    f = tmp_path / "w.pt"
    obj = {"list": [torch.zeros(2)], "empty": {}, "not_tensors": {"epoch": 3, "lr": 0.1}}[what]
    torch.save(obj, f)
    err = _err(capsys, ["train-teacher", *_argv(tiny_data, tmp_path / "run",
                                                 f"teacher.pretrained={f}")])  # fmt: skip
    assert str(f) in err and ("not a state dict" in err or "no state dict" in err)


def test_other_architecture(tiny_data, tmp_path, cfg_file, capsys):
    torch.manual_seed(1)
    m = create_model("wrn10_1", 5)
    paths = RunLayout(tmp_path / "w2").it(0)
    save_model(paths, m, model_meta("wrn10_1", 0, SOURCE_CLASSES, 16, m, None, None))
    for f in (paths.model, make_file("safetensors", m, tmp_path / "w3")):
        err = _err(capsys, ["train-teacher", *_argv(tiny_data, tmp_path / "run",
                                                     f"teacher.pretrained={f}")])  # fmt: skip
        assert "does not fit model 'cifar_resnet8'" in err and str(f) in err
        assert "missing from the file" in err and "unexpected key(s)" in err
        assert "stem.1.weight" in err  # the post-activation stem's BatchNorm, not in a WRN
        if f == paths.model:
            assert "noisystudent model 'wrn10_1'" in err


def test_shape_mismatch_outside_the_head(tiny_data, tmp_path, cfg_file, capsys):
    sd = _plain(create_model("cifar_resnet8", 3))
    sd["blocks.0.conv1.weight"] = torch.zeros(16, 16, 5, 5)
    f = tmp_path / "w.safetensors"
    save_file(sd, str(f))
    err = _err(capsys, ["train-teacher", *_argv(tiny_data, tmp_path / "run",
                                                 f"teacher.pretrained={f}")])  # fmt: skip
    assert "1 size mismatch(es), first 'blocks.0.conv1.weight': [16, 16, 5, 5]" in err


def test_student_pretrained_is_refused(tiny_data, tmp_path, cfg_file, capsys):
    err = _err(capsys, ["train-teacher", *_argv(tiny_data, tmp_path / "run",
                                                 "student.pretrained=x.pt")])  # fmt: skip
    assert "student.pretrained" in err and "teacher.pretrained" in err


def test_key_values():
    """null and false: random init; true and a path kept; result-changing, not a runtime key."""
    from noisystudent.config import RUNTIME_KEYS, config_differences

    assert load_config(None, []).teacher.pretrained is None
    assert load_config(None, ["teacher.pretrained=false"]).teacher.pretrained is None
    assert load_config(None, ["teacher.pretrained=w.pt"]).teacher.pretrained == "w.pt"
    on = load_config(None, ["teacher.pretrained=true", "models=[resnet18]"])
    assert on.teacher.pretrained is True
    assert "teacher.pretrained" not in RUNTIME_KEYS
    base = load_config(None, []).to_dict()
    assert config_differences(base, on.to_dict()) == ["models", "teacher.pretrained"]
    old = base.copy()
    old["teacher"] = {k: v for k, v in base["teacher"].items() if k != "pretrained"}
    assert config_differences(old, base) == []  # a config saved before the key existed


# timm's own weights (stubbed: never downloaded) -------------------------------------------
def test_true_asks_timm_for_its_pretrained_weights(tiny_data, tmp_path, cfg_file, capsys,
                                                   monkeypatch):  # fmt: skip
    import timm

    real, calls = timm.create_model, []

    def fake(name, pretrained=False, **kw):
        calls.append((name, pretrained, kw.get("num_classes")))
        return real(name, pretrained=False, **kw)  # nothing downloaded

    monkeypatch.setattr(timm, "create_model", fake)
    run = tmp_path / "run"
    argv = _argv(tiny_data, run, "teacher.pretrained=true", models="[test_resnet]")
    assert main(["train-teacher", *argv]) == 0, capsys.readouterr().err
    assert calls[0] == ("test_resnet", True, 3)
    rec = read_json(RunLayout(run).it(0).model_meta)["pretrained"]
    assert rec["source"] == "timm"
    assert rec["reinitialised"] == head_keys(create_model("test_resnet", 3).net) != []
    assert "timm" in capsys.readouterr().out


def test_true_when_timm_cannot_get_the_weights(tiny_data, tmp_path, cfg_file, capsys,
                                               monkeypatch):  # fmt: skip
    import timm

    def offline(name, pretrained=False, **kw):
        if pretrained:
            raise OSError("We couldn't connect to 'https://huggingface.co'\nmore lines")
        return timm.models.create_model(name, pretrained=False, **kw)

    monkeypatch.setattr(timm, "create_model", offline)
    err = _err(capsys, ["train-teacher", *_argv(tiny_data, tmp_path / "run",
                                                 "teacher.pretrained=true",
                                                 models="[test_resnet]")])  # fmt: skip
    assert "could not get timm's pretrained weights for 'test_resnet'" in err
    assert "couldn't connect" in err and "teacher.pretrained=PATH" in err


def test_true_with_a_builtin_model(tiny_data, tmp_path, cfg_file, capsys):
    err = _err(capsys, ["train-teacher", *_argv(tiny_data, tmp_path / "run",
                                                 "teacher.pretrained=true")])  # fmt: skip
    assert "only for timm models" in err and "cifar_resnet8" in err and "built-in" in err


def test_timm_model_from_a_file(tiny_data, tmp_path, cfg_file, capsys):
    """A timm model's own checkpoint for 10 classes into a 3-class teacher: the head timm's
    get_classifier() names is re-made, the rest loaded."""
    torch.manual_seed(5)
    m = create_model("test_resnet", 10)
    f = make_file("timm_checkpoint", m, tmp_path / "w")
    run = tmp_path / "run"
    argv = _argv(tiny_data, run, f"teacher.pretrained={f}", "teacher.lr=0",
                 models="[test_resnet]")  # fmt: skip
    assert main(["train-teacher", *argv]) == 0, capsys.readouterr().err
    rec = read_json(RunLayout(run).it(0).model_meta)["pretrained"]
    assert rec["reinitialised"] == head_keys(m.net) != [] and head_modules(m.net) == ["fc"]
    weights = load_tensors(RunLayout(run).it(0).model)
    conv = next(k for k, v in m.net.named_parameters() if v.dim() == 4)
    assert torch.equal(weights[f"net.{conv}"], m.net.state_dict()[conv])
