"""Shared fixtures: tiny image datasets made inside the tests (nothing downloaded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CLASSES = ["blue", "green", "red"]


def make_image(cls: int, rng: np.random.Generator, size: int = 16) -> Image.Image:
    """A learnable synthetic image: the class's colour channel is bright, plus noise."""
    a = rng.integers(0, 90, (size, size, 3)).astype(np.uint8)
    a[..., 2 - cls] = rng.integers(150, 256, (size, size))  # blue=2, green=1, red=0 channel
    return Image.fromarray(a)


def make_class_folders(
    root: Path, per_class: int, seed: int = 0, size: int = 16, classes: list[str] = CLASSES
) -> Path:
    rng = np.random.default_rng(seed)
    for ci, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            make_image(ci, rng, size).save(root / c / f"{k:03d}.png")
    return root


@pytest.fixture
def tiny_data(tmp_path: Path) -> dict[str, Path]:
    """labeled (4/class), unlabeled (20/class, in class folders = hidden labels), test (6/class)."""
    return {
        "labeled": make_class_folders(tmp_path / "labeled", 4, seed=1),
        "unlabeled": make_class_folders(tmp_path / "unlabeled", 20, seed=2),
        "test": make_class_folders(tmp_path / "test", 6, seed=3),
    }


def tiny_overrides(
    data: dict[str, Path], run_dir: Path, models: str = "[cifar_resnet8,cifar_resnet14]"
) -> list[str]:
    return [
        f"run_dir={run_dir}",
        f"data.labeled={data['labeled']}",
        f"data.unlabeled={data['unlabeled']}",
        f"data.test={data['test']}",
        "data.image_size=16",
        f"models={models}",
        "teacher.epochs=3",
        "teacher.batch_size=4",
        "teacher.warmup_epochs=0",
        "student.epochs=2",
        "student.batch_size=4",
        "student.ratio=2",
        "student.warmup_epochs=0",
        "progress=false",
    ]


@pytest.fixture
def one_thread():
    """Tiny tensors: one torch thread (two oversubscribed threads are ~100x slower on a busy CPU)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def one_line_error(capsys, argv: list[str]) -> str:
    """Run the CLI and require what every input error must give: exit status 2 and one line on
    stderr, no traceback. Returns that line."""
    from noisystudent.cli import main

    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    return err


@pytest.fixture
def cfg(tmp_path):
    """A minimal config file for CLI tests (the rest comes as key=value overrides)."""
    p = tmp_path / "cfg.yaml"
    p.write_text("seed: 0\n")
    return str(p)


# A teacher and one student on the built-in digits at 8x8: a few seconds on a laptop CPU (the
# demo run of the report, predict and export tests).
TINY_DEMO = [
    "models=[cifar_resnet8,cifar_resnet8]",
    "data.dataset=digits",
    "data.image_size=8",
    "data.labels_per_class=10",
    "data.hflip=false",
    "teacher.epochs=3",
    "teacher.batch_size=10",
    "teacher.warmup_epochs=0",
    "student.epochs=1",
    "student.batch_size=25",
    "student.ratio=2",
    "student.randaugment=null",
    "select.threshold=0.0",  # a briefly trained teacher is not confident: keep every image
    "device=cpu",
    "progress=false",
]
