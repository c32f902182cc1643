"""Training loop behaviour a user relies on: exact resume after an interruption, and DDP == one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training import trainer
from training.augment import STYLE_PRESETS, AugmentConfig
from training.losses import NClipConfig
from training.optim import latest_checkpoint
from training.plots import read_metrics
from training.trainer import TrainConfig, train

REPO = Path(__file__).resolve().parents[2]


def tiny_config(data: Path, output: Path, **overrides) -> TrainConfig:
    fields = {"data": str(data), "output": str(output), "model": "tiny", "objective": "xclip", "epochs": 3, "batch_size": 8,
                  "warmup_steps": 2, "checkpoint_every": 2, "progress": False, "lr": 2e-3}
    return TrainConfig(**{**fields, **overrides})


def losses(run_dir: Path) -> list[tuple[int, float, float]]:
    steps, _ = read_metrics(run_dir)
    return [(r["step"], r["loss"], r["grad_norm"]) for r in steps]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(latest_checkpoint(run_dir / "checkpoints") / "model.safetensors")


def test_resume_after_crash_reproduces_uninterrupted_curve(shapes_data, tmp_path, monkeypatch):
    train(tiny_config(shapes_data, tmp_path / "straight"))
    real_step = trainer.train_step

    def crash_at_step_6(run, step):
        if step == 5:
            raise KeyboardInterrupt("simulated interruption")
        return real_step(run, step)

    monkeypatch.setattr(trainer, "train_step", crash_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(shapes_data, tmp_path / "resumed"))
    assert latest_checkpoint(tmp_path / "resumed" / "checkpoints").name == "step_0000004"
    monkeypatch.setattr(trainer, "train_step", real_step)
    train(tiny_config(shapes_data, tmp_path / "resumed"))

    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert [s for s, *_ in resumed] == list(range(1, 10))
    assert resumed == straight  # bit-identical loss and gradient-norm curves
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_no_resume_starts_over(shapes_data, tmp_path):
    train(tiny_config(shapes_data, tmp_path / "run", max_steps=2))
    train(tiny_config(shapes_data, tmp_path / "run", max_steps=2, resume=False))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval" not in r] == [1, 2]  # the first run's log is gone


def _torchrun(config: TrainConfig, nproc: int, tmp_path: Path) -> None:
    cfg_file = tmp_path / f"cfg{nproc}.json"
    cfg_file.write_text(json.dumps(config.to_dict()))
    script = "import json,sys; from training.trainer import TrainConfig, train; " \
             "train(TrainConfig.from_dict(json.load(open(sys.argv[1]))))"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0", "--no-python",
           sys.executable, "-c", script, str(cfg_file)]
    subprocess.run(cmd, check=True, env=env, cwd=REPO, timeout=300)


@pytest.mark.parametrize("objective, multi_positive, style", [("clip", False, "none"), ("xclip", True, "none"),
                                                              ("xclip", True, "strong")])
def test_two_process_ddp_matches_single_process(shapes_data, tmp_path, objective, multi_positive, style):
    """Multi-positive targets need every rank's caption keys: batches of 8 shape captions repeat captions. Style
    augmentations are drawn for the global batch, so each rank styles its rows as one process does."""
    common = {"objective": objective, "max_steps": 3, "epochs": 1, "checkpoint_every": 100,
              "multi_positive": multi_positive, "augment": AugmentConfig(**STYLE_PRESETS[style])}
    _torchrun(tiny_config(shapes_data, tmp_path / "single", **common), 1, tmp_path)
    _torchrun(tiny_config(shapes_data, tmp_path / "ddp", **common), 2, tmp_path)
    single, ddp = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert len(single) == 3
    for (s1, loss1, grad1), (s2, loss2, grad2) in zip(single, ddp):
        assert s1 == s2
        assert loss2 == pytest.approx(loss1, rel=1e-5, abs=1e-6)
        assert grad2 == pytest.approx(grad1, rel=1e-4)
    a, b = final_weights(tmp_path / "single"), final_weights(tmp_path / "ddp")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


def test_a_collapsed_nclip_run_says_so_in_log_and_metrics(shapes_data, tmp_path, caplog):
    from training.losses import NClipConfig

    collapsing = NClipConfig(stop_gradient=False, balancing="none", lambda_he=0.0, lambda_eh=1.0)
    with caplog.at_level("WARNING", logger="training.trainer"):
        summary = train(tiny_config(shapes_data, tmp_path / "run", objective="nclip", nclip=collapsing,
                                    epochs=4, lr=5e-3))
    assert summary["eval"]["clusters/image/collapsed"]
    stored = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert stored["eval"]["clusters/image/collapsed"]
    assert "COLLAPSED" in caplog.text


@pytest.mark.parametrize("templates", [[], ["no placeholder"], ["{} and {}"]])
def test_templates_without_exactly_one_placeholder_are_refused(tmp_path, templates):
    with pytest.raises(ValueError, match="exactly one"):
        tiny_config(tmp_path, tmp_path / "run", templates=templates)


@pytest.mark.parametrize("flags, message", [(["--template", "no placeholder"], "exactly one"),
                                           (["--label-prompt-prob", "1.5"], "label_prompt_prob")])
def test_train_cli_refuses_bad_prompt_options_before_training(tmp_path, flags, message):
    from typer.testing import CliRunner

    from xclip_serve.cli import app

    result = CliRunner().invoke(app, ["train", "--data", str(tmp_path), "--output", str(tmp_path / "run"), *flags])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "run").exists()


def test_label_prompts_are_the_label_in_the_first_template_and_none_without_it(tmp_path, caplog):
    from core.data import Sample

    cfg = tiny_config(tmp_path, tmp_path / "run", templates=["a {} icon", "{}"], label_prompt_prob=0.5,
                      label_prompt_set="shape")
    samples = [Sample("a", None, ["x"], {"shape": "circle"}), Sample("b", None, ["y"], {"colour": "red"})]
    assert cfg.label_prompts(samples) == ["a circle icon", None]
    assert tiny_config(tmp_path, tmp_path / "run", label_prompt_prob=0.0).label_prompts(samples) is None
    # data without the label set (the default "subcategory" here) trains on its captions alone, and says so
    assert tiny_config(tmp_path, tmp_path / "run").label_prompts(samples) is None
    assert "no training sample has a 'subcategory' label" in caplog.text
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        tiny_config(tmp_path, tmp_path / "run", label_prompt_prob=-0.1)


def test_a_run_with_label_prompts_trains_and_evaluates(shapes_data, tmp_path, monkeypatch):
    from training.losses import NClipLoss

    told = []  # what the nCLIP loss learns of each batch: which rows are label prompts
    forward = NClipLoss.forward
    monkeypatch.setattr(NClipLoss, "forward", lambda self, i, t, rows=None: told.append(rows) or forward(self, i, t, rows))
    summary = train(tiny_config(shapes_data, tmp_path / "run", epochs=1, label_prompt_prob=0.5,
                                label_prompt_set="shape", templates=["a {} shape"]))
    assert "zeroshot/shape/top1" in summary["eval"]
    assert len(told) == summary["steps"] and all(r is not None and r.dtype == torch.bool for r in told)
    assert 0 < float(torch.cat(told).float().mean()) < 1  # some rows of the run were prompts, some captions
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["train"]["label_prompt_prob"] == 0.5


@pytest.mark.parametrize("objective, expected", [("nclip", (10, 1.5, True)), ("xclip", (3, 1.0, False)),
                                                 ("clip", (None, None, None))])
def test_the_run_config_records_the_nclip_values_its_objective_trains_with(tmp_path, objective, expected):
    """train_config.json (and so the bundle) says which per-objective nCLIP defaults a run used."""
    nclip = tiny_config(tmp_path, tmp_path / "run", objective=objective).to_dict()["nclip"]
    assert (nclip["sinkhorn_iters"], nclip["lambda_he"], nclip["prompt_targets"]) == expected
    chosen = tiny_config(tmp_path, tmp_path / "run", objective="nclip",
                         nclip=NClipConfig(sinkhorn_iters=3)).nclip
    assert (chosen.sinkhorn_iters, chosen.lambda_he) == (3, 1.5)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from training.random_checkpoints import save_clip

    return save_clip(tmp_path_factory.mktemp("ckpt") / "tiny-clip")


@pytest.mark.parametrize("case", ["init", "stream"])
def test_two_process_ddp_matches_single_process_when_fine_tuning_or_streaming(shapes_data, tmp_path, case,
                                                                               tiny_checkpoint):
    """Pretrained towers (their lower learning rate included), and streamed batches whose label-prompt rows each
    rank knows only for its own share (gathered), train as one process does."""
    extra = ({"init": str(tiny_checkpoint)} if case == "init" else
             {"data_mode": "stream", "stream_workers": 0, "label_prompt_prob": 0.5, "label_prompt_set": "shape"})
    common = {"objective": "xclip", "max_steps": 3, "epochs": 1, "checkpoint_every": 100, **extra}
    _torchrun(tiny_config(shapes_data, tmp_path / "single", **common), 1, tmp_path)
    _torchrun(tiny_config(shapes_data, tmp_path / "ddp", **common), 2, tmp_path)
    single, ddp = losses(tmp_path / "single"), losses(tmp_path / "ddp")
    assert len(single) == 3
    for (s1, loss1, _), (s2, loss2, _) in zip(single, ddp):
        assert s1 == s2 and loss2 == pytest.approx(loss1, rel=1e-5, abs=1e-6)
