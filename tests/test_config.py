"""`load_config`: defaults < YAML file < dotted overrides, typed override values, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from prism.core.config import ConfigError, LoraSettings, load_config, parse_overrides, save_config
from prism.sft.config import SFTConfig


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path, overrides=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(SFTConfig, path, overrides)
    message = str(info.value)
    assert "\n" not in message, f"error must be one line: {message!r}"
    return message


# ---------------------------------------------------------------------------------- precedence


def test_defaults_then_file_then_overrides(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 0.001\n  weight_decay: 0.05\ntrain:\n  max_steps: 7\n  micro_batch_size: 3\n")
    cfg = load_config(SFTConfig, path, ["optim.lr=2e-4", "train.micro_batch_size=2"])

    assert cfg.optim.lr == 2e-4  # override beats file
    assert cfg.train.micro_batch_size == 2  # override beats file
    assert cfg.optim.weight_decay == 0.05  # file beats default (0.0), same section as an override
    assert cfg.train.max_steps == 7  # file beats default (100)
    assert cfg.optim.eps == 1e-8 and cfg.train.grad_accum == 1  # untouched defaults
    assert cfg.data.eval is None  # no demo paths as library defaults


def test_no_file_and_no_overrides_gives_the_defaults():
    assert load_config(SFTConfig) == SFTConfig()


def test_empty_file_gives_the_defaults(tmp_path):
    assert load_config(SFTConfig, write(tmp_path, "")) == SFTConfig()


def test_overrides_without_a_file(tmp_path):
    cfg = load_config(SFTConfig, None, ["data.train=x.jsonl", "model.lora.enabled=true", "model.lora.r=4"])
    assert cfg.data.train == "x.jsonl"
    assert cfg.model.lora == LoraSettings(enabled=True, r=4)


def test_override_values_are_typed():
    cfg = load_config(SFTConfig, None, ["optim.lr=2e-4", "data.eval=null", "train.max_steps=5",
                                        "optim.betas=[0.8, 0.95]", "optim.max_grad_norm=null"])
    assert type(cfg.optim.lr) is float and cfg.optim.lr == 2e-4
    assert cfg.data.eval is None
    assert type(cfg.train.max_steps) is int and cfg.train.max_steps == 5
    assert cfg.optim.betas == (0.8, 0.95)
    assert cfg.optim.max_grad_norm is None


def test_parse_overrides_builds_a_nested_tree():
    # YAML scalars: ints and null are typed here, "2e-4" stays a string (YAML 1.1 wants a dot)
    # and is turned into a float by the config's validation, checked above.
    tree = parse_overrides(["optim.lr=2e-4", "train.max_steps=5", "data.eval=null", "model.lora.r=8", "data.train=a=b"])
    assert tree == {
        "optim": {"lr": "2e-4"},
        "train": {"max_steps": 5},
        "data": {"eval": None, "train": "a=b"},  # only the first '=' splits
        "model": {"lora": {"r": 8}},
    }


# ---------------------------------------------------------------------------------- errors


def test_unknown_key_in_file_names_file_and_dotted_key(tmp_path):
    message = error_of(write(tmp_path, "optim: {lrr: 1}\n"))
    assert "optim.lrr" in message and "run.yaml" in message


def test_unknown_section_in_file(tmp_path):
    message = error_of(write(tmp_path, "optimizer: {lr: 1}\n"))
    assert "'optimizer'" in message and "run.yaml" in message


def test_unknown_key_in_override_names_it(tmp_path):
    message = error_of(write(tmp_path, ""), ["optim.lrr=1"])
    assert "optim.lrr" in message and "run.yaml" in message and "overrides" in message


@pytest.mark.parametrize("override, key, hint", [
    ("optim.lr=abc", "optim.lr", "'abc'"),  # wrong type
    ("optim.lr=-1", "optim.lr", "greater than 0"),
    ("optim.warmup_ratio=2", "optim.warmup_ratio", "less than or equal to 1"),
    ("train.max_steps=0", "train.max_steps", "greater than 0"),
    ("train.max_steps=2.5", "train.max_steps", "integer"),
    ("model.dtype=fp8", "model.dtype", "'fp8'"),  # not one of the allowed values
])
def test_bad_override_values_name_the_key(tmp_path, override, key, hint):
    message = error_of(write(tmp_path, ""), [override])
    assert f"{key}:" in message and hint in message and "run.yaml" in message


def test_bad_value_in_file_names_file_and_key(tmp_path):
    message = error_of(write(tmp_path, "optim:\n  warmup_ratio: 2\n"))
    assert message.startswith(f"{tmp_path / 'run.yaml'}:") and "optim.warmup_ratio" in message


def test_missing_file(tmp_path):
    message = error_of(tmp_path / "absent.yaml")
    assert "absent.yaml" in message and "not found" in message


def test_invalid_yaml_points_at_file_and_line(tmp_path):
    # Line 3 maps a value inside a plain scalar, which YAML forbids.
    path = write(tmp_path, "model:\n  dtype: auto\n  path: a: b\n")
    message = error_of(path)
    assert message.startswith(f"{path}:3:") and "invalid YAML" in message


def test_top_level_list_is_rejected(tmp_path):
    message = error_of(write(tmp_path, "- optim\n- train\n"))
    assert "run.yaml" in message and "mapping" in message


def test_section_given_as_scalar_is_rejected(tmp_path):
    message = error_of(write(tmp_path, "optim: 3\n"))
    assert "run.yaml" in message and "optim:" in message


@pytest.mark.parametrize("item", ["optim.lr", "=3"])
def test_override_without_key_value_form(item):
    message = error_of(None, [item])
    assert f"'{item}'" in message and "key=value" in message


def test_override_into_a_scalar_value_is_rejected():
    message = error_of(None, ["optim.lr.x=3"])
    assert "optim.lr" in message


def test_assignment_is_validated_too():
    cfg = SFTConfig()
    with pytest.raises(ValueError):
        cfg.optim.lr = -1.0


# ---------------------------------------------------------------------------------- save/load


def test_save_then_load_round_trips(tmp_path):
    cfg = load_config(SFTConfig, None, [
        "optim.lr=3e-4", "optim.betas=[0.8, 0.9]", "data.eval=null", "train.max_steps=9",
        "model.lora.enabled=true", "model.lora.target_modules=[q_proj, v_proj]", "logging.run_name=demo",
    ])
    path = tmp_path / "resolved.yaml"
    save_config(cfg, path)
    again = load_config(SFTConfig, path)
    assert again == cfg
    assert again.optim.betas == (0.8, 0.9) and again.model.lora.target_modules == ["q_proj", "v_proj"]
    assert again.data.eval is None


def test_number_like_override_of_a_text_field_stays_text():
    cfg = load_config(SFTConfig, None, ["logging.run_name=123", "model.path=2024"])
    assert cfg.logging.run_name == "123" and cfg.model.path == "2024"


def test_overriding_one_key_keeps_the_stage_defaults_of_its_section():
    from prism.rl.config import RLConfig

    cfg = load_config(RLConfig, None, ["optim.lr=1e-3", 'reward.functions={"format": 1.0}'])
    # RL's optimiser defaults (constant schedule, no warm-up) survive an override of the lr ...
    assert cfg.optim.lr == 1e-3 and cfg.optim.scheduler == "constant" and cfg.optim.warmup_ratio == 0.0
    # ... while a dict-valued field is replaced whole, not merged with its default
    assert cfg.reward.functions == {"format": 1.0}
    assert load_config(RLConfig).optim.lr == 1e-6 and load_config(SFTConfig).optim.lr == 1e-5


# ---------------------------------------------------------------------------------- renamed keys


@pytest.mark.parametrize("cls, old, new", [
    ("prism.sft.config:SFTConfig", "train.batch_size", "train.micro_batch_size"),
    ("prism.rl.config:RLConfig", "train.batch_size", "train.prompts_per_step"),
    ("prism.align.config:AlignConfig", "train.batch_size", "train.prompts_per_step"),
    ("prism.align.config:AlignConfig", "discriminator.micro_batch_size", "discriminator.prompts_per_micro_batch"),
    ("prism.align.config:AlignConfig", "warmup.batch_size", "warmup.pairs_per_step"),
    ("prism.rl.config:RLConfig", "eval.batch_size", "eval.chunk_size"),
    ("prism.pipeline:PipelineConfig", "eval.batch_size", "eval.chunk_size"),
])
def test_a_renamed_key_stops_naming_its_replacement(tmp_path, cls, old, new):
    import importlib

    module, _, name = cls.partition(":")
    config_cls = getattr(importlib.import_module(module), name)
    with pytest.raises(ConfigError) as err:
        load_config(config_cls, None, [f"{old}=2"])
    assert str(err.value) == f"overrides: config key '{old}' was renamed to '{new}'"
    section, key = old.split(".")
    path = write(tmp_path, f"{section}:\n  {key}: 2\n")
    with pytest.raises(ConfigError, match=f"^{path}: config key '{old}' was renamed to '{new}'$"):
        load_config(config_cls, path)


def test_model_path_and_training_data_have_no_default():
    from prism.sft.train import train

    with pytest.raises(ConfigError, match=r"^model.path: not set \(it has no default\)"):
        train(load_config(SFTConfig))
    with pytest.raises(ConfigError, match=r"^data.train: not set"):
        train(load_config(SFTConfig, None, ["model.path=somewhere"]))


def test_dual_clip_is_validated_at_load():
    from prism.rl.config import RLConfig

    assert load_config(RLConfig).algo.clip_ratio_c is None  # off by default
    assert load_config(RLConfig, None, ["algo.clip_ratio_c=3"]).algo.clip_ratio_c == 3.0
    with pytest.raises(ConfigError, match=r"algo.clip_ratio_c: Input should be greater than 1 \(got 0.5\)"):
        load_config(RLConfig, None, ["algo.clip_ratio_c=0.5"])
    with pytest.raises(ConfigError, match="clip_ratio_c: dual-clip applies to grpo and dapo .*not gspo"):
        load_config(RLConfig, None, ["algo.clip_ratio_c=3", "algo.name=gspo"])
