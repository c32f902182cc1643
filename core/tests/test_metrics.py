"""Tests for evaluation metrics against hand-computed values and brute-force references."""

import math

import numpy as np
import pytest

from core.metrics import (
    DEFAULT_TEMPLATES,
    caption_words,
    cluster_stats,
    ensemble_class_embeddings,
    group_weights,
    linear_probe,
    probe_predictions,
    retrieval_recall,
    seen_word_mask,
    zero_shot_accuracy,
)


def unit(x):
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# --- zero-shot ---------------------------------------------------------------------------------------------


def test_zero_shot_hand_computed():
    classes = np.eye(6, dtype=np.float32)
    images = unit(
        [
            [1, 0, 0, 0, 0, 0],  # label 0: rank 1
            [0, 0.1, 0.9, 0, 0, 0],  # label 1: rank 2
            [6, 5, 4, 3, 2, 1],  # label 5: rank 6
            [0, 0, 0, 1, 0, 0],  # label 3: rank 1
        ]
    )
    labels = np.array([0, 1, 5, 3])
    assert zero_shot_accuracy(images, classes, labels) == {"top1": 0.5, "top5": 0.75}
    assert zero_shot_accuracy(images, classes, labels, ks=(2,)) == {"top2": 0.75}
    # the first two images are one group: it weighs one, as much as each of the other two
    weights = group_weights(["g", "g", "h", "i"])
    assert zero_shot_accuracy(images, classes, labels, weights=weights) == pytest.approx({"top1": 1.5 / 3,
                                                                                          "top5": 2 / 3})


def test_zero_shot_k_larger_than_classes_is_a_hit():
    classes = np.eye(3, dtype=np.float32)
    images = unit([[0, 0, 1], [1, 0, 0]])
    assert zero_shot_accuracy(images, classes, np.array([0, 1])) == {"top1": 0.0, "top5": 1.0}


# --- retrieval ---------------------------------------------------------------------------------------------

IMAGE_GROUPS = ["a", "a", "b", "c"]
TEXT_GROUPS = ["a", "b", "c"]
# With identity image embeddings, each text embedding row *is* its score row over the 4 images.
TEXT_SCORES = np.array(
    [
        [0.1, 0.9, 0.5, 0.2],  # a → image 1 (a): hit at 1
        [0.9, 0.8, 0.1, 0.7],  # b → a, a, c, b: hit at 4
        [0.05, 0.2, 0.9, 0.3],  # c → b, c: hit at 2
    ],
    dtype=np.float32,
)


def test_retrieval_hand_computed():
    recall = retrieval_recall(
        np.eye(4, dtype=np.float32), IMAGE_GROUPS, TEXT_SCORES, TEXT_GROUPS, ks=(1, 2, 5)
    )
    # image queries: 0(a) → b, a; 1(a) → a; 2(b) → c, a, b; 3(c) → b, c
    expected = {
        "t2i_r1": 1 / 3,
        "t2i_r2": 2 / 3,
        "t2i_r5": 1.0,
        "i2t_r1": 1 / 4,
        "i2t_r2": 3 / 4,
        "i2t_r5": 1.0,
    }
    assert recall == pytest.approx(expected)


def brute_force_recall(scores, query_groups, gallery_groups, k):
    hits = 0
    for q, row in enumerate(scores):
        best = sorted(range(len(row)), key=lambda j: -row[j])[:k]
        hits += any(gallery_groups[j] == query_groups[q] for j in best)
    return hits / len(scores)


def test_retrieval_matches_brute_force():
    rng = np.random.default_rng(0)
    images, texts = unit(rng.normal(size=(40, 8))), unit(rng.normal(size=(15, 8)))
    image_groups = [f"g{i}" for i in rng.integers(0, 15, size=40)]
    text_groups = [f"g{i}" for i in range(15)]
    recall = retrieval_recall(images, image_groups, texts, text_groups)
    scores = texts @ images.T
    for k in (1, 5, 10):
        assert recall[f"t2i_r{k}"] == pytest.approx(brute_force_recall(scores, text_groups, image_groups, k))
        assert recall[f"i2t_r{k}"] == pytest.approx(
            brute_force_recall(scores.T, image_groups, text_groups, k)
        )


@pytest.mark.parametrize("text, words", [
    ("Thumbs-up sign", {"thumbs", "up", "sign"}),
    ("flag: Côte d’Ivoire", {"flag", "côte", "d", "ivoire"}),
    ("keycap: 10", {"keycap", "10"}),
    ("", set()),
])
def test_caption_words(text, words):
    assert caption_words(text) == words


def test_seen_word_mask_needs_every_word_seen():
    vocabulary = frozenset({"fox", "face", "cat"})
    mask = seen_word_mask(["Cat face", "fox", "fox face with hat", "dog"], vocabulary)
    assert mask.tolist() == [True, True, False, False]


# --- linear probe ------------------------------------------------------------------------------------------


def blobs(rng, n_per_class, centers):
    x = np.concatenate([c + rng.normal(scale=0.3, size=(n_per_class, len(c))) for c in centers])
    y = np.repeat(np.arange(len(centers)), n_per_class)
    return x.astype(np.float32), y


def test_linear_probe_separable_blobs():
    rng = np.random.default_rng(0)
    centers = rng.normal(scale=3.0, size=(3, 16))
    train_x, train_y = blobs(rng, 60, centers)
    test_x, test_y = blobs(rng, 30, centers)
    assert linear_probe(train_x, train_y, test_x, test_y) >= 0.98


def test_a_strong_l2_penalty_shrinks_the_probe_to_the_majority_class():
    rng = np.random.default_rng(0)
    centers = rng.normal(scale=3.0, size=(3, 16))
    x, y = blobs(rng, 60, centers)
    keep = np.concatenate([np.flatnonzero(y == 0), np.flatnonzero(y == 1)[:10], np.flatnonzero(y == 2)[:10]])
    test_x, _ = blobs(rng, 10, centers)
    assert set(probe_predictions(x[keep], y[keep], test_x, c=1e-6)) == {0}  # only the intercepts are free
    assert set(probe_predictions(x[keep], y[keep], test_x)) == {0, 1, 2}


def test_linear_probe_random_labels_is_chance():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(800, 16)).astype(np.float32)
    y = rng.integers(0, 4, size=800)
    accuracy = linear_probe(x[:400], y[:400], x[400:], y[400:])
    assert 0.15 <= accuracy <= 0.38  # chance is 0.25


def test_linear_probe_counts_unseen_labels_wrong():
    rng = np.random.default_rng(0)
    centers = rng.normal(scale=3.0, size=(3, 8))
    train_x, train_y = blobs(rng, 20, centers[:2])
    test_x, test_y = blobs(rng, 10, centers)  # class 2 never seen in training
    names = np.array(["cat", "dog", "fox"])
    assert linear_probe(train_x, names[train_y], test_x, names[test_y]) == pytest.approx(2 / 3)


def test_linear_probe_weighted_by_group():
    x = np.zeros((4, 2), np.float32)
    weights = group_weights(["a", "a", "a", "b"])  # the three "a" images share one weight
    assert weights.tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 1.0])
    assert linear_probe(x, ["x"] * 4, x, ["y", "y", "y", "x"], weights=weights) == pytest.approx(0.5)


def test_linear_probe_refuses_mismatched_test_labels():
    x = np.zeros((4, 2), np.float32)
    with pytest.raises(ValueError, match="test_y"):
        linear_probe(x, ["a", "b"] * 2, x, ["a"])


def test_linear_probe_single_training_class():
    x = np.zeros((4, 2), np.float32)
    assert linear_probe(x, ["a"] * 4, x, ["a", "b", "a", "b"]) == 0.5


# --- cluster statistics ------------------------------------------------------------------------------------


def test_cluster_stats_one_hot_collapse():
    probs = np.zeros((10, 4))
    probs[:, 2] = 1.0
    stats = cluster_stats(probs)
    assert stats["clusters_used"] == 1 and stats["clusters_used_frac"] == 0.25
    assert stats["mean_entropy"] == pytest.approx(0.0, abs=1e-9)
    assert stats["entropy_of_mean"] == pytest.approx(0.0, abs=1e-9)
    assert stats["collapsed"] is True


def test_cluster_stats_diverse_one_hot():
    probs = np.eye(4)[np.arange(8) % 4]
    stats = cluster_stats(probs)
    assert stats["clusters_used"] == 4 and stats["clusters_used_frac"] == 1.0
    assert stats["mean_entropy"] == pytest.approx(0.0, abs=1e-9)
    assert stats["entropy_of_mean"] == pytest.approx(math.log(4))
    assert stats["entropy_gap"] == pytest.approx(math.log(4))
    assert stats["collapsed"] is False


def test_cluster_stats_uniform_rows_are_collapsed():
    stats = cluster_stats(np.full((6, 5), 0.2))
    assert stats["mean_entropy"] == pytest.approx(math.log(5))
    assert stats["entropy_gap"] == pytest.approx(0.0, abs=1e-9)
    assert stats["collapsed"] is True


def test_cluster_stats_few_clusters_of_many_is_collapsed():
    probs = np.zeros((50, 1000))
    probs[np.arange(50), np.arange(50) % 5] = 1.0  # 5 of 1000 clusters: informative but under 1% used
    stats = cluster_stats(probs)
    assert stats["entropy_gap"] == pytest.approx(math.log(5))
    assert stats["clusters_used"] == 5 and stats["collapsed"] is True


# --- prompt ensembling -------------------------------------------------------------------------------------


def test_ensemble_class_embeddings():
    vectors = {"cat": [2, 0, 0], "a cat": [0, 1, 0], "dog": [0, 0, 5], "a dog": [0, 0, 1]}
    seen = []

    def encode_texts(prompts):
        seen.append(list(prompts))
        return np.array([vectors[p] for p in prompts], dtype=np.float32)

    emb = ensemble_class_embeddings(encode_texts, ["cat", "dog"], ["{}", "a {}"])
    np.testing.assert_allclose(emb, [[math.sqrt(0.5), math.sqrt(0.5), 0], [0, 0, 1]], atol=1e-6)
    assert sorted(seen[0]) == sorted(vectors)


def test_default_templates_each_hold_one_placeholder():
    assert DEFAULT_TEMPLATES and all(t.count("{}") == 1 for t in DEFAULT_TEMPLATES)
