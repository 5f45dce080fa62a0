"""Channels-first vs channels_last per model family at 32 px (batch 128).

    python bench/memory_format.py [--precision fp32|bf16]

Training and inference images/s on synthetic batches for a built-in CIFAR ResNet, a wide
ResNet and the small-image EfficientNet (timm builder), in fp32 or under bf16 autocast (what
`precision: auto` picks on a CPU with AMX); writes bench/results/memory_format.json (fp32) or
memory_format_bf16.json and prints each figure.
"""

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from noisystudent.models import create_model


def speed(name: str, channels_last: bool, bf16: bool) -> dict[str, float]:
    m = create_model(name, 10)
    x, y = torch.rand(128, 3, 32, 32), torch.randint(0, 10, (128,))
    if channels_last:
        m = m.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(m.parameters(), lr=0.01)

    amp = lambda: (  # noqa: E731
        torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    )

    def train() -> None:
        with amp():
            loss = F.cross_entropy(m(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def infer() -> None:
        with torch.no_grad(), amp():
            m(x)

    out = {}
    for mode, fn, n in (("train", train, 6), ("infer", infer, 12)):
        m.train(mode == "train")
        fn()  # warm-up
        t = time.perf_counter()
        for _ in range(n):
            fn()
        out[mode] = round(n * 128 / (time.perf_counter() - t), 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    bf16 = ap.parse_args().precision == "bf16"
    torch.manual_seed(0)
    res = {}
    for name in ("cifar_resnet20", "wrn16_2", "efficientnet_small_b0"):
        for cl in (False, True):
            key = f"{name} {'channels_last' if cl else 'channels_first'}"
            res[key] = speed(name, cl, bf16)
            print(key, res[key], flush=True)
    name = "memory_format_bf16.json" if bf16 else "memory_format.json"
    out = Path(__file__).resolve().parent / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
