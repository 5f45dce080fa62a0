"""The robustness stage and `noisystudent robustness` on a tiny run directory (tiny models
briefly fitted and written directly, 16 px images, a handful of test images): results.json
format, the reference row, fingerprint refusal, cache reuse, one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from noisystudent.artifacts import model_meta, save_model
from noisystudent.cli import main
from noisystudent.config import load_config
from noisystudent.errors import UserError
from noisystudent.models import create_model
from noisystudent.pipeline import run_robustness
from noisystudent.robustness import corruptions as C
from noisystudent.robustness.cache import SuiteCache, dataset_fingerprint, subset_indices
from noisystudent.robustness.table import format_table, one_line
from noisystudent.rundir import RunDir, RunLayout, read_json, release_locks, write_json
from noisystudent.rundir.layout import CACHE_META
from noisystudent.stages.robustness import _fill_self_reference

from .conftest import CLASSES, make_class_folders
from .helpers import CPU

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _unlock():
    yield
    release_locks()  # run_robustness locks the run directory, as a command does


def quick_fit(model: torch.nn.Module, folder: Path, steps: int) -> None:
    """A few Adam steps on the class-coloured images: a model whose predictions vary."""
    files = sorted(folder.rglob("*.png"))
    x = torch.stack([torch.from_numpy(np.array(Image.open(f))) for f in files]).permute(0, 3, 1, 2)
    y = torch.tensor([CLASSES.index(f.parent.name) for f in files])
    opt = torch.optim.Adam(model.parameters(), 0.01)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()


def fake_run(tmp_path: Path, tiny_data: dict[str, Path]) -> Path:
    """A run directory holding two briefly fitted models, written as the training stage writes
    them (model file with its identity header, model.json)."""
    run = tmp_path / "run"
    layout = RunLayout(run)
    for i in range(2):
        torch.manual_seed(i)
        m = create_model("cifar_resnet8", 3)
        quick_fit(m, tiny_data["labeled"], steps=15 + 15 * i)
        save_model(layout.it(i), m, model_meta("cifar_resnet8", i, CLASSES, 16, m, None, None))
    return run


def cfg_for(run: Path, tiny_data: dict[str, Path], *extra: str):
    over = [
        f"run_dir={run}",
        "models=[cifar_resnet8,cifar_resnet8]",
        f"data.labeled={tiny_data['labeled']}",
        f"data.unlabeled={tiny_data['unlabeled']}",
        f"data.test={tiny_data['test']}",
        "data.image_size=16",
        "device=cpu",
        "progress=false",
        "robustness.subset=4",
        "robustness.fgsm_eps=[0,8]",
        "robustness.pgd_steps=2",
        *extra,
    ]
    return load_config(None, over)


KEYS = (
    "clean_top1", "corruption", "unnormalized_ce", "mce", "relative_mce", "flip",
    "mean_flip_prob", "mfr", "top5_distance", "adversarial", "filtered_hard_acc", "ece",
)  # fmt: skip


def test_stage_writes_results_in_the_agreed_format(tmp_path, tiny_data, capsys):
    run = fake_run(tmp_path, tiny_data)
    cfg = cfg_for(run, tiny_data)
    r0, r1 = run_robustness(cfg, [0, 1])
    rd = RunDir(run)
    cached = [p.name for p in rd.paths.robustness_cache().iterdir()]  # beside the decodes
    assert cached == [f"{r0['meta']['fingerprint']}-cifar32-seed0-v{r0['meta']['version']}"]
    for i in range(2):
        on_disk = read_json(rd.it(i).robustness_results)
        assert on_disk == json.loads(json.dumps(r0 if i == 0 else r1))  # what the call returned
        assert rd.stage_done(rd.it(i).stage("robustness"))
        assert rd.it(i).robustness_predictions.is_file()
        assert set(KEYS) <= set(on_disk)
        assert set(on_disk["corruption"]) == set(C.ALL)
        assert list(on_disk["corruption"]["fog"]) == ["1", "2", "3", "4", "5"]
        assert len(on_disk["flip"]) == 10
        assert (
            list(on_disk["adversarial"]["fgsm"]) == ["0", "8"]
            and "pgd2_16" in on_disk["adversarial"]
        )
        assert on_disk["n_images"] == 4 and on_disk["meta"]["table"] == "cifar32"
    assert r0["clean_top1"] == r1["clean_top1"] == 100.0  # both fitted models know the colours
    assert r0["reference_is_self"]
    for key in ("mce", "relative_mce", "mfr"):  # 100, or None with a warning (zero denominator)
        assert r0[key] == pytest.approx(100.0) or (r0[key] is None and r0["warnings"]), key
    assert r0["filtered_hard_acc"] in (0.0, None)  # the reference scores 0 on its own errors
    assert r1["reference"]["iteration"] == 0 and r0["reference"]["self"]
    assert r1["meta"]["fingerprint"] == r0["meta"]["fingerprint"]
    out = capsys.readouterr().out
    assert "| model | clean top-1" in out and "FGSM 8" in out and "PGD-2 @16" in out
    assert f"results: {rd.it(1).robustness_results}" in out
    assert "mCE" in one_line(r1) and "PGD" in one_line(r1)
    # a second call reuses the results (same options), a new subset recomputes
    assert run_robustness(cfg, [1])[0]["total_wall_s"] == r1["total_wall_s"]
    again = run_robustness(cfg_for(run, tiny_data, "robustness.subset=5"), [1])[0]
    assert again["n_images"] == 5 and again["meta"]["fingerprint"] != r1["meta"]["fingerprint"]


def test_reference_with_another_fingerprint_is_refused(tmp_path, tiny_data):
    run = fake_run(tmp_path, tiny_data)
    ref = run_robustness(cfg_for(run, tiny_data, "robustness.corruptions=false",
                                 "robustness.perturbations=false", "robustness.adversarial=false"), [0])[0]  # fmt: skip
    bad = tmp_path / "other" / "results.json"
    write_json(bad, {**ref, "meta": {**ref["meta"], "fingerprint": "0000000000000000"}})
    cfg = cfg_for(run, tiny_data, f"robustness.reference={bad}", "robustness.perturbations=false")
    with pytest.raises(UserError, match="different data"):
        run_robustness(cfg, [1])


def test_cli_one_line_errors(tmp_path, tiny_data, capsys):
    run = fake_run(tmp_path, tiny_data)
    cfg = cfg_for(run, tiny_data)
    RunLayout(run).config.write_text(json.dumps(cfg.to_dict()))  # as `noisystudent run` left it
    for args, needle in (
        (["--subset", "0"], "--subset"),
        (["--reference", str(tmp_path / "missing.json")], "missing.json"),
        (["--table", "cifar100"], "robustness.table"),
        (["--hard-dir", str(tmp_path / "nope")], "hard_dir"),
        (["--iteration", "5"], "--iteration 5"),
    ):
        assert main(["robustness", str(run), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0] and "Traceback" not in err[0], err


def test_hard_dir_with_unknown_class_is_an_error(tmp_path, tiny_data):
    run = fake_run(tmp_path, tiny_data)
    hard = make_class_folders(tmp_path / "hard", 2, classes=["red", "purple"])
    cfg = cfg_for(run, tiny_data, f"robustness.hard_dir={hard}", "robustness.corruptions=false",
                  "robustness.perturbations=false", "robustness.adversarial=false")  # fmt: skip
    with pytest.raises(UserError, match="purple"):
        run_robustness(cfg, [0])


def test_hard_dir_subset_of_classes(tmp_path, tiny_data):
    run = fake_run(tmp_path, tiny_data)
    # green and red images, coloured as their class names say (make_class_folders colours by
    # position in its class list, so make all three and drop blue)
    hard = make_class_folders(tmp_path / "hard", 3, seed=4)
    shutil.rmtree(hard / "blue")
    cfg = cfg_for(run, tiny_data, f"robustness.hard_dir={hard}", "robustness.corruptions=false",
                  "robustness.perturbations=false", "robustness.adversarial=false")  # fmt: skip
    hs = run_robustness(cfg, [0])[0]["hard_set"]
    assert hs["n"] == 6 and hs["classes"] == 2 and "top5" not in hs and hs["dir"] == str(hard)
    # labels are mapped to the model's class indices: the fitted model (100% on the test set's
    # colours) gets every green and red image right, where chance is 50%
    assert hs["top1"] == 100.0


def test_cache_is_generated_once_with_metadata(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    labels = np.array([0, 1, 2])
    cache = SuiteCache(tmp_path, imgs, labels, "cifar32", seed=5)
    a = np.array(cache.corruption("gaussian_noise"))
    assert a.shape == (15, 16, 16, 3) and a.dtype == np.uint8
    meta = json.loads((cache.dir / CACHE_META).read_text())
    assert meta["seed"] == 5 and meta["table"] == "cifar32"
    assert meta["fingerprint"] == dataset_fingerprint(imgs, labels)
    # severity-major rows and reuse from disk
    assert np.array_equal(
        np.array(SuiteCache(tmp_path, imgs, labels, "cifar32", 5).corruption("gaussian_noise")), a
    )
    seq = np.array(cache.perturbation("translate"))
    assert seq.shape == (3, 16, 16, 16, 3)
    fresh = SuiteCache(tmp_path / "b", imgs, labels, "cifar32", seed=5)
    assert np.array_equal(fresh.perturbation("rotate", 2), cache.perturbation("rotate")[:2])
    assert np.array_equal(
        fresh.perturbation("gaussian_noise", 1), cache.perturbation("gaussian_noise")[:1]
    )
    assert fresh.perturbation("gaussian_noise").shape[0] == 3  # a longer request regenerates
    (cache.dir / CACHE_META).write_text(json.dumps({**meta, "seed": 6}))
    with pytest.raises(UserError, match="meta.json"):
        SuiteCache(tmp_path, imgs, labels, "cifar32", seed=5)
    assert dataset_fingerprint(imgs[:2], labels[:2]) != meta["fingerprint"]
    assert list(subset_indices(10, 4, 0)) == sorted(subset_indices(10, 4, 0))
    assert len(subset_indices(10, None, 0)) == 10


def test_format_table_handles_missing_values():
    t = format_table([("a", {"clean_top1": 50.0, "adversarial": None})])
    assert t.splitlines()[2].startswith("| a | 50.00 | -")


def test_self_reference_row_is_100_and_zero_hard():
    err = {c: {str(s): 10.0 + s for s in range(1, 6)} for c in C.ALL}
    res = {"clean_top1": 95.0, "corruption": err, "flip": {"rotate": 0.1, "scale": 0.2}}
    labels = np.array([0, 1, 2, 0])
    _fill_self_reference(res, np.array([0, 2, 2, 1]), labels)
    assert res["mce"] == pytest.approx(100) and res["relative_mce"] == pytest.approx(100)
    assert res["mfr"] == pytest.approx(100)
    assert res["filtered_hard_acc"] == 0.0 and res["filtered_hard_n"] == 2


@pytest.mark.slow
def test_trained_model_errs_more_at_severity_5_than_1_on_the_monotone_family(tmp_path):
    """docs sec. 6.2: on a trained model, corrupted error at s5 >= s1 for the monotone subset."""
    from noisystudent.data import digits_sets
    from noisystudent.robustness.evaluate import SuiteOptions, evaluate_suite

    lab, unl, test = digits_sets(16, 60, seed=0)
    x = torch.from_numpy(np.concatenate([lab.array, unl.array])).permute(0, 3, 1, 2)
    y = torch.from_numpy(np.concatenate([lab.labels, unl.labels]))
    torch.manual_seed(0)
    m = create_model("cifar_resnet8", 10)
    opt = torch.optim.Adam(m.parameters(), 0.01)
    m.train()
    for step in range(300):
        idx = torch.randint(0, len(y), (64,), generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(x[idx]), y[idx]).backward()
        opt.step()
    # the harsher 224 table: the digits model shrugs off most CIFAR-strength corruptions
    cache = SuiteCache(tmp_path, test.array[:200], test.labels[:200], "imagenet224", seed=0)
    opts = SuiteOptions(perturbations=False, adversarial=False)
    res, _ = evaluate_suite(m, cache, opts, CPU)
    assert res["clean_top1"] > 80
    clean_err = 100 - res["clean_top1"]
    checked = 0
    for name in ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise",
                 "gaussian_blur", "defocus_blur", "zoom_blur", "contrast", "pixelate"):  # fmt: skip
        err = res["corruption"][name]
        if max(err["1"], err["5"]) < clean_err + 5:
            continue  # at the clean-error floor (digits shrug off light noise): only noise left
        checked += 1
        assert err["5"] >= err["1"], (name, err)
    assert checked >= 4
