"""Fine-tuning from a checkpoint (`train --init`): a tiny random CLIP written by transformers, an imported bundle
and a bundle trained here, each fine-tuned for a few steps with cluster heads added, locked towers, the lower
learning rate of pretrained weights, exact resume, export and serving."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from core.bundle import load_bundle
from core.onnx_encoder import OnnxEncoder
from core.preprocess import load_image
from training.importer import import_checkpoint
from training.optim import latest_checkpoint
from training.random_checkpoints import save_clip
from training.testing import export_run, make_tiny_bundle, train_run
from training.trainer import TrainConfig, prepare


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_clip(tmp_path_factory.mktemp("ckpt") / "tiny-clip")


def weights(run) -> dict[str, torch.Tensor]:
    return load_file(latest_checkpoint(run / "checkpoints") / "model.safetensors")


def test_xclip_on_pretrained_towers_trains_exports_and_serves(shapes_data, checkpoint, tmp_path):
    run = train_run(shapes_data, tmp_path / "run", "xclip", init=str(checkpoint), max_steps=3)
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["steps"] == 3 and np.isfinite(summary["final_loss"])
    assert json.loads((run / "tokenizer.json").read_text())["model"]["type"] == "BPE"  # the checkpoint's
    bundle = load_bundle(export_run(run, shapes_data, tmp_path / "bundle"))
    assert (bundle.objective, bundle.embed_dim, bundle.tokenizer.context_length) == ("xclip", 16, 77)
    assert bundle.preprocess.resize_mode == "resize_center_crop"
    image = load_image(next((shapes_data / "images").iterdir()))
    out = OnnxEncoder(bundle, providers="cpu").encode_images([image])
    assert out["embedding"].shape == (1, 16) and out["cluster_probs"].shape[1] == bundle.num_clusters


def test_the_init_weights_are_the_checkpoints_and_the_heads_are_new(shapes_data, checkpoint, tmp_path):
    from transformers import CLIPModel

    run = prepare(TrainConfig(data=str(shapes_data), output=str(tmp_path / "run"), objective="xclip",
                              model="tiny", batch_size=8, progress=False, init=str(checkpoint)))
    reference = CLIPModel.from_pretrained(checkpoint)
    torch.testing.assert_close(run.model.visual.tower.state_dict(), reference.vision_model.state_dict())
    torch.testing.assert_close(run.model.text_proj.weight, reference.text_projection.weight)
    assert float(run.model.logit_scale.detach()) == pytest.approx(float(reference.logit_scale.detach()))
    scales = {id(p): g.get("lr_scale", 1.0) for g in run.optimizer.param_groups for p in g["params"]}
    assert scales[id(run.model.visual.tower.embeddings.patch_embedding.weight)] == 0.1
    assert scales[id(run.model.image_head.prototypes)] == 1.0


@pytest.mark.parametrize("unlocked", [0, 1])
def test_a_locked_image_tower_trains_only_its_unlocked_groups(shapes_data, checkpoint, tmp_path, unlocked):
    before = {k: v.clone() for k, v in prepare(TrainConfig(
        data=str(shapes_data), output=str(tmp_path / "probe"), objective="clip", model="tiny", batch_size=8,
        progress=False, init=str(checkpoint))).model.state_dict().items()}
    run = train_run(shapes_data, tmp_path / "run", "clip", init=str(checkpoint), lock_image=True,
                    lock_image_unlocked_groups=unlocked, max_steps=2, eval_every=0)
    after = weights(run)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert not any(k.startswith("visual.") for k in changed)
    assert ("image_proj.weight" in changed) == (unlocked == 1)  # the projection is the last group
    assert any(k.startswith("text.") for k in changed)


def test_a_fine_tuning_run_resumes_exactly(shapes_data, checkpoint, tmp_path):
    def losses(run):
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
                if '"loss"' in line]

    whole = train_run(shapes_data, tmp_path / "whole", "xclip", init=str(checkpoint), max_steps=4,
                      checkpoint_every=2, eval_every=0)
    part = train_run(shapes_data, tmp_path / "part", "xclip", init=str(checkpoint), max_steps=2,
                     checkpoint_every=2, eval_every=0)
    train_run(shapes_data, part, "xclip", init=str(checkpoint), max_steps=4, checkpoint_every=2, eval_every=0)
    np.testing.assert_allclose(losses(part), losses(whole), rtol=1e-5)


def test_init_from_an_imported_bundle_equals_init_from_its_checkpoint(shapes_data, checkpoint, tmp_path):
    bundle = import_checkpoint(checkpoint, tmp_path / "imported")
    runs = [prepare(TrainConfig(data=str(shapes_data), output=str(tmp_path / name), objective="clip",
                                model="tiny", batch_size=8, progress=False, init=str(src)))
            for name, src in (("a", checkpoint), ("b", bundle))]
    torch.testing.assert_close(runs[0].model.state_dict(), runs[1].model.state_dict())


def test_init_from_a_trained_clip_bundle_adds_cluster_heads(shapes_data, tmp_path):
    bundle = make_tiny_bundle(tmp_path / "b", "clip", shapes_data)
    run = prepare(TrainConfig(data=str(shapes_data), output=str(tmp_path / "run"), objective="xclip",
                              model="tiny", batch_size=8, progress=False, init=str(bundle)))
    trained = load_file(bundle / "model.safetensors")
    state = run.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in trained.items())
    assert any(k.startswith("image_head.") for k in state) and not any(k.startswith("image_head.") for k in trained)
