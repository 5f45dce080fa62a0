"""Channels-first vs channels_last, fp32, per model family at 32 px (batch 128).

    python bench/memory_format.py

Training and inference images/s on synthetic batches for a built-in CIFAR ResNet, a wide
ResNet and the small-image EfficientNet (timm builder); writes
bench/results/memory_format.json and prints each figure.
"""

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from noisystudent.models import create_model


def speed(name: str, channels_last: bool) -> dict[str, float]:
    m = create_model(name, 10)
    x, y = torch.rand(128, 3, 32, 32), torch.randint(0, 10, (128,))
    if channels_last:
        m = m.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(m.parameters(), lr=0.01)

    def train() -> None:
        loss = F.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def infer() -> None:
        with torch.no_grad():
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
    torch.manual_seed(0)
    res = {}
    for name in ("cifar_resnet20", "wrn16_2", "efficientnet_small_b0"):
        for cl in (False, True):
            key = f"{name} {'channels_last' if cl else 'channels_first'}"
            res[key] = speed(name, cl)
            print(key, res[key], flush=True)
    out = Path(__file__).resolve().parent / "results" / "memory_format.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
