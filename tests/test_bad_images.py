"""Bad images: unreadable unlabeled images skipped, listed and limited; bad labeled/test
images; decompression bombs; large (file-backed) images; a pickled decode cache."""

from __future__ import annotations

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


def test_decompression_bomb_is_a_bad_image_not_a_crash(tmp_path, monkeypatch):
    from PIL import Image as PILImage

    from noisystudent.data import BadImage, load_rgb

    p = tmp_path / "big.png"
    PILImage.new("RGB", (40, 40)).save(p)
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 100)  # 1,600 px > 2x the limit
    with pytest.raises(BadImage, match=r"big.png': DecompressionBombError"):
        load_rgb(p)


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
