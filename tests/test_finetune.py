"""FixRes-style fine-tune: higher resolution, unaugmented labeled images, shallow layers frozen."""

import json

import pytest
import torch

from noisystudent.cli import main
from noisystudent.errors import UserError
from noisystudent.finetune import freeze, shallow_modules
from noisystudent.models import create_model
from noisystudent.rundir import load_tensors

from .conftest import tiny_overrides


def test_freeze_stem_and_first_blocks():
    m = create_model("cifar_resnet14", 3)
    n = freeze(m.net, 2)
    assert n > 0
    assert all(not p.requires_grad for p in m.net.stem.parameters())
    assert all(not p.requires_grad for b in list(m.net.blocks)[:2] for p in b.parameters())
    assert all(p.requires_grad for b in list(m.net.blocks)[2:] for p in b.parameters())
    assert freeze(create_model("cifar_resnet8", 3).net, 0) == 0
    with pytest.raises(UserError, match="has 6 blocks"):
        shallow_modules(m.net, 7)


def test_finetune_stage_in_the_pipeline(tiny_data, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("device: cpu\n")
    run = tmp_path / "run"
    over = tiny_overrides(tiny_data, run, models="[cifar_resnet8]") + [
        "finetune.enabled=true", "finetune.image_size=24", "finetune.freeze_blocks=2",
        "finetune.epochs=2", "finetune.batch_size=4",
    ]  # fmt: skip
    assert main(["run", str(cfg), *over]) == 0
    before = load_tensors(run / "iter0" / "model.safetensors")
    after = load_tensors(run / "iter0" / "finetune" / "model.safetensors")
    frozen = [
        k for k in before if k.startswith(("net.stem.0.", "net.blocks.0.conv", "net.blocks.1.conv"))
    ]
    trained = [k for k in before if k.startswith("net.fc.")]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert all(not torch.equal(before[k], after[k]) for k in trained)
    ev = json.loads((run / "iter0" / "finetune" / "eval.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["iterations"][-1]["finetune_top1"] == ev["top1"]
    assert json.loads((run / "iter0" / "finetune" / "model.json").read_text())["image_size"] == 24
