"""Helpers shared by the run-directory, checkpoint, bad-image and model-file tests.

Tiny configs and a tiny student training (cifar_resnet8, random 16 px images, a few steps).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from noisystudent import engine
from noisystudent.augment import ViewDataset, train_transform
from noisystudent.checkpoint import Checkpoint
from noisystudent.config import TrainConfig, load_config
from noisystudent.models import create_model
from noisystudent.rundir import RunDir
from noisystudent.runtime import Runtime

from .conftest import tiny_overrides

CPU = Runtime(torch.device("cpu"), "auto", "auto", False)  # what `start` makes without torchrun


def tiny_cfg(data, run_dir, *extra):
    return load_config(None, [*tiny_overrides(data, run_dir), "device=cpu", *extra])


def truncated_png(path: Path, size: int = 16) -> Path:
    """A real PNG cut in half: the header reads, decoding fails."""
    full = path.with_suffix(".full.png")
    Image.fromarray(np.full((size, size, 3), 200, np.uint8)).save(full)
    data = full.read_bytes()
    full.unlink()
    path.write_bytes(data[: len(data) // 2])
    return path


class Malicious:
    """Unpickling this would run `open(marker, 'w')` (what a hostile checkpoint does)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def student_setup(n_lab=12, n_unl=32, size=16, seed=0):
    rng = np.random.default_rng(seed)
    from noisystudent.data import ImageSet

    arr = rng.integers(0, 255, (n_lab + n_unl, size, size, 3), dtype=np.uint8)
    labels = np.arange(n_lab + n_unl) % 3
    full = ImageSet(["a", "b", "c"], [f"u{i}" for i in range(len(arr))], labels, array=arr)
    lab, unl = full.subset(np.arange(n_lab)), full.subset(np.arange(n_lab, n_lab + n_unl))
    tf = train_transform(size, True, True, "rand-m9-n2")
    targets = torch.softmax(torch.from_numpy(rng.normal(size=(n_unl, 3))).float(), 1)
    return (
        ViewDataset(lab, size, tf),
        torch.from_numpy(lab.labels),
        ViewDataset(unl, size, tf),
        targets,
    )


def train_small(tmp, tc, workers=0, rt=CPU, ckpt=None):
    """Train a tiny student with its checkpoint in tmp/train (resuming from it if there is
    one); events go to tmp/metrics.jsonl as a stage's would."""
    torch.manual_seed(0)
    model = create_model("cifar_resnet8", 3, 0.3, 0.2)
    lab, y, unl, t = student_setup()
    run = RunDir(tmp)
    ckpt = ckpt or Checkpoint(tmp / "train" / "checkpoint.pt", every=tc.checkpoint_every_steps)
    data = engine.TrainData(lab, y, unl, t, workers=workers)
    engine.train(model, data, tc, ckpt, run.logger("s"), rt, 0, "s")
    return model, run


def small_tc(**kw):
    base = dict(epochs=2, batch_size=4, ratio=2, warmup_epochs=0, checkpoint_every_steps=2)
    return TrainConfig(**{**base, **kw})
