"""bench/probe.py: its served-embedding probe at eval's C is eval's probe; the tower features are the torch
tower's pooled output; C on val is the grid's best on val."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bench.probe import C_GRID, FEATURES, bundle_features, load_splits, probe_scores, table
from core.metrics import PROBE_C, group_weights, mean_hit, probe_predictions
from core.preprocess import preprocess_batch
from training.bundle_eval import evaluate_bundle
from training.encoders import torch_encoder_from_bundle
from training.testing import make_tiny_bundle

TOWER, SERVED = FEATURES


@pytest.fixture(scope="module")
def bundle(shapes_data, tmp_path_factory) -> Path:
    return make_tiny_bundle(tmp_path_factory.mktemp("probe"), "xclip", data=shapes_data)


@pytest.fixture(scope="module")
def splits(shapes_data):
    return load_splits(str(shapes_data), "shape")


def test_the_served_embedding_at_eval_c_scores_as_eval_bundle(bundle, shapes_data, splits):
    _, features = bundle_features(bundle, splits)
    scores = probe_scores(features[SERVED], splits, PROBE_C)
    metrics = evaluate_bundle(bundle, str(shapes_data), split="test")
    assert scores["fixed_test"] == pytest.approx(metrics["linear_probe/shape"])
    assert scores["fixed_test_per_emoji"] == pytest.approx(metrics["linear_probe_by_group/shape"])


def test_tower_features_are_the_pooled_output_before_the_projection(bundle, splits):
    _, features = bundle_features(bundle, splits)
    reference = torch_encoder_from_bundle(bundle)
    model = reference.towers["image"].model
    pixels = torch.from_numpy(preprocess_batch(splits["test"]["images"], reference.preprocess))
    with torch.no_grad():
        np.testing.assert_allclose(features[TOWER]["test"], model.visual(pixels).numpy(), atol=1e-5)
        projected = F.normalize(model.image_proj(torch.from_numpy(features[TOWER]["test"])), dim=-1).numpy()
    np.testing.assert_allclose(projected, features[SERVED]["test"], atol=1e-4)  # projection + norm: served


def test_c_on_val_is_the_grid_value_best_on_val_per_group(splits):
    rng = np.random.default_rng(0)
    features = {split: rng.normal(size=(len(rows["labels"]), 6)) for split, rows in splits.items()}
    scores = probe_scores(features, splits, PROBE_C)
    val_weights = group_weights(splits["val"]["groups"])

    def val_score(c):
        predicted = probe_predictions(features["train"], splits["train"]["labels"], features["val"], c=c)
        return mean_hit(predicted == splits["val"]["labels"], val_weights)

    best = max(val_score(c) for c in C_GRID)
    assert scores["chosen_c"] in C_GRID and val_score(scores["chosen_c"]) == pytest.approx(best)
    predicted = probe_predictions(features["train"], splits["train"]["labels"], features["test"], c=scores["chosen_c"])
    assert scores["val_c_test"] == pytest.approx(mean_hit(predicted == splits["test"]["labels"]))


def test_table_rows_give_the_seed_spread_and_each_chosen_c():
    run = {"fixed_test": 0.4, "fixed_test_per_emoji": 0.3, "val_c_test": 0.5, "val_c_test_per_emoji": 0.45}
    headers, rows = table({"xclip|served embedding": [{**run, "chosen_c": 0.1},
                                                      {**run, "fixed_test": 0.6, "chosen_c": 1.0}]})
    assert len(headers) == len(rows[0]) == 8
    assert rows == [["xclip", "served embedding", "2", "50.0 ± 10.0", "30.0 ± 0.0", "50.0 ± 0.0", "45.0 ± 0.0",
                     "0.1, 1"]]
