"""Tests for `evaluate` with fake encoders whose embeddings make every metric computable by hand.

An image's pixel (g, c, 0) encodes its group g and colour c; its embedding is unit(e_g + e_colour). A query
text "photo of group g" embeds as e_g and a prompt naming a colour as e_colour: the two are orthogonal.
"""

import dataclasses
import math
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from core.evaluation import EvalSet, eval_set_from_samples, evaluate, group_queries, split_by_group

COLORS = ["red", "green"]
LABEL_SETS = {"color": COLORS, "shape": ["round", "square"]}
MAX_GROUPS = 10
DIM = MAX_GROUPS + len(COLORS)


def one_hot(i: int, n: int = DIM) -> np.ndarray:
    v = np.zeros(n, np.float32)
    v[i] = 1.0
    return v


def unit(rows) -> np.ndarray:
    x = np.stack(rows).astype(np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def make_image(group: int, color: int) -> Image.Image:
    return Image.new("RGB", (2, 2), (group, color, 0))


def encode_images(images, clusters=False):
    pixels = [im.getpixel((0, 0)) for im in images]
    out = {"embedding": unit([one_hot(g) + one_hot(MAX_GROUPS + c) for g, c, _ in pixels])}
    if clusters:
        out["cluster_probs"] = np.stack([one_hot(g % 4, 4) for g, _, _ in pixels])
    return out


def text_vector(text: str) -> np.ndarray:
    if text.startswith("photo of group "):
        return one_hot(int(text.removeprefix("photo of group ")))
    return sum(
        (one_hot(MAX_GROUPS + i) for i, c in enumerate(COLORS) if c in text), np.zeros(DIM, np.float32)
    )


def encode_texts(texts, clusters=False):
    out = {"embedding": unit([text_vector(t) for t in texts]) if texts else np.zeros((0, DIM), np.float32)}
    if clusters:
        out["cluster_probs"] = np.tile(one_hot(0, 4), (len(texts), 1))  # every text in cluster 0: collapsed
    return out


def make_eval_set(colors_of_groups: list[int], per_group: int, color_labels=None) -> EvalSet:
    """`per_group` images per group; the 2nd image's text names another group (it must not become a query)."""
    images, texts, groups = [], [], []
    for g, c in enumerate(colors_of_groups):
        for j in range(per_group):
            images.append(make_image(g, c))
            texts.append(f"photo of group {g if j == 0 else (g + 1) % len(colors_of_groups)}")
            groups.append(f"g{g}")
    labels = color_labels or [COLORS[im.getpixel((0, 0))[1]] for im in images]
    return EvalSet(images=images, texts=texts, groups=groups, labels={"color": labels})


def test_evaluate_hand_computed():
    labels = ["red", "red", "red", "red", "green", "red", None, "blue"]  # 5 and 7 wrong, 6 unknown
    eval_set = make_eval_set([0, 0, 1, 1], per_group=2, color_labels=labels)
    probe_train = make_eval_set([0, 0, 1, 1], per_group=2)
    results = evaluate(encode_images, encode_texts, eval_set, probe_train, LABEL_SETS)
    expected = {f"retrieval/{d}_r{k}": 1.0 for d in ("t2i", "i2t") for k in (1, 5, 10)}
    # "blue" is outside the label set, so it misses even at top5 (with only two classes)
    expected |= {"zeroshot/color/top1": 5 / 7, "zeroshot/color/top5": 6 / 7, "linear_probe/color": 5 / 7}
    # per group (each weighs one): g0 and g1 right, g2 half right, g3 (only its "blue" image labelled) wrong
    expected |= {"zeroshot_by_group/color/top1": 2.5 / 4, "zeroshot_by_group/color/top5": 3 / 4,
                 "linear_probe_by_group/color": 2.5 / 4}
    assert results == pytest.approx(expected)  # no "shape" keys: the eval data has no shape labels


def test_a_group_of_many_images_weighs_one_in_the_by_group_accuracies():
    # group g0: 9 images, all mislabelled "green"; groups g1..g3: one image each, labelled right
    eval_set = make_eval_set([0], per_group=9, color_labels=["green"] * 9)
    for g in (1, 2, 3):
        eval_set.images.append(make_image(g, 0))
        eval_set.texts.append(f"photo of group {g}")
        eval_set.groups.append(f"g{g}")
        eval_set.labels["color"].append("red")
    probe_train = make_eval_set([0, 1, 0, 1], per_group=1)
    results = evaluate(encode_images, encode_texts, eval_set, probe_train, LABEL_SETS)
    assert results["zeroshot/color/top1"] == pytest.approx(3 / 12)  # per image: the 9 wrong ones dominate
    assert results["zeroshot_by_group/color/top1"] == pytest.approx(3 / 4)
    assert results["linear_probe/color"] == pytest.approx(3 / 12)
    assert results["linear_probe_by_group/color"] == pytest.approx(3 / 4)


def test_no_by_group_keys_when_every_group_has_one_image():
    results = evaluate(encode_images, encode_texts, make_eval_set([0, 1, 0, 1], per_group=1),
                       make_eval_set([0, 1], per_group=1), LABEL_SETS)
    assert "zeroshot/color/top1" in results and "linear_probe/color" in results
    assert not any("_by_group/" in key for key in results)


def test_retrieval_misses_are_counted():
    eval_set = make_eval_set([0, 1, 0], per_group=1)
    eval_set.texts[2] = "photo of group 0"  # group g2's only query now finds group g0's image
    results = evaluate(encode_images, encode_texts, eval_set, None, {})
    assert results["retrieval/t2i_r1"] == pytest.approx(2 / 3)
    assert results["retrieval/i2t_r1"] == pytest.approx(2 / 3)
    assert results["retrieval/t2i_r5"] == 1.0


def test_cluster_stats_of_both_towers():
    eval_set = make_eval_set([0, 0, 1, 1], per_group=2)
    results = evaluate(
        lambda ims: encode_images(ims, clusters=True),
        lambda txts: encode_texts(txts, clusters=True),
        eval_set,
        None,
        LABEL_SETS,
    )
    assert results["clusters/image/clusters_used"] == 4
    assert results["clusters/image/entropy_of_mean"] == pytest.approx(math.log(4))
    assert results["clusters/image/collapsed"] is False
    assert results["clusters/text/clusters_used"] == 1 and results["clusters/text/collapsed"] is True


def test_no_cluster_keys_without_cluster_probs():
    results = evaluate(encode_images, encode_texts, make_eval_set([0, 1], per_group=2), None, LABEL_SETS)
    assert not any(key.startswith("clusters/") for key in results)


def test_linear_probe_on_group_split_without_probe_set():
    eval_set = make_eval_set([0] * 5 + [1] * 5, per_group=3)
    results = evaluate(encode_images, encode_texts, eval_set, None, LABEL_SETS)
    assert results["linear_probe/color"] == 1.0  # 7 train groups always hold both colours


def test_split_by_group_is_deterministic_and_disjoint():
    groups = [f"g{i % 10}" for i in range(40)]
    train_idx, test_idx = split_by_group(groups)
    train_groups, test_groups = {groups[i] for i in train_idx}, {groups[i] for i in test_idx}
    assert not train_groups & test_groups
    assert (len(train_groups), len(test_groups)) == (7, 3)
    assert sorted(train_idx.tolist() + test_idx.tolist()) == list(range(40))
    np.testing.assert_array_equal(split_by_group(groups)[0], train_idx)


def test_group_queries_use_first_text_per_group():
    eval_set = EvalSet(images=[None] * 3, texts=["a1", "b1", "a2"], groups=["a", "b", "a"])
    assert group_queries(eval_set) == (["a1", "b1"], ["a", "b"])


def test_label_set_names_selects_and_validates():
    eval_set = make_eval_set([0, 1], per_group=2)
    results = evaluate(encode_images, encode_texts, eval_set, None, LABEL_SETS, label_set_names=[])
    assert not any(key.startswith(("zeroshot/", "linear_probe/")) for key in results)
    with pytest.raises(ValueError, match="shape"):
        evaluate(encode_images, encode_texts, eval_set, None, LABEL_SETS, label_set_names=["shape"])


def test_eval_set_from_samples():
    samples = [
        SimpleNamespace(image="im0", texts=["a cat", "cat"], labels={"color": "red"}, group="cat"),
        SimpleNamespace(image="im1", texts=["a dog"], labels={"shape": "round"}, group="dog"),
    ]
    eval_set = eval_set_from_samples(samples)
    assert eval_set.texts == ["a cat", "a dog"] and eval_set.groups == ["cat", "dog"]
    assert eval_set.labels == {"color": ["red", None], "shape": [None, "round"]}


def test_eval_set_rejects_ragged_fields():
    with pytest.raises(ValueError, match="2 entries"):
        EvalSet(images=[None, None], texts=["a"], groups=["a", "b"])


def test_retrieval_is_split_into_seen_word_and_novel_word_queries():
    eval_set = make_eval_set([0, 1, 0], per_group=1)
    eval_set.texts[1] = "photo of group 2"  # g1's query finds g2's image: a miss
    seen = frozenset({"photo", "of", "group", "0"})  # "2" was never in a training caption
    results = evaluate(encode_images, encode_texts, eval_set, None, {}, seen_words=seen)
    assert results["retrieval/t2i_r1"] == pytest.approx(2 / 3)
    assert results["retrieval_seen_words/queries"] == 1 and results["retrieval_seen_words/t2i_r1"] == 1.0
    assert results["retrieval_novel_words/queries"] == 2
    assert results["retrieval_novel_words/t2i_r1"] == pytest.approx(1 / 2)  # g1 misses, g2 hits
    assert results["retrieval_novel_words/t2i_r5"] == 1.0


def test_every_query_seen_leaves_the_novel_side_without_recall():
    eval_set = make_eval_set([0, 1], per_group=1)
    results = evaluate(encode_images, encode_texts, eval_set, None, {},
                       seen_words=frozenset({"photo", "of", "group", "0", "1"}))
    assert results["retrieval_seen_words/t2i_r1"] == results["retrieval/t2i_r1"] == 1.0
    assert results["retrieval_novel_words/queries"] == 0
    assert not any(key.startswith("retrieval_novel_words/t2i") for key in results)


def test_no_seen_novel_split_without_training_words():
    results = evaluate(encode_images, encode_texts, make_eval_set([0, 1], per_group=1), None, {})
    assert not any(key.startswith(("retrieval_seen_words/", "retrieval_novel_words/")) for key in results)


def two_vendor_set() -> EvalSet:
    """Groups g0..g3 drawn twice: "google" art embeds right; "twitter" art looks like the next group in the other
    colour, so on its own its retrieval and zero-shot both fail, while in the joint gallery google's images hit."""
    google = make_eval_set([0, 1, 0, 1], per_group=1)
    twitter = make_eval_set([0, 1, 0, 1], per_group=1)
    twitter.images = [make_image((g + 1) % 4, 1 - c) for g, c in ((0, 0), (1, 1), (2, 0), (3, 1))]
    return EvalSet(images=google.images + twitter.images, texts=google.texts + twitter.texts,
                   groups=google.groups + twitter.groups, labels={"color": google.labels["color"] * 2},
                   facets={"vendor": ["google"] * 4 + ["twitter"] * 4})


def test_each_facet_value_is_scored_as_its_own_gallery():
    both = two_vendor_set()
    seen = frozenset({"photo", "of", "group", "0", "1"})
    results = evaluate(encode_images, encode_texts, both, None, LABEL_SETS, seen_words=seen)
    for vendor, rows in (("google", range(4)), ("twitter", range(4, 8))):
        alone = evaluate(encode_images, encode_texts, both.subset(list(rows)), None, LABEL_SETS, seen_words=seen)
        expected = {f"by_vendor/{vendor}/{key}": value for key, value in alone.items()
                    if key.startswith(("retrieval", "zeroshot"))}
        assert {key: value for key, value in results.items() if key.startswith(f"by_vendor/{vendor}/")} == expected
    assert results["retrieval/t2i_r1"] == results["by_vendor/google/retrieval/t2i_r1"] == 1.0
    assert results["by_vendor/twitter/retrieval/t2i_r1"] == 0.0  # the joint gallery hid twitter's misses
    assert results["by_vendor/twitter/zeroshot/color/top1"] == 0.0
    without_facets = dataclasses.replace(both, facets={})
    overall = evaluate(encode_images, encode_texts, without_facets, None, LABEL_SETS, seen_words=seen)
    assert {key: value for key, value in results.items() if not key.startswith("by_")} == overall


def test_no_per_facet_metrics_for_a_single_value():
    eval_set = make_eval_set([0, 1], per_group=2)
    eval_set.facets = {"vendor": ["google"] * 4}
    results = evaluate(encode_images, encode_texts, eval_set, None, LABEL_SETS)
    assert results == evaluate(encode_images, encode_texts, make_eval_set([0, 1], per_group=2), None, LABEL_SETS)


def test_eval_set_from_samples_reads_facets_apart_from_labels():
    samples = [
        SimpleNamespace(image="im0", texts=["a cat"], labels={"color": "red"}, group="cat",
                        facets={"vendor": "google"}),
        SimpleNamespace(image="im1", texts=["a cat"], labels={"color": "red"}, group="cat", facets={}),
    ]
    eval_set = eval_set_from_samples(samples)
    assert eval_set.labels == {"color": ["red", "red"]}
    assert eval_set.facets == {"vendor": ["google", None]}
