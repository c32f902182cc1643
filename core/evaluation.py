"""The one evaluation routine: zero-shot, retrieval, linear probe and cluster health of a pair of encoders.

Training-time evaluation (torch encoders) and `eval --bundle` (ONNX encoders) both call `evaluate`; the
encoders are plain callables returning {"embedding": (N, D) normalised, optionally "cluster_probs": (N, K)}.

Where several images share a group (the emoji data's skin-tone variants of one base emoji), zero-shot and probe
accuracy are also given per group (`zeroshot_by_group/...`, `linear_probe_by_group/...`): each group weighs one, so
a held-out emoji drawn in 26 skin tones does not count 26 times.

Given the words of the training captions, text→image recall is also split into queries whose every word was seen in
training and queries with a novel word (`retrieval_seen_words/...`, `retrieval_novel_words/...`), as open-vocabulary
detection reports base and novel classes apart (Zareian et al. 2021, OVR-CNN): no caption-trained model can place a
word it never read.

Where images carry facets with two values or more (the multi-vendor emoji data's `{"vendor": "twitter"}`),
retrieval and zero-shot are also reported on each value's images alone, as their own gallery
(`by_vendor/twitter/retrieval/t2i_r1`, ...): the figures `evaluate` gives for that subset by itself.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from core.metrics import (
    DEFAULT_TEMPLATES,
    cluster_stats,
    ensemble_class_embeddings,
    group_weights,
    mean_hit,
    probe_predictions,
    retrieval_recall,
    seen_word_mask,
    zero_shot_accuracy,
)

logger = logging.getLogger(__name__)

EncodeImages = Callable[[list[Image.Image]], dict[str, np.ndarray]]
EncodeTexts = Callable[[list[str]], dict[str, np.ndarray]]
PROBE_TRAIN_FRAC = 0.7  # share of groups used to train the probe when no separate probe set is given
SPLIT_SEED = 0


@dataclasses.dataclass
class EvalSet:
    """Images with their query text (first caption), group, and per-image label and facet values (None when
    unknown)."""

    images: list[Image.Image]
    texts: list[str]
    groups: list[str]
    labels: dict[str, list[str | None]] = dataclasses.field(default_factory=dict)
    facets: dict[str, list[str | None]] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        n = len(self.images)
        columns = [*self.labels.values(), *self.facets.values()]
        lengths = [len(self.texts), len(self.groups), *(len(v) for v in columns)]
        if any(length != n for length in lengths):
            raise ValueError(f"EvalSet fields must all have {n} entries, got {lengths}")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, indices: Sequence[int]) -> EvalSet:
        """The images at `indices`, with their texts, groups, labels and facets."""
        return EvalSet(
            images=[self.images[i] for i in indices],
            texts=[self.texts[i] for i in indices],
            groups=[self.groups[i] for i in indices],
            labels={name: [values[i] for i in indices] for name, values in self.labels.items()},
            facets={name: [values[i] for i in indices] for name, values in self.facets.items()},
        )


def eval_set_from_samples(samples: Iterable) -> EvalSet:
    """Build an EvalSet from objects with `image`, `texts`, `labels` ({name: value}), `group` and, optionally,
    `facets` ({name: value})."""
    samples = list(samples)
    if any(not s.texts for s in samples):
        raise ValueError("every evaluation sample needs at least one caption")
    return EvalSet(
        images=[s.image for s in samples],
        texts=[s.texts[0] for s in samples],
        groups=[str(s.group) for s in samples],
        labels=_value_columns([s.labels for s in samples]),
        facets=_value_columns([getattr(s, "facets", None) for s in samples]),
    )


def _value_columns(rows: Sequence[dict | None]) -> dict[str, list[str | None]]:
    """Per-sample {name: value} dicts as one column of values per name, None where a sample has none."""
    names = sorted({name for row in rows for name in (row or {})})
    return {name: [_label_value((row or {}).get(name)) for row in rows] for name in names}


def _label_value(value: object) -> str | None:
    """A label value as a string; None and "" mean unknown."""
    return None if value is None or value == "" else str(value)


def group_queries(eval_set: EvalSet) -> tuple[list[str], list[str]]:
    """One text query per distinct group (its first text), in order of first appearance; (texts, groups)."""
    first_text: dict[str, str] = {}
    for text, group in zip(eval_set.texts, eval_set.groups, strict=True):
        first_text.setdefault(group, text)
    return list(first_text.values()), list(first_text)


def split_by_group(groups: Sequence[str], train_frac: float = PROBE_TRAIN_FRAC, seed: int = SPLIT_SEED):
    """Deterministic (train_idx, test_idx) with every group wholly on one side; needs >= 2 groups."""
    distinct = sorted(set(groups))
    if len(distinct) < 2:
        raise ValueError("a group split needs at least two groups")
    order = np.random.default_rng(seed).permutation(len(distinct))
    n_train = min(max(round(train_frac * len(distinct)), 1), len(distinct) - 1)
    train_groups = {distinct[i] for i in order[:n_train]}
    in_train = np.array([g in train_groups for g in groups])
    return np.flatnonzero(in_train), np.flatnonzero(~in_train)


def evaluate(
    encode_images: EncodeImages,
    encode_texts: EncodeTexts,
    eval_set: EvalSet,
    probe_train: EvalSet | None,
    label_sets: dict[str, list[str]],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    label_set_names: list[str] | None = None,
    seen_words: frozenset[str] | None = None,
) -> dict[str, float | int | bool]:
    """All metrics of a pair of encoders on `eval_set`, keyed `retrieval/...`, `zeroshot/<set>/...`, etc.;
    with `seen_words` (the training captions' words), also retrieval of seen-word and novel-word queries; with
    facets of two values or more, retrieval and zero-shot of each value's images (`by_<facet>/<value>/...`)."""
    encode_texts = _TextMemo(encode_texts)  # the per-facet metrics ask again for the same queries and prompts
    image_out = encode_images(eval_set.images)
    query_texts, _ = group_queries(eval_set)
    text_out = encode_texts(query_texts)
    names = select_label_sets(label_sets, eval_set, label_set_names)
    gallery_metrics = functools.partial(_gallery_metrics, encode_texts, label_sets=label_sets, names=names,
                                        templates=templates, seen_words=seen_words)  # (image_emb, eval_set)
    results: dict[str, float | int | bool] = gallery_metrics(image_out["embedding"], eval_set)
    results.update(_linear_probes(encode_images, image_out["embedding"], eval_set, probe_train, names))
    for modality, out in (("image", image_out), ("text", text_out)):
        if "cluster_probs" in out and len(out["cluster_probs"]):
            results.update(
                {f"clusters/{modality}/{k}": v for k, v in cluster_stats(out["cluster_probs"]).items()}
            )
    results.update(_facet_metrics(image_out["embedding"], eval_set, gallery_metrics))
    logger.info(
        "evaluated %d images, %d text queries: %d metrics", len(eval_set), len(query_texts), len(results)
    )
    return results


def _gallery_metrics(
    encode_texts: EncodeTexts,
    image_emb: np.ndarray,
    eval_set: EvalSet,
    label_sets: dict[str, list[str]],
    names: list[str],
    templates: Sequence[str],
    seen_words: frozenset[str] | None,
) -> dict[str, float | int]:
    """Retrieval (and its seen/novel-word halves) and zero-shot of `eval_set`'s images as the gallery."""
    query_texts, query_groups = group_queries(eval_set)
    query_emb = encode_texts(query_texts)["embedding"]
    recall = retrieval_recall(image_emb, eval_set.groups, query_emb, query_groups)
    results = {f"retrieval/{name}": value for name, value in recall.items()}
    if seen_words is not None:
        results.update(novelty_recall(image_emb, eval_set.groups, query_emb, query_texts, query_groups, seen_words))
    for name in names:
        results.update(zero_shot_metrics(encode_texts, image_emb, eval_set, name, label_sets[name], templates))
    return results


def _facet_metrics(
    image_emb: np.ndarray, eval_set: EvalSet, metrics_of: Callable[[np.ndarray, EvalSet], dict]
) -> dict[str, float | int]:
    """`by_<facet>/<value>/<metric>`: `metrics_of(embeddings, images)` on each facet value's images alone, for
    the facets with two values or more (one value would repeat the overall figures)."""
    results = {}
    for facet, values in sorted(eval_set.facets.items()):
        distinct = sorted({value for value in values if value is not None})
        if len(distinct) < 2:
            continue
        for value in distinct:
            keep = [i for i, v in enumerate(values) if v == value]
            subset_metrics = metrics_of(image_emb[keep], eval_set.subset(keep))
            results.update({f"by_{facet}/{value}/{name}": metric for name, metric in subset_metrics.items()})
    return results


class _TextMemo:
    """A text encoder that encodes each text once: later calls are served rows of the earlier outputs, and a
    call with only new texts reaches the wrapped encoder exactly as made."""

    def __init__(self, encode_texts: EncodeTexts):
        self.encode_texts = encode_texts
        self.rows: dict[str, dict[str, np.ndarray]] = {}  # text -> {output name: (D,) row}

    def __call__(self, texts: list[str]) -> dict[str, np.ndarray]:
        if not texts:
            return self.encode_texts(texts)
        new = [text for text in texts if text not in self.rows]
        if new:
            out = self.encode_texts(new)
            for i, text in enumerate(new):
                self.rows.setdefault(text, {name: rows[i] for name, rows in out.items()})
        return {name: np.stack([self.rows[text][name] for text in texts]) for name in self.rows[texts[0]]}


def novelty_recall(
    image_emb: np.ndarray,
    image_groups: Sequence[str],
    text_emb: np.ndarray,
    query_texts: Sequence[str],
    query_groups: Sequence[str],
    seen_words: frozenset[str],
) -> dict[str, float | int]:
    """Text→image recall of the queries whose every word is in `seen_words` (`retrieval_seen_words/t2i_r{k}`) and of
    the rest (`retrieval_novel_words/...`), each with its number of `queries`; a side without queries has no recall."""
    seen = seen_word_mask(query_texts, seen_words)
    results: dict[str, float | int] = {}
    for part, keep in (("seen_words", seen), ("novel_words", ~seen)):
        results[f"retrieval_{part}/queries"] = int(keep.sum())
        if keep.any():
            groups = [query_groups[i] for i in np.flatnonzero(keep)]
            recall = retrieval_recall(image_emb, image_groups, text_emb[keep], groups)
            results.update({f"retrieval_{part}/{k}": v for k, v in recall.items() if k.startswith("t2i_")})
    return results


def select_label_sets(
    label_sets: dict[str, list[str]], eval_set: EvalSet, requested: list[str] | None
) -> list[str]:
    """The label sets to score: those requested (all must exist), else every set the eval data labels."""
    if requested is not None:
        unknown = [n for n in requested if n not in label_sets or n not in eval_set.labels]
        if unknown:
            raise ValueError(f"label sets {unknown} are not both in the bundle and labelled in the eval data")
        return list(requested)
    return [name for name in label_sets if name in eval_set.labels]


def _known(values: Sequence[str | None]) -> np.ndarray:
    """Indices of the images whose label value is known."""
    return np.array([i for i, v in enumerate(values) if v is not None], dtype=np.int64)


def zero_shot_metrics(
    encode_texts: EncodeTexts,
    image_emb: np.ndarray,
    eval_set: EvalSet,
    name: str,
    classnames: list[str],
    templates: Sequence[str],
) -> dict[str, float]:
    """`zeroshot/<name>/top{k}` over images labelled in `name`; values outside the label set count wrong."""
    values = eval_set.labels[name]
    keep = _known(values)
    if len(keep) == 0 or not classnames:
        logger.warning("zero-shot %s skipped: no labelled images or no classes", name)
        return {}
    index = {c: i for i, c in enumerate(classnames)}
    labels = np.array([index.get(values[i], -1) for i in keep])
    if (labels < 0).any():
        logger.warning(
            "zero-shot %s: %d images have labels outside the label set", name, int((labels < 0).sum())
        )
    class_emb = ensemble_class_embeddings(lambda t: encode_texts(t)["embedding"], classnames, templates)
    results = {f"zeroshot/{name}/{k}": v for k, v in zero_shot_accuracy(image_emb[keep], class_emb, labels).items()}
    groups = [eval_set.groups[i] for i in keep]
    if _groups_repeat(groups):
        by_group = zero_shot_accuracy(image_emb[keep], class_emb, labels, weights=group_weights(groups))
        results.update({f"zeroshot_by_group/{name}/{k}": v for k, v in by_group.items()})
    return results


def _groups_repeat(groups: Sequence[str]) -> bool:
    """True when some group has several images: only then do per-group accuracies differ from per-image ones."""
    return len(set(groups)) < len(groups)


def _probe_data(
    encode_images: EncodeImages, image_emb: np.ndarray, eval_set: EvalSet, probe_train: EvalSet | None
) -> tuple[np.ndarray, dict, np.ndarray, dict, list[str]]:
    """(train_x, train_labels, test_x, test_labels, test_groups): probe set vs eval_set, or a 70/30 group split."""
    if probe_train is not None:
        train_x = encode_images(probe_train.images)["embedding"]
        return train_x, probe_train.labels, image_emb, eval_set.labels, eval_set.groups
    train_idx, test_idx = split_by_group(eval_set.groups)
    train_labels = {n: [v[i] for i in train_idx] for n, v in eval_set.labels.items()}
    test_labels = {n: [v[i] for i in test_idx] for n, v in eval_set.labels.items()}
    test_groups = [eval_set.groups[i] for i in test_idx]
    return image_emb[train_idx], train_labels, image_emb[test_idx], test_labels, test_groups


def _linear_probes(
    encode_images: EncodeImages,
    image_emb: np.ndarray,
    eval_set: EvalSet,
    probe_train: EvalSet | None,
    names: list[str],
) -> dict[str, float]:
    """`linear_probe/<name>` for each label set with labelled images on both sides of the split, and
    `linear_probe_by_group/<name>` (each group weighs one) when a group has several test images."""
    if not names or (probe_train is None and len(set(eval_set.groups)) < 2):
        return {}
    train_x, train_labels, test_x, test_labels, groups = _probe_data(encode_images, image_emb, eval_set, probe_train)
    results = {}
    for name in names:
        train_keep, test_keep = _known(train_labels.get(name, [])), _known(test_labels[name])
        if len(train_keep) == 0 or len(test_keep) == 0:
            logger.warning("linear probe %s skipped: no labelled images on one side", name)
            continue
        train_y = [train_labels[name][i] for i in train_keep]
        hits = probe_predictions(train_x[train_keep], train_y, test_x[test_keep]) == np.array(
            [test_labels[name][i] for i in test_keep]
        )
        results[f"linear_probe/{name}"] = mean_hit(hits)
        test_groups = [groups[i] for i in test_keep]
        if _groups_repeat(test_groups):
            results[f"linear_probe_by_group/{name}"] = mean_hit(hits, group_weights(test_groups))
    return results
