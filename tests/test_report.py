"""The run report: built for a tiny end-to-end run, every section present, every image opens."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from noisystudent import cli
from noisystudent.cli import DEMO_CONFIG
from noisystudent.config import load_config
from noisystudent.errors import UserError
from noisystudent.pipeline import run_pipeline
from noisystudent.report import SECTIONS, build_report, report_path
from noisystudent.rundir import RunLayout, read_json

from .conftest import TINY_DEMO

pytest.importorskip("matplotlib")


ROBUSTNESS = {
    "clean_top1": 91.5,
    "corruption": {
        "gaussian_noise": {"1": 12.0, "2": 20.5, "3": 33.0, "4": 47.0, "5": 61.0},
        "motion_blur": {"1": 9.0, "2": 11.0, "3": 15.0, "4": 22.0, "5": 30.0},
        "contrast": {"1": 8.5, "2": 9.5, "3": 12.0, "4": 20.0, "5": 48.0},
    },
    "unnormalized_ce": 25.2,
    "mce": 80.1,
    "relative_mce": 95.0,
    "flip": {"gaussian_noise": 0.08, "translate": 0.03, "brightness": 0.01},
    "mean_flip_prob": 0.04,
    "mfr": 70.0,
    "top5_distance": 0.12,
    "adversarial": {
        "fgsm": {"0": 91.5, "2": 60.0, "4": 41.0, "8": 20.0, "16": 8.0},
        "pgd10_16": 1.5,
        "pixel_space": "[0,1], eps = eps_px / 255",  # non-numbers are ignored
    },
    "filtered_hard_acc": 30.0,
    "ece": 5.0,
    "n_images": 450,
    "warnings": ["reference flip probability on 'snow' is 0; mFR against it is undefined"],
}
# the reference model's own results: normalised scores are null, some parts not run
REFERENCE = {**ROBUSTNESS, "mce": None, "relative_mce": None, "mfr": None, "flip": None}


class _Page(HTMLParser):
    """Section ids, <img> sources and any other URL the page would load."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.imgs: list[str] = []
        self.loads: list[str] = []  # src/href other than data: URIs and in-page anchors

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "section" and a.get("id"):
            self.ids.append(a["id"])
        if tag == "img":
            self.imgs.append(a.get("src") or "")
        for key in ("src", "href"):
            v = a.get(key)
            if v and not v.startswith(("data:", "#")):
                self.loads.append(v)


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text())
    return page


def _open_images(page: _Page, base: Path) -> list[Image.Image]:
    out = []
    for src in page.imgs:
        if src.startswith("data:image/png;base64,"):
            raw = base64.b64decode(src.split(",", 1)[1], validate=True)
            img = Image.open(io.BytesIO(raw))
        else:
            path = base / src
            assert path.is_file(), f"missing image {path}"
            img = Image.open(path)
        img.load()  # fully decodes: a truncated or corrupt image fails here
        out.append(img)
    return out


def _section(html: str, sid: str) -> str:
    m = re.search(rf'<section id="{sid}">(.*?)</section>', html, re.S)
    assert m, f"section {sid} missing"
    return m.group(1)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished teacher + student `noisystudent demo` run (report.html written by the
    pipeline); its stdout is kept beside the run directory in demo_stdout.txt."""
    root = tmp_path_factory.mktemp("tiny") / "run"
    # one thread: on a shared, busy CPU, tiny 8x8 batches run ~10x faster than with several
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            assert cli.main(["demo", f"run_dir={root}", *TINY_DEMO]) == 0
    finally:
        torch.set_num_threads(threads)
    (root.parent / "demo_stdout.txt").write_text(out.getvalue())
    return root


def test_pipeline_writes_report_with_every_section(tiny_run: Path) -> None:
    path = report_path(tiny_run)
    assert path.is_file(), "run_pipeline should write report.html at the end of the run"
    last = (tiny_run.parent / "demo_stdout.txt").read_text().strip().splitlines()[-1]
    assert last.endswith(path.resolve().as_uri()), "the demo ends by printing its report"
    page = _parse(path)
    assert page.ids == [sid for sid, _ in SECTIONS]
    assert not page.loads, f"the page must not load anything at view time: {page.loads}"
    html = path.read_text()
    # pictures expected from a teacher + one student: test top-1 by iteration, two training
    # stages, one confidence histogram, one class-count chart, one sample grid, one confusion
    imgs = _open_images(page, tiny_run)
    assert len(imgs) >= 7
    for img in imgs:
        assert img.format == "PNG" and img.width >= 300 and img.height >= 150
    for sid in ("training", "confidence", "selection", "samples", "confusion"):
        assert "<img" in _section(html, sid), sid
    iters = _section(html, "iterations")
    assert "cifar_resnet8" in iters
    # the selection that trained the student, in both of its fractions (select.threshold=0:
    # every image passes the filter; balancing keeps fewer distinct ones)
    counts = read_json(RunLayout(tiny_run).it(0).counts)
    assert "passed filter" in iters and "kept unique" in iters
    assert f"{counts['passed_filter_fraction']:.3f}" in iters
    assert f"{counts['kept_unique_fraction']:.3f}" in iters
    sel = _section(html, "selection")
    assert f"{counts['passed_filter']} of {counts['total']} images passed" in sel
    assert f"{counts['kept_unique']} distinct images kept" in sel
    assert "No robustness results" in _section(html, "robustness")


def test_samples_refused_when_the_unlabeled_set_changed(tiny_run: Path, tmp_path: Path) -> None:
    """Store rows name images by position in the set they labeled: once the set has changed
    (an image removed here), the report says so instead of showing other images' pictures."""
    from noisystudent.fingerprints import set_fingerprint
    from noisystudent.inputs import load_data
    from noisystudent.rundir import RunDir

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    data = load_data(load_config(run), RunDir(run))
    n = len(data.unlabeled)
    data.unlabeled = data.unlabeled.subset(np.arange(1, n))
    data.fingerprints["unlabeled"] = set_fingerprint(data.unlabeled, None)  # as loading it gives
    html = build_report(run, data=data, tensorboard=False).path.read_text()
    samples = _section(html, "samples")
    assert "changed since teacher iter0 labeled them" in samples and "<img" not in samples
    assert "no hidden labels" in _section(html, "confidence")


def test_cli_report_with_synthetic_robustness_results(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    report_path(run).unlink()
    for i, res in ((0, REFERENCE), (1, ROBUSTNESS)):
        paths = RunLayout(run).it(i)
        paths.robustness.mkdir()
        paths.robustness_results.write_text(json.dumps(res))
    assert cli.main(["report", str(run)]) == 0
    out, err = capsys.readouterr()
    assert str(report_path(run)) in out and "warning" not in err
    html = report_path(run).read_text()
    sec = _section(html, "robustness")
    assert sec.count("<img") == 3  # corruption heatmaps, accuracy vs epsilon, flip rates
    for text in (
        "mCE",
        "80.10",
        "PGD-10",
        "FGSM accuracy, ε = 16/255",
        "0.0400",
        "–",
        "mFR against it is undefined",
    ):
        assert text in sec, text
    page = _parse(report_path(run))
    assert page.ids == [sid for sid, _ in SECTIONS] and not page.loads
    assert len(_open_images(page, run)) >= 10


def test_partial_run_still_gets_every_section(tiny_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    layout = RunLayout(run)
    for p in (layout.it(0).pseudo, layout.it(0).select_dir, layout.it(1).dir):
        shutil.rmtree(p)
    layout.metrics.write_text('{"stage": "iter0/train", "event": "train", "ste\n')
    layout.it(0).eval.write_text("{not json")
    layout.summary.write_text("[]")
    rep = build_report(run, tensorboard=False)
    page = _parse(rep.path)
    assert page.ids == [sid for sid, _ in SECTIONS]
    assert len(rep.problems) == 2, rep.problems
    assert "summary.json" in rep.problems[0] and "eval.json" in rep.problems[1]
    html = rep.path.read_text()
    assert "No pseudo labels yet" in _section(html, "confidence")
    assert "could not be drawn" in _section(html, "confusion")
    _open_images(page, run)


def test_not_a_run_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UserError, match=re.escape(str(tmp_path))):
        build_report(tmp_path)
    missing = tmp_path / "nope"
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    bad_cfg = tmp_path / "bad"
    bad_cfg.mkdir()
    (bad_cfg / "config.yaml").write_text("teacher: {epochz: 3}\n")
    for path in (missing, a_file, bad_cfg):
        assert cli.main(["report", str(path)]) == 2
        err = capsys.readouterr().err
        assert str(path) in err and len(err.strip().splitlines()) == 1, err


def test_report_failure_keeps_the_run(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    config = RunLayout(run).config
    cfg = yaml.safe_load(config.read_text())
    cfg["run_dir"] = str(run)  # a copied run directory, resumed where it is now
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))

    def broken(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr("noisystudent.report.build_report", broken)
    cfg = load_config(None, TINY_DEMO + [f"run_dir={run}"], base=DEMO_CONFIG)
    summary = run_pipeline(cfg)  # all stages done: only the summary and the report run
    assert len(summary["iterations"]) == 2
    err = capsys.readouterr().err
    assert "boom" in err and f"noisystudent report {run}" in err


def test_tensorboard_scalars_use_metrics_names(tiny_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from noisystudent.tb import export_scalars

    out = tmp_path / "tb"
    n = export_scalars(RunLayout(tiny_run).metrics, out)
    assert n and n > 0
    acc = EventAccumulator(str(out))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in (
        "iter0/train/loss",
        "iter0/train/train_acc",
        "iter0/train/lr",
        "iter0/evaluate/top1",
    ):
        assert tag in tags, tags
    assert export_scalars(RunLayout(tiny_run).metrics, out) == n  # rebuilt, not appended
    acc = EventAccumulator(str(out))
    acc.Reload()
    steps = [e.step for e in acc.Scalars("iter0/train/loss")]
    assert len(steps) == len(set(steps))
