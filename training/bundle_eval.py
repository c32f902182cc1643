"""`eval --bundle`: the evaluation routine run through a bundle's ONNX files, as the service runs them."""

from __future__ import annotations

from pathlib import Path

from core.bundle import load_bundle
from core.evaluation import evaluate
from core.metrics import DEFAULT_TEMPLATES, check_templates
from core.onnx_encoder import OnnxEncoder
from training.evaluate import load_eval_sets


def open_bundle_eval(bundle_dir: Path, data: str, split: str = "test", variant: str = "fp32"):
    """(bundle, its ONNX encoder on the CPU, the labelled eval sets of `data`'s `split`) for evaluating a bundle."""
    bundle = load_bundle(bundle_dir)
    encoder = OnnxEncoder(bundle, providers="cpu", variant=variant)
    return bundle, encoder, load_eval_sets(data, split, known_labels=bundle.label_sets)


def evaluate_bundle(bundle_dir: Path, data: str, split: str = "test", label_sets: list[str] | None = None,
                    variant: str = "fp32", templates: list[str] | None = None) -> dict:
    """Zero-shot, retrieval, linear probe and cluster statistics of a bundle on a labelled data set.

    Zero-shot prompts: `templates` if given, else those the bundle was trained with (its config's `templates`)."""
    bundle, encoder, sets = open_bundle_eval(bundle_dir, data, split, variant)
    templates = check_templates(templates or bundle.config.templates or DEFAULT_TEMPLATES)
    return evaluate(encoder.encode_images, encoder.encode_texts, sets.eval_set, sets.probe_train, sets.label_sets,
                    templates, label_set_names=label_sets, seen_words=sets.seen_words)
