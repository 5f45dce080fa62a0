"""Model files between stages: foreign or changed models refused, a missing teacher, the
pseudo-label stage resuming per shard, and two CPU runs giving identical files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from noisystudent import artifacts, stages
from noisystudent.errors import UserError
from noisystudent.inputs import load_data
from noisystudent.models import create_model
from noisystudent.rundir import RunDir, open_run, write_json
from noisystudent.store import PseudoLabelStore

from .helpers import CPU, tiny_cfg


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A run directory whose teacher (iteration 0) is trained, plus its data and config."""
    from .conftest import make_class_folders as mk

    root = tmp_path_factory.mktemp("hostile")
    data = {"labeled": mk(root / "labeled", 4, seed=1), "unlabeled": mk(root / "unlabeled", 5, seed=2),
            "test": mk(root / "test", 2, seed=3)}  # fmt: skip
    cfg = tiny_cfg(data, root / "run", "teacher.epochs=1")
    run = open_run(cfg)
    d = load_data(cfg, run)
    stages.train_stage(cfg, run, d, 0, CPU)
    yield cfg, run, d
    run.unlock()


def _swap_model(run, i, name, classes, version="0.1.0", header=True):
    """Replace model i (weights and model.json) by another architecture/classes/version."""
    path = run.it(i).model
    backup = (path.read_bytes(), run.it(i).model_meta.read_bytes())
    m = create_model(name, len(classes))
    meta = {"format": "noisystudent-model", "format_version": "1", "name": name,
            "num_classes": str(len(classes)), "classes": json.dumps(classes),
            "noisystudent_version": version}  # fmt: skip
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path),
              metadata=meta if header else None)  # fmt: skip
    write_json(run.it(i).model_meta, {"name": name, "num_classes": len(classes),
                                                "classes": classes})  # fmt: skip
    return backup


def _restore(run, i, backup):
    run.it(i).model.write_bytes(backup[0])
    run.it(i).model_meta.write_bytes(backup[1])


@pytest.mark.parametrize(
    "name, classes, version, header, match",
    [
        (
            "cifar_resnet14",
            None,
            "0.1.0",
            True,
            r"architecture 'cifar_resnet14' vs 'cifar_resnet8'",
        ),
        ("cifar_resnet8", ["a", "b"], "0.1.0", True, r"classes \['a', 'b'\] vs \['blue'"),
        (
            "cifar_resnet8",
            None,
            "7.3.0",
            True,
            r"written by noisystudent 7.3.0 .* this is noisystudent",
        ),
        ("cifar_resnet8", None, "0.1.0", False, r"not a noisystudent model file"),
    ],
)
def test_foreign_model_file_is_refused_saying_what_differs(trained_run, name, classes, version,
                                                           header, match):  # fmt: skip
    cfg, run, d = trained_run
    backup = _swap_model(run, 0, name, classes or d.classes, version, header)
    try:
        with pytest.raises(UserError, match=match) as e:
            stages.pseudo_label_stage(cfg, run, d, 0, CPU)
        assert "\n" not in str(e.value)
    finally:
        _restore(run, 0, backup)
    artifacts.load_model(run, 0, "teacher", cfg.models[0], d.classes)  # the real one loads


def _claiming(dir_, weights, name, classes):
    """A model file whose header and model.json claim `name`/`classes` but hold `weights`."""
    from noisystudent import __version__
    from noisystudent.rundir import ModelPaths

    paths = ModelPaths(dir_)
    dir_.mkdir(parents=True, exist_ok=True)
    meta = {"format": "noisystudent-model", "format_version": "1", "name": name,
            "num_classes": str(len(classes)), "classes": json.dumps(classes),
            "noisystudent_version": __version__}  # fmt: skip
    save_file({k: v.contiguous() for k, v in weights.items()}, str(paths.model), metadata=meta)
    write_json(paths.model_meta, {"name": name, "num_classes": len(classes), "classes": classes})
    return paths


def test_state_dict_mismatch_says_what_differs_on_one_line(trained_run, tmp_path):
    cfg, run, d = trained_run
    name, n = cfg.models[0], len(d.classes)
    # another architecture's weights: keys missing and unexpected, with counts and first names
    deeper = create_model("cifar_resnet14", n).state_dict()
    paths = _claiming(tmp_path / "deeper", deeper, name, d.classes)
    with pytest.raises(UserError) as e:
        artifacts.load_model(run, 0, "teacher", name, d.classes, paths=paths)
    msg = str(e.value)
    want, held = create_model(name, n).state_dict(), load_file(str(paths.model))
    extra, lost = [k for k in held if k not in want], [k for k in want if k not in held]
    sizes = [k for k in want if k in held and held[k].shape != want[k].shape]
    assert "\n" not in msg and f"does not fit model '{name}' with {n} classes" in msg
    assert f"{len(lost)} key(s) missing from the file ({', '.join(lost[:3])}, ... (" in msg
    assert f"{len(extra)} unexpected key(s) in the file ({', '.join(extra[:3])}, ... (" in msg
    k = sizes[0]
    assert (f"{len(sizes)} size mismatch(es), first '{k}': {list(held[k].shape)} in the file vs "
            f"{list(want[k].shape)} in the model") in msg  # fmt: skip
    assert msg.endswith("use the run directory it was made in, or retrain")
    # fewer keys: missing ones named
    part = {k: v for k, v in want.items() if not k.startswith("net.fc.")}
    paths = _claiming(tmp_path / "part", part, name, d.classes)
    with pytest.raises(
        UserError, match=r"2 key\(s\) missing from the file \(net.fc.weight, net.fc.bias\)"
    ):
        artifacts.load_model(run, 0, "teacher", name, d.classes, paths=paths)
    # a classifier for another class count: the first parameter with both shapes
    other = create_model(name, n + 2).state_dict()
    paths = _claiming(tmp_path / "size", other, name, d.classes)
    with pytest.raises(UserError) as e:
        artifacts.load_model(run, 0, "teacher", name, d.classes, paths=paths)
    msg = str(e.value)
    assert "\n" not in msg
    assert (f"2 size mismatch(es), first 'net.fc.weight': [{n + 2}, 64] in the file vs "
            f"[{n}, 64] in the model") in msg  # fmt: skip
    assert "missing" not in msg and "unexpected" not in msg


def test_model_changed_after_training_is_refused(trained_run):
    cfg, run, d = trained_run
    path = run.it(0).model
    backup = path.read_bytes()
    try:
        b = bytearray(backup)
        b[-1] ^= 1  # one flipped bit in the weights
        path.write_bytes(bytes(b))
        with pytest.raises(UserError, match="changed after its training stage.*sha256"):
            artifacts.load_model(run, 0, "teacher", cfg.models[0], d.classes)
    finally:
        path.write_bytes(backup)


def test_missing_teacher_is_an_error_not_a_random_model(tmp_path, tiny_data):
    cfg = tiny_cfg(tiny_data, tmp_path / "run")
    run = open_run(cfg)
    try:
        d = load_data(cfg, run)
        with pytest.raises(UserError, match="no teacher checkpoint at .*train-teacher"):
            stages.pseudo_label_stage(cfg, run, d, 0, CPU)
    finally:
        run.unlock()


def test_pseudo_label_stage_resumes_after_its_last_complete_shard(trained_run, monkeypatch):
    cfg, run, d = trained_run
    root = run.it(0).pseudo
    monkeypatch.setattr(cfg.pseudo, "shard_size", 4)
    monkeypatch.setattr(cfg.pseudo, "batch_size", 2)
    stages.pseudo_label_stage(cfg, run, d, 0, CPU)  # one uninterrupted pass first, as the reference
    want = PseudoLabelStore.load(root)
    assert run.manifest.forget(run.it(0).stage("pseudo-label"))
    for f in root.iterdir():
        f.unlink()

    import noisystudent.labeling as labeling

    real_write = labeling.write_shard
    calls = {"n": 0}

    def dying_write(*a, **k):
        if calls["n"] == 2:  # killed while labeling the third shard
            raise KeyboardInterrupt
        calls["n"] += 1
        return real_write(*a, **k)

    monkeypatch.setattr(labeling, "write_shard", dying_write)
    with pytest.raises(KeyboardInterrupt):
        stages.pseudo_label_stage(cfg, run, d, 0, CPU)
    done = sorted(f.name for f in root.glob("shard-*.safetensors"))
    assert done == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert not (root / "meta.json").exists()
    kept = {f: (root / f).stat().st_mtime_ns for f in done}
    monkeypatch.setattr(labeling, "write_shard", real_write)
    stages.pseudo_label_stage(cfg, run, d, 0, CPU)
    got = PseudoLabelStore.load(root)
    assert got.uids == want.uids and torch.equal(got.topk_prob, want.topk_prob)
    assert {f: (root / f).stat().st_mtime_ns for f in done} == kept  # not labeled again
    assert any(e["event"] == "resume" for e in run.metrics())


def test_two_cpu_runs_give_identical_pseudo_labels_and_metrics(tiny_data, tmp_path):
    for name in ("a", "b"):  # teacher, evaluation and pseudo labels, twice in one process
        cfg = tiny_cfg(tiny_data, tmp_path / name, "models=[cifar_resnet8]")
        run = open_run(cfg)
        try:
            d = load_data(cfg, run)
            stages.train_stage(cfg, run, d, 0, CPU)
            stages.evaluate_stage(cfg, run, d, 0, CPU)
            stages.pseudo_label_stage(cfg, run, d, 0, CPU)
        finally:
            run.unlock()
    a, b = tmp_path / "a", tmp_path / "b"
    assert (a / "iter0/eval.json").read_bytes() == (b / "iter0/eval.json").read_bytes()
    for rel in ("iter0/model.safetensors", "iter0/pseudo/shard-00000.safetensors"):
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel  # byte for byte
    sa, sb = PseudoLabelStore.load(a / "iter0/pseudo"), PseudoLabelStore.load(b / "iter0/pseudo")
    assert sa.uids == sb.uids and torch.equal(sa.topk_prob, sb.topk_prob)
    strip = lambda d: [{k: v for k, v in e.items() if k not in ("time", "wall_s")}  # noqa: E731
                       for e in RunDir(d).metrics()]  # fmt: skip
    assert strip(a) == strip(b)
