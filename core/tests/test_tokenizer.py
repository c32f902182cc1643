"""Tests for the byte-level BPE tokenizer: specials, truncation, padding, normalisation, save/load parity."""

import numpy as np
import pytest

from core.tokenizer import TextTokenizer, train_tokenizer, trim_to_longest

CORPUS = [
    "grinning face",
    "grinning face with smiling eyes",
    "red apple",
    "green apple",
    "face with tears of joy",
    "smiling cat with heart eyes",
    "flag of france",
] * 5
CONTEXT = 12


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CORPUS, vocab_size=320, context_length=CONTEXT)


def test_special_token_ids_are_fixed(tokenizer):
    assert (tokenizer.pad_id, tokenizer.eos_id) == (0, 2)
    ids = tokenizer.encode(["red apple"])[0]
    assert ids[0] == 1
    assert tokenizer.context_length == CONTEXT
    assert 259 <= tokenizer.vocab_size <= 320  # 256 bytes + 3 specials + merges


def test_padding_fills_with_pad_id_after_eos(tokenizer):
    ids = tokenizer.encode(["red apple"])[0]
    n = tokenizer.token_counts(["red apple"])[0]
    assert ids.dtype == np.int64 and ids.shape == (CONTEXT,)
    assert ids[n - 1] == tokenizer.eos_id
    assert (ids[n:] == tokenizer.pad_id).all()
    assert (ids[: n - 1] != tokenizer.pad_id).all()


def test_truncation_keeps_eos(tokenizer):
    long_text = " ".join(["grinning face with smiling eyes"] * 20)
    ids = tokenizer.encode([long_text])[0]
    assert ids.shape == (CONTEXT,)
    assert ids[0] == 1 and ids[-1] == tokenizer.eos_id
    assert tokenizer.pad_id not in ids
    assert tokenizer.token_counts([long_text])[0] > CONTEXT


def test_token_counts_include_specials(tokenizer):
    # "red apple" is in the corpus often enough that each word is one merged token
    assert tokenizer.token_counts(["red apple", ""]) == [4, 2]


def test_save_load_round_trip(tokenizer, tmp_path):
    path = tmp_path / "tokenizer.json"
    tokenizer.save(path)
    loaded = TextTokenizer.from_file(path)
    texts = ["grinning face", "Café ☕ 😀", " ".join(CORPUS)]
    np.testing.assert_array_equal(loaded.encode(texts), tokenizer.encode(texts))
    assert loaded.context_length == CONTEXT and loaded.vocab_size == tokenizer.vocab_size


@pytest.mark.parametrize(
    "raw, normalised",
    # fullwidth letters and the "ﬂ" ligature are NFKC-equivalent to their ASCII spellings
    [("RED APPLE", "red apple"), ("Ｒｅｄ ａｐｐｌｅ", "red apple"), ("ﬂag of france", "flag of france")],
)
def test_lowercase_and_nfkc(tokenizer, raw, normalised):
    np.testing.assert_array_equal(tokenizer.encode([raw]), tokenizer.encode([normalised]))


@pytest.fixture(scope="module")
def wide():
    return train_tokenizer(CORPUS, vocab_size=320, context_length=64)


@pytest.mark.parametrize("text", ["café crème", "😀 face", "naïve 🇫🇷"])
def test_non_ascii_round_trips_without_unknowns(wide, text):
    ids = wide.encode([text])[0]
    assert wide.decode(ids) == text


def test_batch_equals_one_by_one(tokenizer):
    texts = ["grinning face", "a much longer text about a smiling cat with heart eyes and more", "", "ÉCLAIR"]
    batched = tokenizer.encode(texts)
    singles = np.concatenate([tokenizer.encode([t]) for t in texts])
    np.testing.assert_array_equal(batched, singles)
    assert tokenizer.token_counts(texts) == [tokenizer.token_counts([t])[0] for t in texts]


def test_empty_list(tokenizer):
    assert tokenizer.encode([]).shape == (0, CONTEXT)
    assert tokenizer.token_counts([]) == []


@pytest.mark.parametrize("rows,expected_width", [
    ([[1, 5, 2, 0, 0, 0], [1, 2, 0, 0, 0, 0]], 3),  # up to the longest row's end token
    ([[1, 5, 6, 7, 8, 9], [1, 2, 0, 0, 0, 0]], 6),  # a row without an end token keeps the full length
    ([[2, 2, 2, 2]], 1),  # pad == end (CLIP): the first end token counts
])
def test_trim_to_longest_keeps_every_rows_end_token(rows, expected_width):
    ids = np.asarray(rows, np.int64)
    trimmed = trim_to_longest(ids, end_id=2)
    assert trimmed.shape == (len(rows), expected_width)
    np.testing.assert_array_equal(trimmed, ids[:, :expected_width])
