"""Channels-first vs channels_last per model family at 32 px (batch 128).

    python bench/memory_format.py [--precision fp32|bf16] [--steps N] [--reps R] [--models ...]

Training and inference images/s on synthetic batches for a built-in CIFAR ResNet, a wide
ResNet and the small-image EfficientNet (timm builder), in fp32 or under bf16 autocast (what
`precision: auto` picks on a CPU with AMX); writes bench/results/memory_format.json (fp32) or
memory_format_bf16.json and prints each figure: the median of R repetitions, the two formats
alternating within each repetition so that a slow patch of this shared VM hits both.
"""

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from noisystudent.models import create_model
from noisystudent.runtime import cpu_model


def speed(name: str, channels_last: bool, bf16: bool, steps: int) -> dict[str, float]:
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
    for mode, fn, n in (("train", train, steps), ("infer", infer, 2 * steps)):
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
    ap.add_argument("--steps", type=int, default=10, help="training steps per measurement")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument(
        "--models", nargs="+", default=["cifar_resnet20", "wrn16_2", "efficientnet_small_b0"]
    )
    args = ap.parse_args()
    bf16 = args.precision == "bf16"
    torch.manual_seed(0)
    runs: dict[str, list[dict[str, float]]] = {}
    for _ in range(args.reps):
        for name in args.models:
            for cl in (False, True):
                key = f"{name} {'channels_last' if cl else 'channels_first'}"
                runs.setdefault(key, []).append(speed(name, cl, bf16, args.steps))
                print(key, runs[key][-1], flush=True)
    res = {
        k: {m: statistics.median(r[m] for r in v) for m in ("train", "infer")}
        for k, v in runs.items()
    }
    res["settings"] = {"steps": args.steps, "reps": args.reps, "cpu": cpu_model()}
    print(json.dumps(res, indent=1))
    name = "memory_format_bf16.json" if bf16 else "memory_format.json"
    out = Path(__file__).resolve().parent / "results" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
