"""Evaluate one model on the whole robustness suite: clean, corruptions, perturbations,
adversarial, filtered-hard subset, calibration. Returns the results dict (docs/robustness.md). Reference-normalised scores need the reference's results dict,
computed on the same cached arrays (same fingerprint, table and seed), else an error.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ..engine import predict_array
from ..errors import UserError
from ..progress import bar
from ..runtime import Runtime
from . import corruptions as C
from . import metrics as M
from . import perturbations as P
from .adversarial import adversarial_accuracy
from .cache import SuiteCache


@dataclass
class SuiteOptions:
    """What to run; mirrors config.RobustnessConfig (defaults: the paper's protocol)."""

    corruptions: bool = True
    perturbations: bool = True
    adversarial: bool = True
    fgsm_eps: list[float] = field(default_factory=lambda: [0, 2, 4, 8, 16])  # paper fig.: eps_px
    pgd_eps: float = 16.0  # paper: PGD with 10 iterations at eps = 16
    pgd_steps: int = 10
    perturbation_subset: int | None = None  # sequences (first K of the subset); None: all
    batch_size: int = 256
    seed: int = 0
    progress: bool = False


def predict_logits(model: nn.Module, images: np.ndarray, batch_size: int, rt: Runtime,
                   desc: str = "predict", progress: bool = False) -> torch.Tensor:  # fmt: skip
    """Eval-mode logits (float32, CPU) of uint8 images (N, H, W, 3) (any leading shape), with
    the precision and compile policy of the test-set evaluation (engine.predict_array)."""
    lead = images.shape[:-3]
    flat = images.reshape((-1,) + images.shape[-3:])
    logits = predict_array(model, flat, batch_size, rt, desc, progress)
    return logits.reshape(lead + logits.shape[-1:])


def _guarded(res: dict[str, Any], fn, *args):
    """A normalised score, or None plus a warning when the reference makes it undefined (a zero
    denominator on a tiny subset must not fail a whole pipeline after training)."""
    try:
        return fn(*args)
    except UserError as e:
        res.setdefault("warnings", []).append(str(e))
        print(f"noisystudent: warning: {e}")
        return None


def check_reference(ref: dict[str, Any], cache: SuiteCache, where: str) -> None:
    """Refuse a reference computed on other arrays: fingerprint, table and seed must match."""
    meta = ref.get("meta", {})
    for key in ("fingerprint", "table", "seed"):
        if meta.get(key) != cache.meta[key]:
            raise UserError(
                f"reference results '{where}' were computed on different data ({key} "
                f"{meta.get(key)!r} vs {cache.meta[key]!r}); re-run the reference with the same "
                "test set, --subset and seed, or pass --reference none"
            )


def evaluate_suite(
    model: nn.Module,
    cache: SuiteCache,
    opts: SuiteOptions,
    rt: Runtime,
    reference: dict[str, Any] | None = None,
    reference_pred: np.ndarray | None = None,
    reference_where: str = "reference",
) -> tuple[dict[str, Any], np.ndarray]:
    """Run the suite on `model`. Returns (results dict, clean top-1 predictions (N,)).

    reference: the reference model's results dict (for mCE, relative mCE, mFR);
    reference_pred: its clean predictions on the same images (for filtered-hard accuracy).
    Without them the normalised scores and filtered-hard accuracy are None (the reference's own
    row is filled in by the caller, see stage._fill_self_reference)."""
    if reference is not None:
        check_reference(reference, cache, reference_where)
    labels_np = cache.labels
    labels = torch.from_numpy(labels_np)
    n = len(labels)
    bs = opts.batch_size
    wall: dict[str, float] = {}
    res: dict[str, Any] = {"n_images": n, "meta": cache.meta}

    t0 = time.time()
    logits = predict_logits(model, cache.images, bs, rt, "clean", progress=True)
    num_classes = logits.shape[1]
    pred = logits.argmax(1)
    clean_top1 = 100.0 * float((pred == labels).double().mean())
    k5 = min(5, num_classes)
    res["clean_top1"] = clean_top1
    res["clean_top5"] = 100.0 * float(
        (logits.topk(k5, 1).indices == labels[:, None]).any(1).double().mean()
    )
    res.update(M.calibration_errors(torch.softmax(logits, 1), labels))
    wall["clean"] = time.time() - t0

    # corruptions ----------------------------------------------------------------------------
    res["corruption"] = None
    for key in ("unnormalized_ce", "mean_corrupted_top1", "mce", "relative_mce", "ce"):
        res[key] = None
    if opts.corruptions:
        t0 = time.time()
        errors: dict[str, dict[str, float]] = {}
        for name in bar(C.ALL, "corruptions", None, opts.progress):
            arr = cache.corruption(name)
            lg = predict_logits(model, arr, bs, rt)
            wrong = (lg.argmax(1).reshape(5, n) != labels[None]).double().mean(1) * 100.0
            errors[name] = {str(s + 1): float(wrong[s]) for s in range(5)}
        res["corruption"] = errors
        res["unnormalized_ce"] = M.unnormalized_ce(errors)
        res["mean_corrupted_top1"] = 100.0 - res["unnormalized_ce"]
        res["held_out_unnormalized_ce"] = M.unnormalized_ce(errors, C.HELD_OUT)
        if reference is not None and reference.get("corruption"):
            ref_err = reference["corruption"]
            ref_clean = 100.0 - reference["clean_top1"]
            res["ce"] = _guarded(res, M.corruption_errors, errors, ref_err)
            res["mce"] = None if res["ce"] is None else float(np.mean(list(res["ce"].values())))
            res["relative_mce"] = _guarded(
                res, M.relative_mce, errors, 100.0 - clean_top1, ref_err, ref_clean
            )
        wall["corruptions"] = time.time() - t0

    # perturbations --------------------------------------------------------------------------
    for key in ("flip", "mean_flip_prob", "mfr", "top5_distance", "top5_distance_per"):
        res[key] = None
    if opts.perturbations:
        t0 = time.time()
        flips, t5d = {}, {}
        m = n if opts.perturbation_subset is None else min(n, opts.perturbation_subset)
        for name in bar(P.TEST, "perturbations", None, opts.progress):
            seq = cache.perturbation(name, m)
            lg = predict_logits(model, seq, bs, rt)  # (m, T, C)
            noise = name in P.NOISE
            flips[name] = M.flip_probability(lg.argmax(-1).numpy(), noise)
            if num_classes >= 5:
                t5d[name] = M.top5_distance(lg, noise)
        res["flip"] = flips
        res["mean_flip_prob"] = float(np.mean(list(flips.values())))
        res["perturbation_sequences"] = m
        if t5d:
            res["top5_distance_per"] = t5d
            res["top5_distance"] = float(np.mean(list(t5d.values())))
        if reference is not None and reference.get("flip"):
            fr = _guarded(res, M.flip_rates, flips, reference["flip"])
            res["flip_rate"] = fr
            res["mfr"] = None if fr is None else float(np.mean(list(fr.values())))
        wall["perturbations"] = time.time() - t0

    # adversarial ----------------------------------------------------------------------------
    res["adversarial"] = None
    if opts.adversarial:
        t0 = time.time()
        x = torch.from_numpy(np.ascontiguousarray(cache.images))
        res["adversarial"] = adversarial_accuracy(
            model,
            x,
            labels,
            list(opts.fgsm_eps),
            opts.pgd_eps,
            opts.pgd_steps,
            min(bs, 128),
            rt.device,  # attacks stay fp32: gradients of a bf16 model are too coarse
            seed=opts.seed,
            progress=opts.progress,
        )
        res["adversarial"]["pixel_space"] = "[0,1], eps = eps_px / 255, normalisation in the model"
        wall["adversarial"] = time.time() - t0

    # filtered-hard (ImageNet-A analogue) ----------------------------------------------------
    res["filtered_hard_acc"], res["filtered_hard_n"] = None, None
    if reference_pred is not None:
        if len(reference_pred) != n:
            raise UserError(
                f"reference predictions '{reference_where}' cover {len(reference_pred)} images, "
                f"this set has {n}"
            )
        acc, k = M.filtered_hard_accuracy(pred.numpy(), labels_np, reference_pred)
        res["filtered_hard_acc"], res["filtered_hard_n"] = acc, k
    res["wall_s"] = {k: round(v, 2) for k, v in wall.items()}
    return res, pred.numpy()


def evaluate_hard_set(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    class_idx: list[int],
    rt: Runtime,
    batch_size: int = 256,
) -> dict[str, Any]:
    """A user-supplied folder of hard images (ImageNet-A mode 1): argmax over its classes only.
    labels are indices into the model's classes."""
    logits = M.restrict_logits(predict_logits(model, images, batch_size, rt), class_idx)
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    out: dict[str, Any] = {"n": len(y), "classes": len(class_idx)}
    out["top1"] = 100.0 * float((logits.argmax(1) == y).double().mean())
    if len(class_idx) >= 5:
        out["top5"] = 100.0 * float(
            (logits.topk(5, 1).indices == y[:, None]).any(1).double().mean()
        )
    out.update(M.calibration_errors(torch.softmax(logits, 1), y))
    return out
