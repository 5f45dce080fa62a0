import torch
import torch.nn.functional as F

from noisystudent.losses import hard_labels, soft_cross_entropy, soft_labels


def test_soft_labels_temperature():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    p1, p2 = soft_labels(logits, 1.0), soft_labels(logits, 2.0)
    assert torch.allclose(p1.sum(1), torch.ones(1))
    assert torch.allclose(p1, F.softmax(logits, 1))
    assert p2.max() < p1.max()  # higher temperature, flatter distribution


def test_hard_labels_are_one_hot_argmax():
    p = torch.tensor([[0.2, 0.7, 0.1], [0.5, 0.1, 0.4]])
    assert hard_labels(p).tolist() == [[0, 1, 0], [1, 0, 0]]


def test_soft_ce_with_one_hot_equals_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 5, generator=g)
    y = torch.randint(0, 5, (8,), generator=g)
    assert torch.allclose(
        soft_cross_entropy(logits, F.one_hot(y, 5).float()), F.cross_entropy(logits, y)
    )


def test_soft_ce_is_minimised_by_the_target_distribution():
    target = torch.tensor([[0.7, 0.2, 0.1]])
    at_target = soft_cross_entropy(target.log(), target)
    other = soft_cross_entropy(torch.tensor([[0.0, 0.0, 0.0]]), target)
    assert at_target < other
    assert torch.isclose(at_target, -(target * target.log()).sum())  # = entropy of the target


def test_retemper_matches_softmax_at_the_new_temperature():
    from noisystudent.losses import retemper

    z = torch.tensor([[2.0, 0.5, -1.0, 0.0]])
    p1 = soft_labels(z, 1.0)
    assert torch.allclose(retemper(p1, 2.0), soft_labels(z, 2.0), atol=1e-6)
    assert torch.allclose(retemper(p1, 0.5), soft_labels(z, 0.5), atol=1e-6)
    assert torch.equal(retemper(p1, 1.0), p1)


def test_hard_targets_are_smoothed_and_soft_targets_retempered():
    from noisystudent.losses import pseudo_targets

    p = torch.tensor([[0.6, 0.3, 0.1]])
    hard = pseudo_targets(p, "hard", label_smoothing=0.1)
    assert torch.allclose(hard, torch.tensor([[0.9 + 0.1 / 3, 0.1 / 3, 0.1 / 3]]))
    assert torch.allclose(
        pseudo_targets(p, "hard", label_smoothing=0.0), torch.tensor([[1.0, 0, 0]])
    )
    soft = pseudo_targets(p, "soft", temperature=0.5)
    assert torch.allclose(soft, p**2 / (p**2).sum())
