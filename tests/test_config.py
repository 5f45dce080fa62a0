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


# ---- numbers as people write them (YAML 1.1 reads 1e6 or 5e-4 as strings) --------------------
@pytest.mark.parametrize(
    "raw, want", [("1e6", 1e6), ("1E-3", 1e-3), ("5e-4", 5e-4), ("2.5e+1", 25.0)]
)
def test_exponent_numbers_parse_as_floats_on_the_command_line_and_in_a_file(tmp_path, raw, want):
    cfg = load_config(None, [f"teacher.lr={raw}", f"robustness.fgsm_eps=[0,{raw}]"])
    assert cfg.teacher.lr == want and type(cfg.teacher.lr) is float
    assert cfg.robustness.fgsm_eps == [0.0, want]
    f = tmp_path / "c.yaml"
    f.write_text(f"teacher:\n  lr: {raw}\nstudent:\n  weight_decay: {raw}\n")
    cfg = load_config(f)
    assert cfg.teacher.lr == want and cfg.student.weight_decay == want


def test_a_negative_exponent_number_is_read_as_a_number_then_range_checked(tmp_path):
    with pytest.raises(
        UserError,
        match=r"'teacher.lr' must be >= 0, got -100.0 \(0: the weights stay as initialised\)$",
    ):
        load_config(None, ["teacher.lr=-1e2"])  # before: "must be a number, got '-1e2'"
    f = tmp_path / "c.yaml"
    f.write_text("robustness:\n  pgd_eps: -1e2\n")
    with pytest.raises(UserError, match=r"'robustness.pgd_eps' must be >= 0, got -100.0"):
        load_config(f)


def test_exponent_numbers_for_integer_keys_must_be_integral():
    assert load_config(None, ["teacher.epochs=1e3"]).teacher.epochs == 1000
    assert load_config(None, ["pseudo.shard_size=6.5536E4"]).pseudo.shard_size == 65536
    for raw in ("1.5e0", "2.5", "1e30", "abc"):
        with pytest.raises(UserError, match=r"config key 'teacher.epochs' must be an integer"):
            load_config(None, [f"teacher.epochs={raw}"])


@pytest.mark.parametrize("raw", ["1e400", ".inf", "-.inf", ".nan"])
def test_non_finite_numbers_are_refused(raw):
    with pytest.raises(UserError, match=r"config key 'teacher.lr' must be a finite number"):
        load_config(None, [f"teacher.lr={raw}"])


def test_strings_for_string_keys_stay_as_written():
    cfg = load_config(None, ["robustness.reference=1e3", "data.labeled=1e5"])
    assert cfg.robustness.reference == "1e3" and cfg.data.labeled == "1e5"


# ---- ranges: each error names the key, the value and the valid range --------------------------
@pytest.mark.parametrize(
    "override, message",
    [
        ("student.ratio=0", "config key 'student.ratio' must be >= 1, got 0"),
        ("teacher.epochs=0", "config key 'teacher.epochs' must be >= 1, got 0"),
        ("student.batch_size=-3", "config key 'student.batch_size' must be >= 1, got -3"),
        (
            "teacher.lr=-1",
            "config key 'teacher.lr' must be >= 0, got -1.0 (0: the weights stay as initialised)",
        ),
        (
            "student.lr=-0.1",
            "config key 'student.lr' must be >= 0, got -0.1 (0: the weights stay as initialised)",
        ),
        (
            "teacher.weight_decay=-1e-4",
            "config key 'teacher.weight_decay' must be >= 0, got -0.0001",
        ),
        ("teacher.momentum=1", "config key 'teacher.momentum' must be in [0, 1), got 1.0"),
        ("teacher.momentum=-0.1", "config key 'teacher.momentum' must be in [0, 1), got -0.1"),
        ("student.label_smoothing=1", "config key 'student.label_smoothing' must be in [0, 1)"),
        ("teacher.warmup_epochs=-1", "config key 'teacher.warmup_epochs' must be >= 0, got -1.0"),
        ("student.drop_rate=1", "config key 'student.drop_rate' must be in [0, 1), got 1.0"),
        ("teacher.drop_path_rate=1.5", "config key 'teacher.drop_path_rate' must be in [0, 1)"),
        ("student.unlabeled_weight=-1", "config key 'student.unlabeled_weight' must be >= 0"),
        ("student.ema_decay=1", "config key 'student.ema_decay' must be in [0, 1), got 1.0"),
        ("teacher.checkpoint_every_steps=-1", "'teacher.checkpoint_every_steps' must be >= 0"),
        ("select.threshold=1.5", "config key 'select.threshold' must be in [0, 1], got 1.5"),
        ("select.per_class=0", "config key 'select.per_class' must be >= 1, got 0"),
        ("pseudo.temperature=0", "config key 'pseudo.temperature' must be > 0, got 0.0"),
        ("pseudo.retemper=-2", "config key 'pseudo.retemper' must be > 0, got -2.0"),
        ("pseudo.label_smoothing=1", "config key 'pseudo.label_smoothing' must be in [0, 1)"),
        ("pseudo.topk=0", "config key 'pseudo.topk' must be >= 1, got 0"),
        ("pseudo.batch_size=0", "config key 'pseudo.batch_size' must be >= 1, got 0"),
        ("pseudo.shard_size=0", "config key 'pseudo.shard_size' must be >= 1, got 0"),
        ("data.image_size=4", "config key 'data.image_size' must be >= 8, got 4"),
        (
            "data.max_bad_fraction=2",
            "config key 'data.max_bad_fraction' must be in [0, 1], got 2.0",
        ),
        ("data.num_workers=-1", "config key 'data.num_workers' must be >= 0, got -1"),
        ("data.labels_per_class=0", "config key 'data.labels_per_class' must be >= 1, got 0"),
        ("eval_batch_size=0", "config key 'eval_batch_size' must be >= 1, got 0"),
        ("seed=-1", "config key 'seed' must be in [0, 2**53), got -1"),
        ("robustness.subset=0", "config key 'robustness.subset' (--subset) must be >= 1, got 0"),
        ("robustness.seed=-2", "config key 'robustness.seed' (--seed) must be in [0, 2**53)"),
        ("robustness.fgsm_eps=[0,-2]", "'robustness.fgsm_eps' entries must be >= 0, got -2.0"),
        ("robustness.pgd_eps=-1e2", "config key 'robustness.pgd_eps' must be >= 0, got -100.0"),
        ("robustness.pgd_steps=0", "config key 'robustness.pgd_steps' must be >= 1, got 0"),
        ("robustness.perturbation_subset=0", "'robustness.perturbation_subset' must be >= 1"),
        ("finetune.epochs=0", "config key 'finetune.epochs' must be >= 1, got 0"),
        ("finetune.lr=-1", "config key 'finetune.lr' must be > 0, got -1.0"),
        ("finetune.batch_size=0", "config key 'finetune.batch_size' must be >= 1, got 0"),
        ("finetune.freeze_blocks=-1", "config key 'finetune.freeze_blocks' must be >= 0, got -1"),
    ],
)
def test_out_of_range_values_name_the_key_the_value_and_the_range(override, message):
    with pytest.raises(UserError) as e:
        load_config(None, [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_finetune_size_is_checked_at_load_when_enabled():
    with pytest.raises(
        UserError,
        match=r"'finetune.image_size' must be larger than data.image_size \(32\).*got None",
    ):
        load_config(None, ["finetune.enabled=true"])
    with pytest.raises(UserError, match=r"'finetune.image_size'.*got 32"):
        load_config(None, ["finetune.enabled=true", "finetune.image_size=32"])
    assert (
        load_config(None, ["finetune.enabled=true", "finetune.image_size=48"]).finetune.image_size
        == 48
    )
    load_config(None, ["finetune.image_size=16"])  # not enabled: not used, not checked


def test_range_edges_and_optional_nulls_are_accepted():
    cfg = load_config(None, [
        "teacher.momentum=0", "teacher.weight_decay=0", "teacher.warmup_epochs=0",
        "student.drop_rate=0", "student.drop_path_rate=null", "student.ema_decay=0.9999",
        "select.threshold=0", "select.threshold=1", "student.unlabeled_weight=0",
        "teacher.checkpoint_every_steps=0", "seed=0", "robustness.subset=null",
    ])  # fmt: skip
    assert cfg.teacher.momentum == 0.0 and cfg.student.drop_path_rate is None


def test_valid_configs_resolve_exactly_as_written():
    """Parsing the exponent forms changes nothing for values YAML already read as numbers."""
    from noisystudent.cli import DEMO_CONFIG

    a = load_config(None, ["teacher.lr=0.0005", "teacher.epochs=1000"], base=DEMO_CONFIG)
    b = load_config(None, ["teacher.lr=5e-4", "teacher.epochs=1e3"], base=DEMO_CONFIG)
    assert a.to_dict() == b.to_dict()
    demo = load_config(None, None, base=DEMO_CONFIG)
    assert (demo.teacher.lr, demo.teacher.epochs, demo.student.epochs, demo.teacher.weight_decay,
            demo.student.drop_path_rate, demo.select.threshold) == (0.05, 60, 20, 5e-4, 0.2, 0.3)  # fmt: skip


def test_cli_refuses_a_negative_learning_rate_in_one_line(tmp_path, capsys):
    """Before: torch's ValueError as a traceback once training started."""
    from noisystudent.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"run_dir: {tmp_path / 'run'}\ndata:\n  dataset: digits\n")
    assert main(["train-teacher", str(cfg), "teacher.lr=-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [
        "noisystudent: error: config key 'teacher.lr' must be >= 0, got -1.0 (0: the weights stay as initialised)"
    ]
    assert not (tmp_path / "run").exists()  # refused before anything was made
    cfg.write_text(f"run_dir: {tmp_path / 'run'}\nteacher:\n  lr: 1e6\n  epochs: 0\n")
    assert main(["train-teacher", str(cfg)]) == 2  # 1e6 is a number now; epochs=0 is named
    assert "config key 'teacher.epochs' must be >= 1, got 0" in capsys.readouterr().err
