"""Training on streamed data through the real trainer: 2 DataLoader workers, interrupted and resumed, the loss
curve of an uninterrupted run; and the auto data mode's choice."""

from __future__ import annotations

import json

import numpy as np

from training.testing import train_run


def losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in line]


def test_a_streamed_run_resumes_on_the_uninterrupted_loss_curve(shapes_data, tmp_path):
    common = {"data_mode": "stream", "stream_workers": 2, "checkpoint_every": 2, "eval_every": 0, "epochs": 2}
    whole = train_run(shapes_data, tmp_path / "whole", "xclip", max_steps=4, **common)
    part = train_run(shapes_data, tmp_path / "part", "xclip", max_steps=2, **common)
    train_run(shapes_data, part, "xclip", max_steps=4, **common)
    assert len(losses(whole)) == 4  # crossing an epoch boundary (3 steps an epoch)
    np.testing.assert_allclose(losses(part), losses(whole), rtol=1e-5)
    summary = json.loads((whole / "metrics.json").read_text())
    assert summary["train_samples"] == 24  # the shapes' train split, counted without decoding


def test_auto_streams_what_exceeds_the_cache_budget(shapes_data, tmp_path, caplog):
    caplog.set_level("INFO", logger="training.trainer")
    train_run(shapes_data, tmp_path / "run", "clip", max_steps=1, eval_every=0, cache_budget_mb=0)
    assert "data mode stream" in caplog.text
