"""Robustness metrics (docs/robustness.md sec. 6.2: corruption metrics, perturbation metrics,
filtered-hard subset, calibration)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from noisystudent.errors import UserError
from noisystudent.robustness import metrics as M
from noisystudent.robustness.corruptions import ALEXNET_ERR, BENCHMARK


def errors_from(fn) -> dict:
    return {c: {s: float(fn(c, int(s))) for s in M.SEVERITIES} for c in BENCHMARK}


REF = errors_from(lambda c, s: 20 + 5 * s + BENCHMARK.index(c))


# --------------------------------------------------------------------------------------------
# corruption metrics
def test_equal_to_reference_gives_100_and_half_gives_50():
    assert M.mce(REF, REF) == pytest.approx(100.0)
    assert all(v == pytest.approx(100) for v in M.corruption_errors(REF, REF).values())
    half = {c: {s: v / 2 for s, v in d.items()} for c, d in REF.items()}
    assert M.mce(half, REF) == pytest.approx(50.0)


def test_relative_mce_zero_when_corruption_does_not_hurt():
    flat = errors_from(lambda c, s: 12.0)
    assert M.relative_mce(flat, 12.0, REF, 10.0) == pytest.approx(0.0)
    assert M.relative_mce(REF, 10.0, REF, 10.0) == pytest.approx(100.0)


def test_unnormalized_ce_is_mean_of_the_75_entries():
    vals = [REF[c][s] for c in BENCHMARK for s in M.SEVERITIES]
    assert len(vals) == 75
    assert M.unnormalized_ce(REF) == pytest.approx(np.mean(vals))
    extra = {**REF, "saturate": {s: 99.0 for s in M.SEVERITIES}}  # held-out: not in mCE
    assert M.unnormalized_ce(extra) == pytest.approx(np.mean(vals))
    assert M.mce(extra, {**REF, "saturate": REF["gaussian_noise"]}) == pytest.approx(100.0)


def test_alexnet_errors_give_mce_100_and_sum_form_equals_mean_form():
    alex = errors_from(lambda c, s: 100 * ALEXNET_ERR[c])
    assert M.alexnet_mce(alex) == pytest.approx(100.0)
    model = errors_from(lambda c, s: 10 + 3 * s)
    sum_form = M.mce(model, alex)
    mean_form = np.mean(
        [np.mean([10 + 3 * s for s in range(1, 6)]) / ALEXNET_ERR[c] for c in BENCHMARK]
    )
    assert sum_form == pytest.approx(mean_form)


def test_zero_reference_denominators_are_errors():
    zero = errors_from(lambda c, s: 0.0)
    with pytest.raises(UserError, match="sums to 0"):
        M.mce(REF, zero)
    with pytest.raises(UserError, match="relative mCE"):
        M.relative_mce(REF, 5.0, errors_from(lambda c, s: 7.0), 7.0)
    with pytest.raises(UserError, match="flip probability"):
        M.mfr({"rotate": 0.1}, {"rotate": 0.0})


# --------------------------------------------------------------------------------------------
# perturbation metrics
def test_flip_probability_identity_constant_and_alternating():
    same = np.tile(np.arange(7)[:, None], (1, 31))
    assert M.flip_probability(same, noise=True) == 0 and M.flip_probability(same, noise=False) == 0
    alt = np.tile(np.arange(31) % 2, (4, 1))
    assert M.flip_probability(alt, noise=False) == 1.0
    assert M.flip_probability(alt, noise=True) == pytest.approx(0.5)


def test_flip_probability_of_iid_uniform_predictions():
    preds = np.random.default_rng(0).integers(0, 10, (400, 31))
    assert M.flip_probability(preds, noise=False) == pytest.approx(0.9, abs=0.01)
    assert M.flip_probability(preds, noise=True) == pytest.approx(0.9, abs=0.01)


def test_flip_probability_difficulty_two_stride():
    seq = np.array([[0, 0, 1, 1, 0]])  # chains 0,1,0 (2 flips of 2) and 0,1 (1 flip of 1)
    assert M.flip_probability(seq, noise=False, difficulty=2) == pytest.approx(3 / 3)
    seq = np.array([[0, 1, 0, 1, 0, 1]])  # chains 0,0,0 and 1,1,1: no flips 2 apart
    assert M.flip_probability(seq, noise=False, difficulty=2) == 0.0
    assert M.flip_probability(seq, noise=False, difficulty=1) == 1.0


def test_flip_rate_of_reference_is_100():
    fp = {"rotate": 0.2, "scale": 0.05}
    assert M.mfr(fp, fp) == pytest.approx(100.0)
    assert M.mfr({"rotate": 0.1, "scale": 0.025}, fp) == pytest.approx(50.0)


def test_top5_distance_known_values_and_forms_agree():
    cases = {(1, 2, 3, 4, 5): 0, (2, 1, 3, 4, 5): 2, (9, 1, 2, 3, 4): 9, (6, 7, 8, 9, 10): 15}
    for sigma, want in cases.items():
        assert M.top5_distance_closed(np.array(sigma)) == want
        assert M.top5_distance_sum(sigma) == want
    rng = np.random.default_rng(0)
    for _ in range(300):
        sigma = rng.permutation(20)[:5] + 1
        assert M.top5_distance_closed(sigma) == M.top5_distance_sum(sigma)


def test_top5_distance_from_logits():
    base = torch.arange(10, 0, -1).float()  # class 0 ranked first
    swapped = base.clone()
    swapped[[0, 1]] = swapped[[1, 0]]
    seq = torch.stack([base, swapped, swapped])[None]  # (1, 3, 10)
    assert M.top5_distance(seq, noise=False) == pytest.approx((2 + 0) / 2)
    assert M.top5_distance(seq, noise=True) == pytest.approx(2.0)
    s = M.rank_sigma(base[None], swapped[None])
    assert s.tolist() == [[2, 1, 3, 4, 5]]


# --------------------------------------------------------------------------------------------
# filtered-hard subset
def test_filtered_hard_accuracy():
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    ref = np.array([0, 2, 2, 1, 1, 0, 0, 0])  # wrong on 1, 3, 5, 7
    acc, n = M.filtered_hard_accuracy(ref, labels, ref)
    assert acc == 0.0 and n == 4  # the reference scores 0 on its own subset
    assert M.filtered_hard_accuracy(ref.copy(), labels, ref)[0] == 0.0  # identical model
    assert M.filtered_hard_accuracy(labels, labels, ref) == (100.0, 4)  # oracle
    assert n == int((ref != labels).sum())
    assert M.filtered_hard_accuracy(labels, labels, labels) == (None, 0)


def test_class_subset_logit_masking():
    logits = torch.tensor([[5.0, 1.0, 3.0, 2.0], [0.0, 9.0, 1.0, 8.0]])
    masked = M.restrict_logits(logits, [2, 3])
    assert masked.argmax(1).tolist() == [2, 3]
    assert torch.isinf(masked[:, :2]).all()


def test_calibration_errors():
    labels = torch.tensor([0, 0, 0, 0])
    perfect = torch.tensor([[1.0, 0.0]] * 4)
    assert M.calibration_errors(perfect, labels)["ece"] == pytest.approx(0.0)
    over = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.1, 0.9]])  # 50% right at 0.9
    out = M.calibration_errors(over, labels)
    assert out["ece"] == pytest.approx(40.0) and out["rms_calibration_error"] == pytest.approx(40.0)
