"""Precision and compile switches, and the batch fast paths for decoded uint8 caches."""

import numpy as np
import pytest
import torch

from noisystudent import engine
from noisystudent.augment import ViewDataset
from noisystudent.config import load_config
from noisystudent.data import ImageSet
from noisystudent.errors import UserError
from noisystudent.models import create_model


@pytest.fixture(autouse=True)
def _reset_runtime():
    yield
    engine.RUNTIME.precision, engine.RUNTIME.compile = "auto", "auto"


def test_auto_precision_follows_native_bf16_and_says_why():
    cpu = torch.device("cpu")
    line = engine.configure("auto", "off", cpu)
    if engine.native_bf16(cpu):
        assert engine.autocast_dtype(cpu) == torch.bfloat16 and "bf16" in line
    else:  # the AVX2 dev machine: fp32, with the reason in the log line
        assert engine.autocast_dtype(cpu) is None
        assert line.startswith("precision: fp32 (auto: this CPU has no native bf16")


def test_native_bf16_reads_the_cpu_flags(tmp_path):
    cpu = torch.device("cpu")
    # torch says "AVX512" on AMX CPUs, so the kernel's flags decide
    assert engine.native_bf16(cpu, {"avx512f", "amx_tile", "amx_bf16"})
    assert engine.native_bf16(cpu, {"avx512f", "avx512_bf16"})
    assert not engine.native_bf16(cpu, {"avx2", "fma", "avx512f"})
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 amx_bf16 amx_tile\n")
    assert engine.cpu_flags(str(info)) == {"fpu", "avx2", "amx_bf16", "amx_tile"}
    assert engine.cpu_flags(str(tmp_path / "missing")) == set()


def test_cpu_model_names_the_cpu_and_its_bf16_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx512f avx512_bf16\n")
    assert engine.cpu_model(str(info)) == "AMD EPYC (avx512_bf16)"
    info.write_text("processor\t: 0\nmodel name\t: Old CPU\nflags\t\t: fpu avx2\n")
    assert engine.cpu_model(str(info)) == "Old CPU (no native bf16)"
    assert engine.cpu_model(str(tmp_path / "missing")) == "unknown CPU (no native bf16)"


def test_forced_precisions():
    cpu = torch.device("cpu")
    engine.configure("fp32", "off", cpu)
    assert engine.autocast_dtype(cpu) is None
    engine.configure("bf16", "off", cpu)
    assert engine.autocast_dtype(cpu) == torch.bfloat16
    with pytest.raises(UserError, match="precision=fp16 needs a CUDA device"):
        engine.configure("fp16", "off", cpu)


def test_precision_is_a_checked_config_choice():
    assert load_config(None, ["precision=fp32"]).precision == "fp32"
    with pytest.raises(UserError, match="precision"):
        load_config(None, ["precision=fp8"])
    assert load_config(None, ["compile=true"]).compile == "on"
    assert load_config(None, ["compile=false"]).compile == "off"
    assert load_config(None, []).compile == "auto"
    with pytest.raises(UserError, match="compile"):
        load_config(None, ["compile=sometimes"])


def _cached_set(n=37, size=8):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return ImageSet(classes=["a"], uids=[f"u{i}" for i in range(n)],
                    labels=np.zeros(n, dtype=np.int64), array=arr)  # fmt: skip


def test_predict_fast_path_matches_per_image_loader():
    torch.manual_seed(0)
    m = create_model("cifar_resnet8", 10)
    s = _cached_set()
    fast = list(engine.predict(m, ViewDataset(s, 8), 16, torch.device("cpu")))
    slow_ds = ViewDataset(
        s, 8, transform=lambda im: torch.from_numpy(np.asarray(im).transpose(2, 0, 1).copy())
    )
    slow = list(engine.predict(m, slow_ds, 16, torch.device("cpu")))
    assert [len(i) for _, i in fast] == [16, 16, 5]
    assert torch.equal(torch.cat([i for _, i in fast]), torch.arange(37))
    assert torch.allclose(
        torch.cat([x for x, _ in fast]), torch.cat([x for x, _ in slow]), atol=1e-5
    )


@pytest.mark.slow
def test_compiled_predict_matches_eager():
    torch.manual_seed(0)
    m = create_model("cifar_resnet8", 10)
    ds = ViewDataset(_cached_set(), 8)
    engine.configure("fp32", "off", torch.device("cpu"))  # auto may pick bf16 on this CPU
    eager = torch.cat([x for x, _ in engine.predict(m, ds, 16, torch.device("cpu"))])
    engine.configure("fp32", "on", torch.device("cpu"))
    comp = torch.cat([x for x, _ in engine.predict(m, ds, 16, torch.device("cpu"))])
    assert torch.allclose(eager, comp, atol=1e-4)


def test_compile_auto_thresholds():
    cpu = torch.device("cpu")
    engine.configure("auto", "auto", cpu)
    assert not engine.compile_inference(cpu, engine.COMPILE_INFER_MIN_IMAGES - 1)
    assert engine.compile_inference(cpu, engine.COMPILE_INFER_MIN_IMAGES)
    assert not engine.compile_training(cpu, engine.COMPILE_TRAIN_MIN_STEPS - 1)
    assert engine.compile_training(cpu, engine.COMPILE_TRAIN_MIN_STEPS)
    engine.configure("auto", "off", cpu)
    assert not engine.compile_inference(cpu, 10**9) and not engine.compile_training(cpu, 10**9)
    engine.configure("auto", "on", cpu)
    assert engine.compile_inference(cpu, 1) and engine.compile_training(cpu, 1)


@pytest.mark.slow
def test_frozen_bf16_predict_matches_eager_and_follows_weight_changes():
    """The frozen compiled copy (bf16 weights, BN folded) agrees with eager bf16 autocast, pads
    the short last batch, and is rebuilt when the model's weights change."""
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    m = create_model("cifar_resnet8", 10)
    ds = ViewDataset(_cached_set(), 8)

    def logits():
        out = list(engine.predict(m, ds, 16, cpu))
        assert [len(i) for _, i in out] == [16, 16, 5]
        return torch.cat([x for x, _ in out])

    engine.configure("bf16", "off", cpu)
    eager = logits()
    engine.configure("bf16", "on", cpu)
    comp = logits()
    assert (eager.argmax(1) == comp.argmax(1)).float().mean() >= 0.9
    assert torch.allclose(eager, comp, atol=0.1 * eager.abs().max().item())
    with torch.no_grad():
        m.net.fc.weight.mul_(-1.0)  # in place: the cached frozen copy is stale now
    flipped = logits()
    engine.configure("bf16", "off", cpu)
    assert torch.allclose(flipped, logits(), atol=0.1 * eager.abs().max().item())
    assert not torch.allclose(flipped, comp, atol=0.1 * eager.abs().max().item())


def test_train_memory_format_per_family(monkeypatch):
    from noisystudent.models import create_model

    cpu = torch.device("cpu")
    eff, res = create_model("efficientnet_small_b0", 10), create_model("cifar_resnet8", 10)
    assert engine.has_depthwise_conv(eff) and not engine.has_depthwise_conv(res)
    monkeypatch.setattr(engine, "autocast_dtype", lambda d: torch.bfloat16)
    assert engine.train_memory_format(eff, cpu) == torch.contiguous_format  # measured faster
    assert engine.train_memory_format(res, cpu) == torch.channels_last
    monkeypatch.setattr(engine, "autocast_dtype", lambda d: None)
    assert engine.train_memory_format(eff, cpu) == torch.channels_last
