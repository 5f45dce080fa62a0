"""Precision and compile switches (runtime.Runtime), and the batch fast paths for decoded uint8
caches."""

import copy

import numpy as np
import pytest
import torch

from noisystudent import engine
from noisystudent.augment import ViewDataset
from noisystudent.config import load_config
from noisystudent.data import ImageSet
from noisystudent.errors import UserError
from noisystudent.models import create_model
from noisystudent.runtime import (
    COMPILE_INFER_MIN_IMAGES,
    COMPILE_TRAIN_MIN_STEPS,
    Runtime,
    autocast_dtype,
    cpu_flags,
    cpu_model,
    from_config,
    native_bf16,
)

CPU = torch.device("cpu")


def rt(precision="auto", compile="off"):
    return Runtime(CPU, precision, compile)


def test_auto_precision_follows_native_bf16_and_says_why():
    r = rt("auto", "off")
    line = r.describe()
    if native_bf16(CPU):
        assert r.amp == autocast_dtype(CPU, "auto") == torch.bfloat16
        assert line.startswith("precision: bf16 (auto: this CPU has native bf16")
    else:  # the AVX2 dev machine: fp32, with the reason in the log line
        assert r.amp is None and autocast_dtype(CPU, "auto") is None
        assert line.startswith("precision: fp32 (auto: this CPU has no native bf16")
    assert line.endswith("compile off")


def test_describe_says_forced_and_the_compile_mode():
    assert rt("fp32", "on").describe().startswith("precision: fp32 (forced);")
    assert rt("fp32", "on").describe().endswith("compile on")
    assert rt("fp32", "auto").describe().endswith("compile auto (long runs and large sets only)")
    line = rt("bf16").describe()
    if native_bf16(CPU):
        assert line.startswith("precision: bf16 (forced);")
    else:
        assert line.startswith("precision: bf16 (forced; this device has no native bf16")


def test_native_bf16_reads_the_cpu_flags(tmp_path):
    # torch says "AVX512" on AMX CPUs, so the kernel's flags decide
    assert native_bf16(CPU, {"avx512f", "amx_tile", "amx_bf16"})
    assert native_bf16(CPU, {"avx512f", "avx512_bf16"})
    assert not native_bf16(CPU, {"avx2", "fma", "avx512f"})
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 amx_bf16 amx_tile\n")
    assert cpu_flags(str(info)) == {"fpu", "avx2", "amx_bf16", "amx_tile"}
    assert cpu_flags(str(tmp_path / "missing")) == set()


def test_cpu_model_names_the_cpu_and_its_bf16_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx512f avx512_bf16\n")
    assert cpu_model(str(info)) == "AMD EPYC (avx512_bf16)"
    info.write_text("processor\t: 0\nmodel name\t: Old CPU\nflags\t\t: fpu avx2\n")
    assert cpu_model(str(info)) == "Old CPU (no native bf16)"
    assert cpu_model(str(tmp_path / "missing")) == "unknown CPU (no native bf16)"


def test_forced_precisions():
    assert rt("fp32").amp is None and autocast_dtype(CPU, "fp32") is None
    assert rt("bf16").amp == autocast_dtype(CPU, "bf16") == torch.bfloat16
    assert autocast_dtype(torch.device("cuda"), "fp16") == torch.float16  # no GPU needed to say
    with pytest.raises(UserError, match="precision=fp16 needs a CUDA device"):
        rt("fp16")
    with pytest.raises(UserError, match="precision 'fp8' is not one of"):
        rt("fp8")
    with pytest.raises(UserError, match="compile 'sometimes' is not one of"):
        rt("fp32", "sometimes")


def test_precision_is_a_checked_config_choice():
    assert load_config(None, ["precision=fp32"]).precision == "fp32"
    with pytest.raises(UserError, match="precision"):
        load_config(None, ["precision=fp8"])
    assert load_config(None, ["compile=true"]).compile == "on"
    assert load_config(None, ["compile=false"]).compile == "off"
    assert load_config(None, []).compile == "auto"
    with pytest.raises(UserError, match="compile"):
        load_config(None, ["compile=sometimes"])


def test_runtime_from_config_takes_its_keys(capsys):
    cfg = load_config(None, ["device=cpu", "precision=fp32", "compile=false", "progress=false"])
    r = from_config(cfg)
    assert r == Runtime(CPU, "fp32", "off", False, 0, 1) and r.is_main
    assert capsys.readouterr().out.strip() == r.describe()  # rank 0 prints its one line
    from_config(cfg, announce=False)
    assert capsys.readouterr().out == ""


def _cached_set(n=37, size=8):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return ImageSet(classes=["a"], uids=[f"u{i}" for i in range(n)],
                    labels=np.zeros(n, dtype=np.int64), array=arr)  # fmt: skip


def test_predict_fast_path_matches_per_image_loader():
    torch.manual_seed(0)
    m = create_model("cifar_resnet8", 10)
    s = _cached_set()
    fast = list(engine.predict(m, ViewDataset(s, 8), 16, rt("fp32")))
    slow_ds = ViewDataset(
        s, 8, transform=lambda im: torch.from_numpy(np.asarray(im).transpose(2, 0, 1).copy())
    )
    slow = list(engine.predict(m, slow_ds, 16, rt("fp32")))
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
    eager = torch.cat([x for x, _ in engine.predict(m, ds, 16, rt("fp32", "off"))])
    comp = torch.cat([x for x, _ in engine.predict(m, ds, 16, rt("fp32", "on"))])
    assert torch.allclose(eager, comp, atol=1e-4)


def test_compile_auto_thresholds():
    r = rt("auto", "auto")
    assert not r.compile_inference(COMPILE_INFER_MIN_IMAGES - 1)
    assert r.compile_inference(COMPILE_INFER_MIN_IMAGES)
    assert not r.compile_training(COMPILE_TRAIN_MIN_STEPS - 1)
    assert r.compile_training(COMPILE_TRAIN_MIN_STEPS)
    off, on = rt("auto", "off"), rt("auto", "on")
    assert not off.compile_inference(10**9) and not off.compile_training(10**9)
    assert on.compile_inference(1) and on.compile_training(1)
    # auto never compiles on CUDA (the thresholds are CPU measurements; no GPU needed to ask)
    gpu = Runtime(torch.device("cuda"), "fp32", "auto")
    assert not gpu.compile_inference(10**9) and not gpu.compile_training(10**9)


@pytest.mark.slow
def test_frozen_bf16_predict_matches_eager_and_follows_weight_changes():
    """The frozen compiled copy (bf16 weights, BN folded) agrees with eager bf16 autocast, pads
    the short last batch, and is rebuilt when the model's weights change."""
    torch.manual_seed(0)
    m = create_model("cifar_resnet8", 10)
    ds = ViewDataset(_cached_set(), 8)

    def logits(r, model=m):
        out = list(engine.predict(model, ds, 16, r))
        assert [len(i) for _, i in out] == [16, 16, 5]
        return torch.cat([x for x, _ in out])

    eager = logits(rt("bf16", "off"))
    comp = logits(rt("bf16", "on"))
    assert (eager.argmax(1) == comp.argmax(1)).float().mean() >= 0.9
    assert torch.allclose(eager, comp, atol=0.1 * eager.abs().max().item())
    with torch.no_grad():
        m.net.fc.weight.mul_(-1.0)  # in place: the cached frozen copy is stale now
    flipped = logits(rt("bf16", "on"))
    # eager on a copy: the compiled copy made for `m`'s new weights would be reused for `m`
    eager_flipped = logits(rt("bf16", "off"), copy.deepcopy(m))
    assert torch.allclose(flipped, eager_flipped, atol=0.1 * eager.abs().max().item())
    assert torch.allclose(
        eager_flipped, -eager + 2 * m.net.fc.bias.detach(), atol=0.1 * eager.abs().max().item()
    )
    assert not torch.allclose(flipped, comp, atol=0.1 * eager.abs().max().item())


def test_train_memory_format_per_family():
    eff, res = create_model("efficientnet_small_b0", 10), create_model("cifar_resnet8", 10)
    assert engine.has_depthwise_conv(eff) and not engine.has_depthwise_conv(res)
    bf16, fp32 = rt("bf16"), rt("fp32")
    assert engine.train_memory_format(eff, bf16) == torch.contiguous_format  # measured faster
    assert engine.train_memory_format(res, bf16) == torch.channels_last
    assert engine.train_memory_format(eff, fp32) == torch.channels_last
