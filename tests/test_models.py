import pytest
import torch

from noisystudent.errors import UserError
from noisystudent.models import (
    check_student_sizes,
    count_params,
    create_model,
    drop_path_rates,
    drop_path_schedule,
)


def test_drop_path_schedule_rises_linearly_to_final_rate():
    r = drop_path_schedule(0.2, 5)
    assert r[0] == 0.0 and r[-1] == pytest.approx(0.2)
    assert all(b > a for a, b in zip(r, r[1:], strict=False))
    diffs = [b - a for a, b in zip(r, r[1:], strict=False)]
    assert max(diffs) == pytest.approx(min(diffs))  # linear in block index


@pytest.mark.parametrize("name,blocks", [("cifar_resnet20", 9), ("wrn16_2", 6)])
def test_builtin_models_use_the_schedule(name, blocks):
    m = create_model(name, 10, drop_rate=0.3, drop_path_rate=0.2)
    rates = list(drop_path_rates(m))
    assert len(rates) == blocks
    assert rates == pytest.approx(drop_path_schedule(0.2, blocks))
    assert m.net.drop_rate == 0.3
    out = m(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 10)


def test_none_keeps_model_default():
    m = create_model("cifar_resnet8", 3)
    assert m.net.drop_rate == 0.0 and set(drop_path_rates(m)) == {0.0}
    t = create_model("resnet18", 4, drop_rate=None).eval()  # any timm model, random init
    assert t(torch.rand(1, 3, 32, 32)).shape == (1, 4)


def test_drop_path_is_noise_in_train_mode_only():
    torch.manual_seed(0)
    m = create_model("cifar_resnet14", 3, drop_path_rate=0.5)
    x = torch.rand(4, 3, 16, 16)
    m.eval()
    assert torch.equal(m(x), m(x))
    m.train()
    assert not torch.allclose(m(x), m(x))


def test_uint8_input_is_scaled():
    m = create_model("cifar_resnet8", 3).eval()
    x = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    assert torch.allclose(m(x), m(x.float() / 255))


def test_param_counts_and_student_size_check():
    small, big = create_model("cifar_resnet8", 10), create_model("cifar_resnet20", 10)
    assert count_params(small) < count_params(big)
    assert check_student_sizes(["cifar_resnet8", "cifar_resnet20"], 10, False) == [
        count_params(small),
        count_params(big),
    ]
    with pytest.raises(UserError, match="smaller than its teacher.*allow_smaller_student"):
        check_student_sizes(["cifar_resnet20", "cifar_resnet8"], 10, False)
    check_student_sizes(["cifar_resnet20", "cifar_resnet8"], 10, True)  # explicitly allowed


def test_unknown_model_name():
    with pytest.raises(UserError, match="unknown model 'resnet_9000'"):
        create_model("resnet_9000", 10)
    with pytest.raises(UserError, match="6n\\+2"):
        create_model("cifar_resnet9", 10)


@pytest.mark.parametrize(
    "typo, want",
    [
        ("cifar_resnt20", "cifar_resnet20"),
        ("cifar_resnet_20", "cifar_resnet20"),
        ("wrn28-10", "wrn28_10"),
        ("efficentnet_b0", "efficientnet_b0"),  # a timm name
        ("ResNet18", "resnet18"),
        ("convnext_tiniy", "convnext_tiny"),
    ],
)
def test_unknown_model_suggests_close_matches_and_where_models_are_listed(typo, want):
    with pytest.raises(UserError) as e:
        create_model(typo, 10)
    msg = str(e.value)
    assert msg.startswith(f"unknown model '{typo}'; did you mean '{want}'")  # the closest first
    assert "docs/method.md" in msg and "timm.list_models()" in msg and "\n" not in msg
    suggested = msg.split("did you mean ")[1].split("?")[0]
    assert len(suggested.split("'")) // 2 <= 3  # at most three names


@pytest.mark.parametrize("name", ["not_a_model_xyz", "xyz", "mymodel"])
def test_unknown_model_with_nothing_close_suggests_no_names(name):
    with pytest.raises(UserError) as e:
        create_model(name, 10)
    msg = str(e.value)
    assert "did you mean" not in msg
    assert msg.startswith(f"unknown model '{name}'; the models are built-ins cifar_resnet")
    assert "timm.list_models()" in msg


def test_student_size_check_names_the_models_entry_of_an_unknown_name():
    with pytest.raises(UserError, match=r"unknown model 'cifar_resnt20' \(config key 'models\[1\]'\); "
                                        r"did you mean 'cifar_resnet20'"):  # fmt: skip
        check_student_sizes(["cifar_resnet8", "cifar_resnt20"], 10, False)


def test_efficientnet_small_keeps_resolution_in_stages_2_and_3():
    from timm.models.efficientnet import EfficientNet

    m = create_model("efficientnet_small_b0", 10).eval()
    assert isinstance(m.net, EfficientNet)  # timm's builder, not a re-write
    strides = [
        blk[0].conv_dw.stride[0] if hasattr(blk[0], "conv_dw") else 1 for blk in m.net.blocks
    ]
    assert strides[:3] == [1, 1, 1] and strides[3] == 2  # B0 would have 2 in stages 2 and 3
    assert m.net.forward_features(torch.rand(1, 3, 32, 32)).shape[-1] == 4  # 32 -> 4, not 1
    assert m.net.drop_rate == 0.2  # B0 dropout
    rates = [
        b.drop_path.drop_prob for s in m.net.blocks for b in s if hasattr(b.drop_path, "drop_prob")
    ]
    assert max(rates) == pytest.approx(0.2, abs=0.02)  # stochastic depth 0.2
    b2 = create_model("efficientnet_small_b2", 10)
    assert b2.net.drop_rate == 0.3 and count_params(b2) > count_params(m)
