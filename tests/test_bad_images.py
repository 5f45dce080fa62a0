"""Bad images: unreadable unlabeled images skipped, listed and limited; bad labeled/test
images; decompression bombs; large (file-backed) images; a pickled decode cache."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

from noisystudent import stages
from noisystudent.data import scan_class_folders
from noisystudent.errors import UserError
from noisystudent.inputs import load_data
from noisystudent.rundir import RunDir, open_run
from noisystudent.store import PseudoLabelStore

from .conftest import make_class_folders
from .helpers import CPU, Malicious, tiny_cfg, truncated_png


def test_bad_unlabeled_images_are_skipped_listed_and_limited(tiny_data, tmp_path):
    truncated_png(tiny_data["unlabeled"] / "red" / "trunc.png")
    (tiny_data["unlabeled"] / "junk.jpg").write_bytes(b"not an image at all")
    (tiny_data["unlabeled"] / "empty.png").write_bytes(b"")
    jpg = tiny_data["unlabeled"] / "green" / "cut.jpg"  # a JPEG that stops mid-scan
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(jpg)
    jpg.write_bytes(jpg.read_bytes()[:-300])
    run = RunDir(tmp_path / "run")
    data = load_data(tiny_cfg(tiny_data, run.root, "data.max_bad_fraction=0.1"), run)
    assert len(data.unlabeled) == 60
    listed = run.paths.skipped("unlabeled").read_text().split()
    assert sorted(listed) == ["empty.png", "green/cut.jpg", "junk.jpg", "red/trunc.png"]
    run2 = RunDir(tmp_path / "run2")
    with pytest.raises(UserError, match=r"4 of 64 unlabeled images are unreadable .*"
                                        r"data.max_bad_fraction=0.01"):  # fmt: skip
        load_data(tiny_cfg(tiny_data, run2.root), run2)
    with pytest.raises(
        UserError, match="cannot read image '.*(empty|junk|trunc|cut).*on_bad_image=skip"
    ):
        load_data(tiny_cfg(tiny_data, run2.root, "data.on_bad_image=error"), run2)


def _big_png(path, w: int, h: int):
    """A real 1-bit PNG whose header says w x h: a few KB on disk, w*h pixels when decoded."""
    Image.new("1", (w, h)).save(path)
    return path


def test_image_over_max_image_pixels_is_refused_from_its_header(tmp_path, monkeypatch):
    """Between 1x and 2x Pillow's decompression-bomb limit Pillow only warns; here the default
    limit (Pillow's) refuses such an image before a pixel is decoded, with no warning."""
    from PIL import PngImagePlugin

    from noisystudent.data import PIL_MAX_PIXELS, BadImage, load_rgb

    assert PIL_MAX_PIXELS == Image.MAX_IMAGE_PIXELS == 89_478_485  # Pillow's default
    p = _big_png(tmp_path / "big.png", 10_000, 10_000)  # 1.12x Pillow's limit, 12 KB
    assert p.stat().st_size < 50_000

    def no_decoding(self):
        raise AssertionError("decoded")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", no_decoding)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's DecompressionBombWarning would fail here
        with pytest.raises(BadImage) as e:
            load_rgb(p)
    assert str(e.value) == (
        f"cannot read image '{p}': 10000x10000 = 100,000,000 pixels, over "
        "data.max_image_pixels=89478485 (raise it, or set it to null, to read such images)"
    )


def test_max_image_pixels_sets_the_limit_both_ways(tmp_path, monkeypatch):
    from noisystudent.data import BadImage, load_rgb

    p = _big_png(tmp_path / "big.png", 40, 40)  # 1,600 px
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow refuses it (> 2x) by itself
    with pytest.raises(
        BadImage, match=r"big.png': more than 200 pixels, over data.max_image_pixels=150"
    ):
        load_rgb(p, max_pixels=150)  # Pillow's refusal, reported as over this limit
    with pytest.raises(BadImage, match=r"40x40 = 1,600 pixels, over data.max_image_pixels=1599 "):
        load_rgb(p, max_pixels=1599)
    assert load_rgb(p, max_pixels=1600).size == (40, 40)  # a higher limit lifts Pillow's
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    assert load_rgb(p, max_pixels=None).size == (40, 40)  # null: no limit


def _sets_with_big_images(tmp_path, size: int, big: int):
    data = {k: make_class_folders(tmp_path / k, n, seed=s, size=size)
            for k, n, s in [("labeled", 2, 1), ("unlabeled", 4, 2), ("test", 1, 3)]}  # fmt: skip
    _big_png(data["unlabeled"] / "green" / "huge.png", big, big)
    return data


def test_max_image_pixels_under_the_bad_image_policy(tmp_path):
    """Small (cached) images: an unlabeled image over data.max_image_pixels is skipped and
    listed; a labeled or test one is an error naming the file, the key and the skip option."""
    data = _sets_with_big_images(tmp_path, 16, 1000)  # 1,000,000 px; the others 256 px
    lim = ["data.max_image_pixels=100000", "data.max_bad_fraction=0.1"]
    run = RunDir(tmp_path / "run")
    d = load_data(tiny_cfg(data, run.root, *lim), run)
    assert (
        len(d.unlabeled) == 12 and run.paths.skipped("unlabeled").read_text() == "green/huge.png\n"
    )
    run_big = RunDir(tmp_path / "run_big")  # a higher limit: the same files, all read
    d = load_data(tiny_cfg(data, run_big.root, "data.max_image_pixels=1000000"), run_big)
    assert len(d.unlabeled) == 13 and not run_big.paths.skipped("unlabeled").exists()
    for which in ("labeled", "test"):
        _big_png(data[which] / "red" / "zz_huge.png", 1000, 1000)
        run2 = RunDir(tmp_path / f"run-{which}")
        with pytest.raises(UserError) as e:
            load_data(tiny_cfg(data, run2.root, *lim), run2)
        msg = str(e.value)
        assert "\n" not in msg and "red/zz_huge.png" in msg and "1000x1000" in msg
        assert "data.max_image_pixels=100000" in msg and "data.on_bad_labeled=skip" in msg
        (data[which] / "red" / "zz_huge.png").unlink()


def test_max_image_pixels_is_applied_in_dataloader_workers(tmp_path):
    """Large (file-backed) images are read in DataLoader workers: the limit travels with the
    set (not a process global), so a worker refuses the image and the main process skips it."""
    import pickle

    from noisystudent import engine
    from noisystudent.augment import ViewDataset
    from noisystudent.models import create_model

    size = 72  # > 64 px: read per access
    data = _sets_with_big_images(tmp_path, size, 1000)
    over = [f"data.image_size={size}", "data.max_image_pixels=100000", "data.max_bad_fraction=0.1"]
    run = RunDir(tmp_path / "run")
    d = load_data(tiny_cfg(data, run.root, *over), run)
    assert not d.small and len(d.unlabeled) == 13  # not found yet
    assert pickle.loads(pickle.dumps(d.unlabeled.subset(np.arange(3)))).max_pixels == 100_000
    model = create_model("cifar_resnet8", 3).eval()
    ds = ViewDataset(d.unlabeled, size)
    seen = [int(i) for _, idx in engine.predict(model, ds, 8, CPU, workers=1) for i in idx]
    huge = list(d.unlabeled.uids).index("green/huge.png")
    assert len(seen) == 12 and huge not in seen
    assert run.paths.skipped("unlabeled").read_text() == "green/huge.png\n"
    # at Pillow's default limit the same file is read: the limit above came from the config
    d = load_data(
        tiny_cfg(data, tmp_path / "run2", f"data.image_size={size}"), RunDir(tmp_path / "run2")
    )
    ds = ViewDataset(d.unlabeled, size)
    assert sum(len(idx) for _, idx in engine.predict(model, ds, 8, CPU, workers=1)) == 13


def test_max_image_pixels_must_be_positive(tiny_data, tmp_path):
    run = RunDir(tmp_path / "run")
    with pytest.raises(UserError, match=r"'data.max_image_pixels' must be >= 1, or null"):
        load_data(tiny_cfg(tiny_data, run.root, "data.max_image_pixels=0"), run)


@pytest.mark.parametrize("which", ["labeled", "test"])
def test_bad_labeled_or_test_image_is_an_error_naming_it_unless_skipped(tiny_data, tmp_path, which):
    truncated_png(tiny_data[which] / "green" / "bad.png")
    run = RunDir(tmp_path / "run")
    with pytest.raises(UserError) as e:
        load_data(tiny_cfg(tiny_data, run.root), run)
    msg = str(e.value)
    assert "\n" not in msg and "green/bad.png" in msg and "data.on_bad_labeled=skip" in msg
    cfg = tiny_cfg(tiny_data, run.root, "data.on_bad_labeled=skip", "data.max_bad_fraction=0.1")
    data = load_data(cfg, run)
    assert "green/bad.png" not in getattr(data, which).uids
    assert run.paths.skipped(which).read_text() == "green/bad.png\n"


def test_bad_large_images_found_while_reading(tmp_path):
    size = 72  # > 64 px: file-backed, nothing decoded up front
    data = {k: make_class_folders(tmp_path / k, n, seed=s, size=size)
            for k, n, s in [("labeled", 2, 1), ("unlabeled", 4, 2), ("test", 1, 3)]}  # fmt: skip
    truncated_png(data["unlabeled"] / "red" / "trunc.png", size)
    (data["unlabeled"] / "blue" / "junk.png").write_bytes(b"\x89PNG garbage")
    over = [f"data.image_size={size}", "models=[cifar_resnet8]", "teacher.epochs=1",
            "teacher.batch_size=6", "data.max_bad_fraction=0.2", "data.num_workers=1"]  # fmt: skip
    cfg = tiny_cfg(data, tmp_path / "run", *over)
    run = open_run(cfg)
    try:
        d = load_data(cfg, run)
        assert not d.small and len(d.unlabeled) == 14  # not found yet
        stages.train_stage(cfg, run, d, 0, CPU)
        stages.pseudo_label_stage(cfg, run, d, 0, CPU)
        store = PseudoLabelStore.load(run.it(0).pseudo)
        assert len(store.uids) == 12 and "red/trunc.png" not in store.uids
        # each row names its image by position in the unlabeled set; the bad two left gaps
        assert [d.unlabeled.uids[j] for j in store.index.tolist()] == store.uids
        assert run.stage_done(run.it(0).stage("pseudo-label"))
        listed = sorted(run.paths.skipped("unlabeled").read_text().split())
        assert listed == ["blue/junk.png", "red/trunc.png"]

        # a bad labeled image is met in training: an error naming it, or skipped
        truncated_png(data["labeled"] / "red" / "zz_bad.png", size)
        cfg2 = tiny_cfg(data, tmp_path / "run2", *over)
        run2 = open_run(cfg2)
        d2 = load_data(cfg2, run2)
        with pytest.raises(UserError, match=r"zz_bad.png.*data.on_bad_labeled=skip"):
            stages.train_stage(cfg2, run2, d2, 0, CPU)
        cfg3 = tiny_cfg(data, tmp_path / "run3", *over, "data.on_bad_labeled=skip")
        run3 = open_run(cfg3)
        d3 = load_data(cfg3, run3)
        stages.train_stage(cfg3, run3, d3, 0, CPU)
        assert run3.paths.skipped("labeled").read_text() == "red/zz_bad.png\n"
    finally:
        for r in [run] + [v for k, v in locals().items() if k in ("run2", "run3")]:
            r.unlock()


def test_pickled_decode_cache_is_never_unpickled(tmp_path):
    from noisystudent.data import decode_to_array, fingerprint

    make_class_folders(tmp_path / "l", 2)
    s = scan_class_folders(tmp_path / "l")
    marker = tmp_path / "pwned"
    cache = tmp_path / "cache"
    cache.mkdir()
    obj = np.empty(1, dtype=object)
    obj[0] = Malicious(marker)
    np.savez(cache / f"labeled-{fingerprint(s, 16)}.npz", images=obj, keep=obj)
    out = decode_to_array(s, 16, cache, "labeled", skip_bad=False)
    assert out.array.shape == (6, 16, 16, 3) and not marker.exists()


def test_labeled_image_over_the_pixel_limit_is_one_line_from_the_cli(capsys, tiny_data, tmp_path):
    from noisystudent.cli import main

    from .conftest import tiny_overrides

    _big_png(tiny_data["labeled"] / "red" / "zz_huge.png", 1000, 1000)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("seed: 0\n")
    over = [*tiny_overrides(tiny_data, tmp_path / "run"), "data.max_image_pixels=100000"]
    assert main(["train-teacher", str(cfg), *over]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert "red/zz_huge.png" in err and "1000x1000 = 1,000,000 pixels" in err
    assert "data.max_image_pixels=100000" in err and "data.on_bad_labeled=skip" in err
