"""`train --config FILE`: the file's values stand unless the command line gives the option."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from training import trainer
from training.trainer import TrainConfig
from xclip_serve.cli import app

FILE = {"data": "from-file", "output": "runs/from-file", "model": "tiny", "objective": "clip", "epochs": 5,
        "batch_size": 16, "lr": 1e-3, "seed": 7, "precision": "fp32", "eval_every": 3, "max_steps": 9,
        "templates": ["a {} icon"], "label_prompt_prob": 0.25, "label_prompt_set": "shape", "resume": False}


def built_config(tmp_path, monkeypatch, *flags: str) -> TrainConfig:
    """The TrainConfig `train --config FILE *flags` builds, captured instead of training."""
    built = []
    monkeypatch.setattr(trainer, "train", lambda config: built.append(config) or {})
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(FILE))
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
