"""`train --config FILE`: the file's values stand unless the command line gives the option."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from training import trainer
from training.augment import STYLE_PRESETS, AugmentConfig
from training.trainer import TrainConfig
from xclip_serve.cli import app

FILE = {"data": "from-file", "output": "runs/from-file", "model": "tiny", "objective": "clip", "epochs": 5,
        "batch_size": 16, "lr": 1e-3, "seed": 7, "precision": "fp32", "eval_every": 3, "max_steps": 9,
        "templates": ["a {} icon"], "label_prompt_prob": 0.25, "label_prompt_set": "shape", "resume": False}


def built_config(tmp_path, monkeypatch, *flags: str, file: dict = FILE) -> TrainConfig:
    """The TrainConfig `train --config FILE *flags` builds, captured instead of training."""
    built = []
    monkeypatch.setattr(trainer, "train", lambda config: built.append(config) or {})
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(file))
    result = CliRunner().invoke(app, ["train", "--config", str(config_file), *flags])
    assert result.exit_code == 0, result.output
    return built[0]


def test_options_not_given_leave_every_value_of_the_config_file(tmp_path, monkeypatch):
    config = built_config(tmp_path, monkeypatch)
    assert {name: getattr(config, name) for name in FILE} == {**FILE, "templates": ("a {} icon",)}


@pytest.mark.parametrize("flags, field, value", [
    (["--data", "d"], "data", "d"),
    (["--output", "o"], "output", "o"),
    (["--model", "small"], "model", "small"),
    (["--objective", "xclip"], "objective", "xclip"),
    (["--epochs", "2"], "epochs", 2),
    (["--batch-size", "4"], "batch_size", 4),
    (["--lr", "0.01"], "lr", 0.01),
    (["--seed", "1"], "seed", 1),
    (["--precision", "bf16"], "precision", "bf16"),
    (["--eval-every", "0"], "eval_every", 0),
    (["--max-steps", "1"], "max_steps", 1),
    (["--template", "{}, drawn"], "templates", ("{}, drawn",)),
    (["--label-prompt-prob", "0"], "label_prompt_prob", 0.0),
    (["--label-prompt-set", "category"], "label_prompt_set", "category"),
    (["--resume"], "resume", True),
    (["--image-size", "32"], "image_size", 32),
])
def test_an_option_given_overrides_the_file_for_its_field_only(tmp_path, monkeypatch, flags, field, value):
    config = built_config(tmp_path, monkeypatch, *flags)
    rest = {name: getattr(config, name) for name in FILE if name != field}
    assert getattr(config, field) == value
    assert rest == {name: v for name, v in {**FILE, "templates": ("a {} icon",)}.items() if name != field}


def test_without_a_config_file_the_options_defaults_apply(tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr(trainer, "train", lambda config: built.append(config) or {})
    result = CliRunner().invoke(app, ["train", "--data", "d", "--no-resume", "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    assert (built[0].epochs, built[0].lr, built[0].output, built[0].resume) == (30, 5e-4, "runs/xclip", False)


def test_an_unknown_field_in_the_config_file_is_a_usage_error(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "train", lambda config: pytest.fail("trained on a bad config"))
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps({"learning_rate": 1e-3}))
    result = CliRunner().invoke(app, ["train", "--data", "d", "--config", str(config_file)])
    assert result.exit_code == 2 and "learning_rate" in result.output


def test_a_style_preset_sets_the_augment_keys_and_the_config_file_overrides_them(tmp_path, monkeypatch):
    file = {**FILE, "augment": {"blur_prob": 0.0, "crop_scale": [0.5, 1.0]}}
    config = built_config(tmp_path, monkeypatch, "--style-augment", "strong", file=file)
    assert config.augment == AugmentConfig(**{**STYLE_PRESETS["strong"], "blur_prob": 0.0, "crop_scale": (0.5, 1.0)})
    assert built_config(tmp_path, monkeypatch, file=file).augment == AugmentConfig(blur_prob=0.0,
                                                                                 crop_scale=(0.5, 1.0))
    assert built_config(tmp_path, monkeypatch).augment == AugmentConfig()  # no preset, no keys: all off


@pytest.mark.parametrize("flags, augment, message", [
    (["--style-augment", "wild"], {}, "style_augment"),
    ([], {"blur_prob": 2}, "augment.blur_prob"),
    ([], {"posterize_bits": [0, 4]}, "augment.posterize_bits"),
    ([], {"blur_sigma": [-1, 1]}, "augment.blur_sigma"),
    (["--image-size", "20"], {}, "image_size"),  # tiny's patch is 8
    (["--image-size", "32", "--init", "a-checkpoint"], {}, "image_size"),
])
def test_bad_augment_or_image_size_values_are_usage_errors(tmp_path, monkeypatch, flags, augment, message):
    monkeypatch.setattr(trainer, "train", lambda config: pytest.fail("trained on a bad config"))
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps({"model": "tiny", "augment": augment}))
    result = CliRunner().invoke(app, ["train", "--data", "d", "--config", str(config_file), *flags])
    assert result.exit_code == 2 and message in result.output


def test_the_help_spells_out_each_style_preset():
    help_text = "".join(CliRunner().invoke(app, ["train", "--help"]).output.replace("│", " ").split())
    light, strong = help_text.index("light:"), help_text.index("strong:")
    for name, start, end in (("light", light, strong), ("strong", strong, len(help_text))):
        for key, value in STYLE_PRESETS[name].items():
            assert f"{key}={json.dumps(value, separators=(',', ':'))}" in help_text[start:end], (name, key)
