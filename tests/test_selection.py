import torch

from noisystudent.selection import balance_classes, filter_by_confidence, select_pseudo_labels


def test_threshold_filter_keeps_at_or_above():
    conf = torch.tensor([0.1, 0.3, 0.29, 0.9])
    assert filter_by_confidence(conf, 0.3).tolist() == [1, 3]


def test_balance_keeps_top_k_and_duplicates_rare_classes():
    # class 0: 6 images, class 1: 2 images, class 2: 1 image; K = 3
    pred = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 2])
    conf = torch.tensor([0.5, 0.9, 0.6, 0.95, 0.4, 0.7, 0.8, 0.85, 0.6])
    rows = balance_classes(
        pred, conf, torch.arange(9), 3, per_class=3, generator=torch.Generator().manual_seed(0)
    )
    counts = torch.bincount(pred[rows], minlength=3)
    assert counts.tolist() == [3, 3, 3]
    assert sorted(rows[pred[rows] == 0].tolist()) == [1, 3, 5]  # the 3 most confident
    c1 = rows[pred[rows] == 1].tolist()
    assert set(c1) == {6, 7} and len(c1) == 3  # every image once, one duplicated
    assert rows[pred[rows] == 2].tolist() == [8, 8, 8]  # a single image fills the class


def test_default_k_is_mean_count_and_empty_class_stays_empty():
    pred = torch.tensor([0, 0, 0, 0, 1, 1])
    conf = torch.ones(6)
    rows = balance_classes(pred, conf, torch.arange(6), 3)  # K = round(6 / 3) = 2
    assert torch.bincount(pred[rows], minlength=3).tolist() == [2, 2, 0]


def test_selection_is_deterministic_for_a_seed():
    g = torch.Generator().manual_seed(1)
    conf = torch.rand(500, generator=g)
    pred = torch.randint(0, 10, (500,), generator=g)
    a = select_pseudo_labels(conf, pred, 10, 0.3, True, per_class=60, seed=5)
    b = select_pseudo_labels(conf, pred, 10, 0.3, True, per_class=60, seed=5)
    assert torch.equal(a, b)
    assert (conf[a] >= 0.3).all()
    assert torch.bincount(pred[a], minlength=10).tolist() == [60] * 10
    c = select_pseudo_labels(conf, pred, 10, 0.3, True, per_class=60, seed=6)
    assert not torch.equal(a, c)  # duplicates are drawn at random, seeded


def test_no_balance_is_just_the_filter():
    conf = torch.tensor([0.2, 0.5, 0.8])
    pred = torch.tensor([0, 0, 1])
    assert select_pseudo_labels(conf, pred, 2, 0.3, False).tolist() == [1, 2]


# ---- the reference (histogram) selection -----------------------------------------------------
from noisystudent.selection import (  # noqa: E402
    class_thresholds,
    confidence_histogram,
    copy_counts,
    reference_select,
)


def test_histogram_counts_and_chunks_add_up():
    g = torch.Generator().manual_seed(0)
    conf, pred = torch.rand(1000, generator=g), torch.randint(0, 4, (1000,), generator=g)
    h = confidence_histogram(conf, pred, 4)
    assert h.shape == (4, 101) and h.sum() == 1000
    assert torch.equal(h[2].sum(), (pred == 2).sum())
    parts = confidence_histogram(conf[:300], pred[:300], 4) + confidence_histogram(
        conf[300:], pred[300:], 4
    )
    assert torch.equal(h, parts)
    assert h[1, 50:].sum() == ((pred == 1) & (conf >= 0.5)).sum()


def test_class_threshold_is_highest_that_keeps_k_but_not_below_min():
    # class 0: 10 images at 0.95 and 10 at 0.55; class 1: 3 images at 0.9; class 2: 50 at 0.2
    conf = torch.tensor([0.95] * 10 + [0.55] * 10 + [0.9] * 3 + [0.2] * 50)
    pred = torch.tensor([0] * 20 + [1] * 3 + [2] * 50)
    t, n = class_thresholds(confidence_histogram(conf, pred, 3), per_class=10, min_threshold=0.3)
    assert t.tolist() == [
        95,
        30,
        30,
    ]  # 10 images still at 0.95; class 1 never reaches K; class 2 min
    assert n.tolist() == [10, 3, 0]
    t, n = class_thresholds(confidence_histogram(conf, pred, 3), per_class=15, min_threshold=0.3)
    assert t.tolist()[0] == 55 and n.tolist()[0] == 20


def test_fractional_copies_bernoulli_and_options():
    conf = torch.tensor([0.9] * 4 + [0.8] * 20)
    pred = torch.tensor([0] * 4 + [1] * 20)
    hist = confidence_histogram(conf, pred, 2)
    t, n = class_thresholds(hist, per_class=10, min_threshold=0.3)
    c = copy_counts(conf, pred, t, n, 10, seed=0)
    assert set(c[:4].tolist()) <= {2, 3}  # 10 / 4 = 2.5 copies: 2 plus a coin flip
    assert set(c[4:].tolist()) <= {0, 1}  # 10 / 20 = 0.5: thinned
    many = torch.stack([copy_counts(conf, pred, t, n, 10, seed=s) for s in range(400)]).double()
    assert (
        abs(many[:, :4].mean().item() - 2.5) < 0.1 and abs(many[:, 4:].mean().item() - 0.5) < 0.05
    )
    no_up = copy_counts(conf, pred, t, n, 10, upsample=False, seed=0)
    assert no_up[:4].tolist() == [1, 1, 1, 1]
    all_ = copy_counts(conf, pred, t, n, 10, use_all=True)
    assert all_.tolist() == [1] * 24


def test_reference_select_deterministic_and_balanced_in_expectation():
    g = torch.Generator().manual_seed(3)
    conf = torch.rand(5000, generator=g)
    pred = torch.randint(0, 5, (5000,), generator=g)
    pred[:2000] = 0  # an over-represented class
    a = reference_select(conf, pred, 5, per_class=300, seed=1)
    assert torch.equal(a, reference_select(conf, pred, 5, per_class=300, seed=1))
    counts = torch.bincount(pred[a], minlength=5).double()
    assert ((counts - 300).abs() < 60).all(), counts
    assert (conf[a] >= 0.3).all()
    # class 0 keeps its most confident images: its threshold is higher than the others'
    assert conf[a][pred[a] == 0].min() > conf[a][pred[a] == 1].min()


def test_streaming_selection_equals_in_memory_for_any_chunking():
    from noisystudent.seeds import row_uniforms
    from noisystudent.selection import reference_select_stream

    g = torch.Generator().manual_seed(7)
    conf = torch.rand(3000, generator=g)
    pred = torch.randint(0, 6, (3000,), generator=g)
    whole = reference_select(conf, pred, 6, per_class=200, seed=3)
    for size in (1, 7, 1000, 2999):

        def chunks(size=size):
            return [(a, conf[a : a + size], pred[a : a + size]) for a in range(0, 3000, size)]

        got = torch.cat(list(reference_select_stream(chunks, 6, per_class=200, seed=3)))
        assert torch.equal(got, whole), size
    u = row_uniforms(torch.arange(100000), seed=0)
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01
    assert not torch.equal(u, row_uniforms(torch.arange(100000), seed=1))
