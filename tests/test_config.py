import pytest

from noisystudent.config import config_differences, load_config, parse_overrides
from noisystudent.errors import UserError


def test_precedence_defaults_file_cli(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("teacher:\n  epochs: 7\n  lr: 0.2\nmodels: [cifar_resnet8]\n")
    cfg = load_config(f, ["teacher.epochs=9"])
    assert cfg.teacher.epochs == 9  # CLI beats file
    assert cfg.teacher.lr == 0.2  # file beats default
    assert cfg.student.epochs == 30  # default
    assert cfg.models == ["cifar_resnet8"]


def test_unknown_key_is_an_error_with_a_suggestion(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("teacher:\n  epoch: 7\n")
    with pytest.raises(
        UserError, match=r"unknown config key 'teacher.epoch'.*did you mean 'epochs'"
    ):
        load_config(f)
    with pytest.raises(UserError, match="unknown config key 'selct'"):
        load_config(None, ["selct.threshold=0.5"])


def test_wrong_type_and_choice_are_errors():
    with pytest.raises(UserError, match="teacher.epochs.*integer"):
        load_config(None, ["teacher.epochs=abc"])
    with pytest.raises(UserError, match="pseudo.mode.*one of"):
        load_config(None, ["pseudo.mode=medium"])


def test_override_parsing():
    assert parse_overrides(["a.b=1", "a.c=x", "m=[p,q]"]) == {
        "a": {"b": 1, "c": "x"},
        "m": ["p", "q"],
    }
    with pytest.raises(UserError, match="key=value"):
        parse_overrides(["nonsense"])


def test_runtime_keys_do_not_count_as_differences():
    a = load_config(None, ["progress=false"]).to_dict()
    b = load_config(None, ["progress=true", "data.num_workers=2"]).to_dict()
    assert config_differences(a, b) == []
    c = load_config(None, ["teacher.epochs=3"]).to_dict()
    assert config_differences(a, c) == ["teacher.epochs"]


def test_a_key_missing_from_an_older_config_counts_as_its_default():
    new = load_config(None, ["teacher.epochs=3"]).to_dict()
    old = load_config(None, ["teacher.epochs=3"]).to_dict()
    del old["select"]["mode"]  # saved before the key existed
    assert config_differences(old, new) == []
    new["select"]["mode"] = "reference"
    assert config_differences(old, new) == ["select.mode"]
