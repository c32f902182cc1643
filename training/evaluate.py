"""Training-side evaluation: the data set's eval split and probe set, scored by core's one evaluation routine."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from core import data as datasets
from core.evaluation import EvalSet, eval_set_from_samples, evaluate
from core.metrics import DEFAULT_TEMPLATES, caption_words
from core.preprocess import PreprocessConfig
from core.tokenizer import TextTokenizer
from training.encoders import TorchEncoder
from training.model import DualEncoder


@dataclasses.dataclass
class EvalSets:
    eval_set: EvalSet
    probe_train: EvalSet | None  # linear-probe training images (the train split), None: split eval_set
    label_sets: dict[str, list[str]]
    seen_words: frozenset[str] | None = None  # every word of the training captions; None without a train split


def load_eval_sets(source: str, split: str = "val", known_labels: dict[str, list[str]] | None = None) -> EvalSets:
    """The eval split (all data when the set has no split) and, when there is one, the train split for probes.

    Zero-shot classes are every value of a label seen in the data or in `known_labels` (a bundle's label sets),
    not only the values present in the eval split."""
    present = datasets.splits_present(source)
    eval_split = split if split in present else None
    samples, _ = datasets.load_samples(source, split=eval_split, max_bad_fraction=1.0)
    classes = datasets.label_sets(samples)
    probe, seen_words = None, None
    if eval_split is not None and eval_split != "train" and "train" in present:
        train_samples = datasets.load_samples(source, split="train", max_bad_fraction=1.0)[0]
        probe = eval_set_from_samples(train_samples)
        seen_words = frozenset(word for s in train_samples for text in s.texts for word in caption_words(text))
        classes = _merge(classes, datasets.label_sets(train_samples))
    return EvalSets(eval_set_from_samples(samples), probe, _merge(classes, known_labels or {}, only=classes),
                    seen_words)


def _merge(a: dict[str, list[str]], b: dict[str, list[str]], only: dict | None = None) -> dict[str, list[str]]:
    names = set(a) | set(b) if only is None else set(only)
    return {n: sorted(set(a.get(n, [])) | set(b.get(n, []))) for n in names}


def evaluate_model(model: DualEncoder, tokenizer: TextTokenizer, preprocess: PreprocessConfig,
                   sets: EvalSets, templates: Sequence[str] = DEFAULT_TEMPLATES) -> dict:
    """Zero-shot (with `templates`), retrieval, linear probe and cluster statistics of a torch model (its served
    outputs, cluster temperature included)."""
    encoder = TorchEncoder(model, tokenizer, preprocess)
    return evaluate(encoder.encode_images, encoder.encode_texts, sets.eval_set, sets.probe_train, sets.label_sets,
                    templates, seen_words=sets.seen_words)
