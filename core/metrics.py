"""Evaluation metrics on numpy embeddings: zero-shot accuracy, retrieval recall, linear probe, cluster health.

Pure functions shared by training-time evaluation and `eval --bundle`; embeddings are assumed L2-normalised.
"""

from __future__ import annotations

import logging
import re
import string
import warnings
from collections.abc import Callable, Sequence

import numpy as np

logger = logging.getLogger(__name__)

# The zero-shot prompt of the default emoji data set: the form its captions carry label words in ("a {} emoji").
# Chosen on the val split, per emoji (3 seeds each): zero-shot subcategory 28.5 vs 19.5% for xCLIP and 26.4 vs 19.7%
# for CLIP against the earlier six-template ensemble ("{}", "an icon of {}", ... forms no caption has); nCLIP, which
# scores through its clusters, 24.8 vs 25.9. For other data, train with your own (`train --template "a photo of a
# {}."`): the bundle records them, and evaluation and the service use them.
DEFAULT_TEMPLATES = ("a {} emoji",)

# A cluster head is "collapsed" when it carries under 0.5 nats of information about the input (entropy_gap,
# the mutual information I(x; cluster)), or when its hard assignments use under 1% of the K clusters.
COLLAPSE_MIN_ENTROPY_GAP = 0.5
COLLAPSE_MIN_USED_FRAC = 0.01

# Linear probe: logistic regression on standardised features with a fixed, weak L2 penalty. CLIP sweeps C; here a
# sweep of (0.01, 0.1, 1, 10) cost 90 s per evaluation on the emoji set (2 cores) and picked C=10 (val accuracy
# 0.610 vs 0.595 at C=1 and 0.545 at C=0.1), so evaluation uses C=10 with a loose tolerance (~4 s per label set).
PROBE_C = 10.0
PROBE_MAX_ITER = 300
PROBE_TOL = 1e-3


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of each row's k highest scores, best first; (Q, k)."""
    k = min(k, scores.shape[1])
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def check_templates(templates: Sequence[str]) -> tuple[str, ...]:
    """The prompt templates as a tuple; ValueError unless there is at least one and each has exactly one "{}"
    and no other replacement field or stray brace (literal braces are written "{{" and "}}")."""
    templates = tuple(templates)
    bad = next((t for t in templates if not _one_placeholder(t)), None) if templates else "(none)"
    if bad is not None:
        raise ValueError(f"every template must contain exactly one '{{}}' and no other braces (write '{{{{' or "
                         f"'}}}}' for a literal one); {bad!r} does not")
    return templates


def _one_placeholder(template: object) -> bool:
    """`template` is a str whose only replacement field is a bare "{}" (what `str.format(label)` fills)."""
    if not isinstance(template, str):
        return False
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                  if name is not None]
    except ValueError:  # a single '{' or '}'
        return False
    return fields == [("", "", None)]


def group_weights(groups: Sequence[str]) -> np.ndarray:
    """Per-sample weights 1 / (samples in its group): each group weighs 1 whatever its number of images."""
    _, inverse, counts = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True,
                                   return_counts=True)
    return 1.0 / counts[inverse]


def mean_hit(hits: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Accuracy from boolean hits: the plain mean, or weighted by `weights` (e.g. `group_weights`)."""
    return float(np.average(hits, weights=weights))


def zero_shot_accuracy(
    image_emb: np.ndarray,
    class_emb: np.ndarray,
    labels: np.ndarray,
    ks: Sequence[int] = (1, 5),
    weights: np.ndarray | None = None,
) -> dict[str, float]:
    """Share of images whose true class index is among the k most similar class embeddings (weighted if given)."""
    labels = np.asarray(labels)
    ranked = _top_k(image_emb @ class_emb.T, max(ks))  # (N, k) class indices
    hits = ranked == labels[:, None]
    return {f"top{k}": mean_hit(hits[:, :k].any(axis=1), weights) for k in ks}


def _recall_at_k(scores: np.ndarray, query_groups: np.ndarray, gallery_groups: np.ndarray, ks) -> list[float]:
    """For each k, the fraction of queries with a same-group gallery item in their top k."""
    ranked = _top_k(scores, max(ks))
    hits = gallery_groups[ranked] == query_groups[:, None]  # (Q, k)
    return [float(hits[:, :k].any(axis=1).mean()) for k in ks]


# A caption's words for the seen/novel split of retrieval queries: casefolded runs of letters and digits.
WORD = re.compile(r"\w+")


def caption_words(text: str) -> set[str]:
    """The words of a caption, as the seen/novel query split counts them ("Thumbs-up sign" → thumbs, up, sign)."""
    return set(WORD.findall(text.casefold()))


def seen_word_mask(texts: Sequence[str], vocabulary: set[str] | frozenset[str]) -> np.ndarray:
    """(T,) bool: True where every word of the text occurs in `vocabulary` (e.g. the training captions' words)."""
    return np.array([caption_words(t) <= vocabulary for t in texts], dtype=bool)


def retrieval_recall(
    image_emb: np.ndarray,
    image_groups: Sequence[str],
    text_emb: np.ndarray,
    text_groups: Sequence[str],
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@k both ways: `t2i_r{k}` (texts query the images) and `i2t_r{k}` (images query the texts)."""
    image_groups = np.asarray(image_groups, dtype=object)
    text_groups = np.asarray(text_groups, dtype=object)
    scores = text_emb @ image_emb.T  # (T, N)
    t2i = _recall_at_k(scores, text_groups, image_groups, ks)
    i2t = _recall_at_k(scores.T, image_groups, text_groups, ks)
    return {
        **{f"t2i_r{k}": r for k, r in zip(ks, t2i, strict=True)},
        **{f"i2t_r{k}": r for k, r in zip(ks, i2t, strict=True)},
    }


def _fit_probe(train_x: np.ndarray, train_y: np.ndarray, c: float, seed: int):
    """Standardise-then-logistic-regression pipeline fitted on the training features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    regression = LogisticRegression(C=c, max_iter=PROBE_MAX_ITER, tol=PROBE_TOL, random_state=seed)
    probe = make_pipeline(StandardScaler(), regression)
    return probe.fit(train_x, train_y)


def probe_predictions(
    train_x: np.ndarray, train_y: Sequence, test_x: np.ndarray, seed: int = 0, c: float = PROBE_C
) -> np.ndarray:
    """The labels a logistic-regression probe (inverse L2 penalty `c`) fitted on frozen training features predicts
    for `test_x`."""
    train_y = np.asarray(train_y)
    if len(train_y) == 0 or len(test_x) == 0:
        raise ValueError("a linear probe needs at least one training and one test example")
    classes = np.unique(train_y)
    if len(classes) == 1:  # nothing to learn: the probe can only answer the one class it saw
        return np.full(len(test_x), classes[0], dtype=train_y.dtype)
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # the loose tolerance is deliberate
        predictions = _fit_probe(train_x, train_y, c, seed).predict(test_x)
    logger.debug("linear probe: C=%s, %d classes, %d train", c, len(classes), len(train_y))
    return predictions


def linear_probe(
    train_x: np.ndarray,
    train_y: Sequence,
    test_x: np.ndarray,
    test_y: Sequence,
    seed: int = 0,
    weights: np.ndarray | None = None,
) -> float:
    """Test accuracy (weighted if given) of a probe on frozen features; unseen test labels count as wrong."""
    if len(test_y) != len(test_x):
        raise ValueError(f"test_x has {len(test_x)} rows but test_y {len(test_y)} labels")
    return mean_hit(probe_predictions(train_x, train_y, test_x, seed) == np.asarray(test_y), weights)


def _entropy(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy in nats along the last axis."""
    p = np.clip(probs, 1e-12, 1.0)
    return -(probs * np.log(p)).sum(axis=-1)


def cluster_stats(probs: np.ndarray) -> dict[str, float | int | bool]:
    """Health of (N, K) cluster assignments: clusters used, per-sample and marginal entropy, collapse flag."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] == 0:
        raise ValueError(f"cluster_stats needs a non-empty (N, K) array, got shape {probs.shape}")
    clusters_used = len(np.unique(probs.argmax(axis=1)))
    used_frac = clusters_used / probs.shape[1]
    mean_entropy = float(_entropy(probs).mean())
    entropy_of_mean = float(_entropy(probs.mean(axis=0)))
    entropy_gap = entropy_of_mean - mean_entropy  # I(x; cluster) estimate
    return {
        "clusters_used": clusters_used,
        "clusters_used_frac": used_frac,
        "mean_entropy": mean_entropy,
        "entropy_of_mean": entropy_of_mean,
        "entropy_gap": entropy_gap,
        "collapsed": bool(entropy_gap < COLLAPSE_MIN_ENTROPY_GAP or used_frac < COLLAPSE_MIN_USED_FRAC),
    }


def ensemble_class_embeddings(
    encode_texts: Callable[[list[str]], np.ndarray], classnames: list[str], templates: Sequence[str]
) -> np.ndarray:
    """CLIP prompt ensembling: per class, the renormalised mean of its unit template embeddings; (C, D)."""
    if not templates:
        raise ValueError("need at least one prompt template")
    prompts = [template.format(name) for name in classnames for template in templates]
    emb = np.asarray(encode_texts(prompts), dtype=np.float32)
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    per_class = emb.reshape(len(classnames), len(templates), -1).mean(axis=1)  # (C, D)
    return per_class / np.maximum(np.linalg.norm(per_class, axis=1, keepdims=True), 1e-12)
