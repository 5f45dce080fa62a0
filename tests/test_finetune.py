"""FixRes-style fine-tune: higher resolution, unaugmented labeled images, shallow layers frozen."""

import pytest
import torch

from noisystudent.artifacts import read_eval, read_model_meta, read_summary
from noisystudent.cli import main
from noisystudent.errors import UserError
from noisystudent.models import create_model, freeze, shallow_modules
from noisystudent.rundir import RunDir, load_tensors, read_json

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
    rd = RunDir(run)
    it0 = rd.it(0)
    before = load_tensors(it0.model)
    after = load_tensors(it0.finetune.model)
    shallow = [k for k in before if k.startswith(("net.stem.", "net.blocks.0.", "net.blocks.1."))]
    stats = ("running_mean", "running_var", "num_batches_tracked")
    frozen = [k for k in shallow if not k.endswith(stats)]  # conv and BN weights and biases
    adapted = [k for k in shallow if k.endswith(("running_mean", "running_var"))]
    trained = [k for k in before if k.startswith("net.fc.")]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert trained and all(not torch.equal(before[k], after[k]) for k in trained)
    # frozen layers keep their weights, but their BN statistics follow the new resolution
    assert adapted and all(not torch.equal(before[k], after[k]) for k in adapted)
    ev = read_eval(it0.finetune)
    assert ev["n"] == 18 and len(ev["predictions"]) == 18  # the whole test set, at 24 px
    summary = read_summary(rd)
    assert summary["iterations"][-1]["finetune_top1"] == ev["top1"]
    ft_meta = read_json(it0.finetune.model_meta)
    assert ft_meta["image_size"] == 24 and read_model_meta(rd, 0)["image_size"] == 16
    assert ft_meta["finetuned_from"] == str(it0.model) and ft_meta["frozen_params"] > 0
    assert rd.stage_done(it0.stage("finetune"))
