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
