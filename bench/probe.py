"""The linear probe under CLIP's protocol beside `eval`'s, on finished bundles: the image tower's features before
the projection (what Radford et al. 2021, appendix A.3, probe for CLIP-ViT) and the served embedding, with the L2
penalty C fixed as `eval` fixes it or chosen on the val split (per emoji) from a log grid; raw pixels for reference.
Prints a table and writes the `probe-protocol` section of docs/BENCHMARKS.md.

    python bench/probe.py --data .cache/data/emoji-16.0.0 --bundles runs/bench-objectives/*-s?-bundle
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.objectives import mean_spread
from bench.report import markdown_table, write_section

SPLITS = ("train", "val", "test")
C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)  # log-spaced, as CLIP sweeps C on a validation split
FEATURES = ("tower features (before projection)", "served embedding")
PIXELS = "raw pixels"


def load_splits(data: str, label: str) -> dict[str, dict]:
    """Per split: images, `label` values and groups (an emoji and its skin-tone variants share one)."""
    from core import data as datasets

    splits = {}
    for split in SPLITS:
        samples = [s for s in datasets.iter_samples(data, split=split) if (s.labels or {}).get(label)]
        splits[split] = {"images": [s.image for s in samples], "labels": np.array([s.labels[label] for s in samples]),
                         "groups": [str(s.group) for s in samples]}
    return splits


def bundle_features(bundle_dir: Path, splits: dict[str, dict]) -> tuple[object, dict[str, dict[str, np.ndarray]]]:
    """(bundle, {feature name: {split: (N, D) features}}): its torch tower's pooled output and its ONNX encoder's
    served embedding."""
    import torch

    from core.bundle import load_bundle
    from core.onnx_encoder import OnnxEncoder
    from core.preprocess import preprocess_batch
    from training.encoders import torch_encoder_from_bundle

    bundle = load_bundle(bundle_dir)
    visual = torch_encoder_from_bundle(bundle_dir).towers["image"].model.visual
    onnx = OnnxEncoder(bundle, providers="cpu")
    tower, served = {}, {}
    for split, rows in splits.items():
        with torch.no_grad():
            tower[split] = visual(torch.from_numpy(preprocess_batch(rows["images"], bundle.preprocess))).numpy()
        served[split] = onnx.encode_images(rows["images"])["embedding"]
    return bundle, dict(zip(FEATURES, (tower, served), strict=True))


def pixel_features(splits: dict[str, dict], image_size: int) -> dict[str, np.ndarray]:
    """Raw pixels at the models' input size, through the same preprocessing."""
    from core.preprocess import PreprocessConfig, preprocess_batch

    config = PreprocessConfig(image_size=image_size)
    return {split: preprocess_batch(rows["images"], config).reshape(len(rows["images"]), -1)
            for split, rows in splits.items()}


def probe_scores(features: dict[str, np.ndarray], splits: dict[str, dict], fixed_c: float) -> dict[str, float]:
    """Test accuracy (per image, per emoji) at `fixed_c` and at the C best on val per emoji; the chosen C."""
    from core.metrics import group_weights, mean_hit, probe_predictions

    n_val = len(features["val"])
    held_out = np.concatenate([features["val"], features["test"]])
    weights = {split: group_weights(splits[split]["groups"]) for split in ("val", "test")}
    by_c = {}
    for c in sorted({*C_GRID, fixed_c}):  # one fit per distinct C: eval's C is usually in the grid
        predicted = probe_predictions(features["train"], splits["train"]["labels"], held_out, c=c)
        hits = {"val": predicted[:n_val] == splits["val"]["labels"],
                "test": predicted[n_val:] == splits["test"]["labels"]}
        by_c[c] = {"val": mean_hit(hits["val"], weights["val"]), "test": mean_hit(hits["test"]),
                   "test_per_emoji": mean_hit(hits["test"], weights["test"])}
    chosen = max(C_GRID, key=lambda c: by_c[c]["val"])  # ties: the stronger penalty, first in the grid
    return {"fixed_test": by_c[fixed_c]["test"], "fixed_test_per_emoji": by_c[fixed_c]["test_per_emoji"],
            "val_c_test": by_c[chosen]["test"], "val_c_test_per_emoji": by_c[chosen]["test_per_emoji"],
            "chosen_c": chosen}


def table(scores: dict[str, list[dict]]) -> tuple[list[str], list[list[str]]]:
    """One row per (objective, features): mean ± half-range over the bundles given."""
    headers = ["objective", "features", "bundles", "LP subcat, C 10 (eval)", "per emoji, C 10",
               "LP subcat, C on val", "per emoji, C on val", "C chosen on val"]
    rows = []
    for key, runs in scores.items():
        objective, features = key.split("|")
        values = [mean_spread([r[k] for r in runs], True)
                  for k in ("fixed_test", "fixed_test_per_emoji", "val_c_test", "val_c_test_per_emoji")]
        rows.append([objective, features, str(len(runs)), *values, ", ".join(f"{r['chosen_c']:g}" for r in runs)])
    return headers, rows


def main() -> None:
    from core.metrics import PROBE_C

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=".cache/data/emoji-16.0.0")
    parser.add_argument("--bundles", type=Path, nargs="+", required=True)
    parser.add_argument("--label", default="subcategory")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    splits = load_splits(args.data, args.label)
    scores: dict[str, list[dict]] = defaultdict(list)
    image_size = None
    for bundle_dir in args.bundles:
        bundle, features = bundle_features(bundle_dir, splits)
        image_size = bundle.preprocess.image_size
        for name, split_features in features.items():
            scores[f"{bundle.objective}|{name}"].append(probe_scores(split_features, splits, PROBE_C))
        print(f"{bundle_dir}: done", file=sys.stderr)
    scores[f"reference|{PIXELS} {image_size}×{image_size}"].append(
        probe_scores(pixel_features(splits, image_size), splits, PROBE_C))
    ordered = sorted(scores, key=lambda key: (key.startswith("reference|"), key))  # objectives, then pixels
    headers, rows = table({key: scores[key] for key in ordered})
    text = markdown_table(headers, rows)
    print(text)
    note = (f"Linear probe on `{args.label}`, trained on the train split, scored on the test split (held-out emoji); "
            f"\"per emoji\": each held-out emoji weighs one. \"C on val\": the inverse L2 penalty that scores best "
            f"per emoji on the val split among {', '.join(f'{c:g}' for c in C_GRID)} (CLIP's protocol sweeps C "
            f"on a validation split); \"C 10\": the fixed C of `eval`. Tower features: the image tower's pooled "
            "output before the contrastive projection, the features CLIP probes for its ViTs; served embedding: "
            "what `eval` probes (the ONNX output, L2-normalised). Standardised features, logistic regression, as "
            "in `eval`.\n\n")
    write_section("probe-protocol", "Linear-probe protocol: CLIP's (features before projection, C on val) vs eval's",
                  note + text)


if __name__ == "__main__":
    main()
