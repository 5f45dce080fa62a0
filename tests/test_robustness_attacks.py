"""FGSM / PGD (docs/robustness.md sec. 6.2, "Attacks"): pixel-space bounds with normalisation
inside the model, eps = 0, PGD-1 == FGSM, PGD <= FGSM on a trained non-linear toy, the linear
closed form, eval mode and no side effects, seeded random start, optional torchattacks oracle."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from noisystudent.models import Classifier, create_model
from noisystudent.robustness.adversarial import adversarial_accuracy, fgsm, pgd

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cnn(seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 3),
    )
    return Classifier(net)


def batch(n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_eps_zero_is_the_identity_and_clean_accuracy():
    m = tiny_cnn()
    x, y = batch()
    assert torch.equal(fgsm(m, x, y, 0.0), x)
    assert torch.equal(pgd(m, x, y, 0.0, steps=3), x)
    imgs = (x.permute(0, 2, 3, 1) * 255).to(torch.uint8)
    res = adversarial_accuracy(m, imgs, y, [0, 4], 0.0, 2, 4, torch.device("cpu"))
    with torch.no_grad():
        m.eval()
        clean = 100.0 * (m(imgs.permute(0, 3, 1, 2)).argmax(1) == y).float().mean().item()
    assert res["fgsm"]["0"] == pytest.approx(clean) and res["pgd2_0"] == pytest.approx(clean)


def test_bounds_in_pixel_space_with_normalisation_inside():
    m = tiny_cnn()
    x, y = batch()
    for eps in (2 / 255, 8 / 255, 16 / 255):
        for adv in (fgsm(m, x, y, eps), pgd(m, x, y, eps, steps=5)):
            assert (adv - x).abs().max() <= eps + 1e-6
            assert adv.min() >= 0 and adv.max() <= 1


class ManualNorm(nn.Module):
    def __init__(self, net: nn.Module, mean, std):
        super().__init__()
        self.net, self.mean, self.std = net, mean, std

    def forward(self, x):
        return self.net((x - self.mean) / self.std)


def test_classifier_wrapper_equals_manual_normalisation():
    m = tiny_cnn()
    manual = ManualNorm(m.net, m.mean, m.std)
    x, y = batch()
    assert torch.equal(fgsm(m, x, y, 4 / 255), fgsm(manual, x, y, 4 / 255))
    a = pgd(m, x, y, 8 / 255, 3, generator=torch.Generator().manual_seed(1))
    b = pgd(manual, x, y, 8 / 255, 3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_pgd_one_step_no_random_start_equals_fgsm_exactly():
    m = tiny_cnn()
    x, y = batch()
    for eps in (2 / 255, 16 / 255):
        assert torch.equal(
            pgd(m, x, y, eps, steps=1, alpha=eps, random_start=False), fgsm(m, x, y, eps)
        )


def xor_toy() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A trained non-linear model on XOR-type 2-D data in [0, 1]."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(600, 2, generator=g)
    y = ((x[:, 0] > 0.5) ^ (x[:, 1] > 0.5)).long()
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2))
    opt = torch.optim.Adam(m.parameters(), 0.02)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    for p in m.parameters():
        p.grad = None
    return m, x, y


def test_pgd_is_at_least_as_strong_as_fgsm_on_a_trained_toy():
    m, x, y = xor_toy()
    acc = lambda a: (m(a).argmax(1) == y).float().mean().item()  # noqa: E731
    assert acc(x) > 0.9
    prev = 1.0
    for e in (0.02, 0.05, 0.1):
        f = acc(fgsm(m, x, y, e))
        p = acc(pgd(m, x, y, e, 10, generator=torch.Generator().manual_seed(0)))
        assert p <= f + 0.01
        assert p <= prev + 1e-9  # non-increasing in eps
        prev = p


def test_linear_model_fgsm_margin_change_is_eps_l1():
    torch.manual_seed(0)
    w, b = torch.randn(12), torch.tensor(0.1)

    class Lin(nn.Module):
        def forward(self, x):
            z = x.flatten(1) @ w + b
            return torch.stack([torch.zeros_like(z), z], 1)  # binary logistic as 2-class CE

    x = 0.3 + 0.4 * torch.rand(5, 12)  # no clipping active at eps 0.05
    y = torch.ones(5, dtype=torch.long)
    eps = 0.05
    adv = fgsm(Lin(), x, y, eps)
    margin = lambda a: a @ w + b  # noqa: E731
    assert torch.allclose(margin(x) - margin(adv), eps * w.abs().sum().expand(5), atol=1e-5)


def test_eval_mode_restored_no_grads_no_bn_update_seeded_start():
    m = create_model("cifar_resnet8", 3, drop_rate=0.5)
    m.train()
    seen = []
    m.net.fc.register_forward_hook(lambda mod, i, o: seen.append(mod.training))
    bn = [b for b in m.modules() if isinstance(b, nn.BatchNorm2d)][0]
    stats = bn.running_mean.clone()
    x, y = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    a = pgd(m, x, y, 8 / 255, 2, generator=torch.Generator().manual_seed(3))
    fgsm(m, x, y, 8 / 255)
    assert seen and not any(seen)  # eval mode during every attack forward
    assert m.training  # original mode restored
    assert all(p.grad is None for p in m.parameters())
    assert torch.equal(bn.running_mean, stats)
    b = pgd(m, x, y, 8 / 255, 2, generator=torch.Generator().manual_seed(3))
    c = pgd(m, x, y, 8 / 255, 2, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_predicted_label_option_and_accuracy_keys():
    m = tiny_cnn()
    x, y = batch(8)
    imgs = (x.permute(0, 2, 3, 1) * 255).to(torch.uint8)
    res = adversarial_accuracy(
        m, imgs, y, [0, 2, 4, 8, 16], 16, 10, 4, torch.device("cpu"), use_predicted_labels=True
    )
    assert list(res["fgsm"]) == ["0", "2", "4", "8", "16"] and "pgd10_16" in res
    assert all(0 <= v <= 100 for v in res["fgsm"].values())


def test_oracle_torchattacks():
    ta = pytest.importorskip("torchattacks")
    m = tiny_cnn().eval()
    x, y = batch()
    eps = 8 / 255
    assert torch.allclose(ta.FGSM(m, eps=eps)(x, y), fgsm(m, x, y, eps), atol=0)
    want = ta.PGD(m, eps=eps, alpha=eps / 4, steps=10, random_start=False)(x, y)
    got = pgd(m, x, y, eps, 10, random_start=False)
    assert np.abs((want - got).numpy()).max() == 0
