"""Text tokenization: the one code path for training, export, index building and serving.

Everything that affects encoding (normalisation, special tokens, truncation, padding) lives inside
`tokenizer.json`, so the saved file alone reproduces the ids seen at training time: our own byte-level BPE, or
an imported checkpoint's tokenizer (CLIP's BPE, SigLIP's SentencePiece) with fixed-length encoding added.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

logger = logging.getLogger(__name__)

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD, BOS, EOS)  # registered first, so their ids are 0, 1, 2
EOS_TOKENS = (EOS, "<|endoftext|>", "[SEP]")  # ours and SigLIP's; OpenAI CLIP's; BERT's


def train_tokenizer(texts: Iterable[str], vocab_size: int, context_length: int) -> TextTokenizer:
    """Train a lowercasing byte-level BPE tokenizer that pads/truncates to `context_length` ids."""
    if context_length < len(SPECIAL_TOKENS):
        raise ValueError(f"context_length must be >= 3 to hold <s> and </s>, got {context_length}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte has a token: no unknowns
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    _configure_encoding(tokenizer, context_length)
    logger.info("trained BPE tokenizer: vocab %d, context %d", tokenizer.get_vocab_size(), context_length)
    return TextTokenizer(tokenizer)


def _configure_encoding(tokenizer: Tokenizer, context_length: int) -> None:
    """Add `<s> $A </s>`, truncation (which leaves room for the specials) and fixed-length padding."""
    bos_id, eos_id = (tokenizer.token_to_id(t) for t in (BOS, EOS))
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, bos_id), (EOS, eos_id)]
    )
    fix_length(tokenizer, context_length, PAD)


def fix_length(tokenizer: Tokenizer, context_length: int, pad_token: str) -> Tokenizer:
    """Make `tokenizer` encode to exactly `context_length` ids: truncated (its post-processor's specials kept) and
    padded with `pad_token`; returns it."""
    pad_id = tokenizer.token_to_id(pad_token)
    if pad_id is None:
        raise ValueError(f"the tokenizer has no padding token {pad_token!r}")
    tokenizer.enable_truncation(max_length=context_length)
    tokenizer.enable_padding(length=context_length, pad_id=pad_id, pad_token=pad_token)
    return tokenizer


class TextTokenizer:
    """A `tokenizers.Tokenizer` configured for fixed-length encoder input: (B, context_length) int64 ids."""

    def __init__(self, tokenizer: Tokenizer):
        if tokenizer.truncation is None or tokenizer.padding is None or tokenizer.padding["length"] is None:
            raise ValueError("tokenizer.json must enable truncation and fixed-length padding")
        eos_ids = [i for t in EOS_TOKENS if (i := tokenizer.token_to_id(t)) is not None]
        if not eos_ids:
            raise ValueError(f"tokenizer.json must define an end-of-text token, one of {EOS_TOKENS}")
        self._tokenizer, self._eos_id = tokenizer, eos_ids[0]
        self._counter = Tokenizer.from_str(tokenizer.to_str())  # same pipeline, no truncation/padding
        self._counter.no_truncation()
        self._counter.no_padding()

    @classmethod
    def from_file(cls, path: str | Path) -> TextTokenizer:
        """Load a `tokenizer.json` written by `save`."""
        return cls(Tokenizer.from_file(str(path)))

    def save(self, path: str | Path) -> None:
        """Write `tokenizer.json` (normaliser, BPE, specials, truncation and padding included)."""
        self._tokenizer.save(str(path))

    @property
    def context_length(self) -> int:
        return int(self._tokenizer.padding["length"])

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    @property
    def pad_id(self) -> int:
        return int(self._tokenizer.padding["pad_id"])

    @property
    def eos_id(self) -> int:
        return self._eos_id

    def encode(self, texts: list[str]) -> np.ndarray:
        """Token ids, (B, context_length) int64: the text between its specials (`<s> ... </s>`), truncated, then
        padded with `pad_id`."""
        if not texts:
            return np.zeros((0, self.context_length), np.int64)
        encodings = self._tokenizer.encode_batch(list(texts))
        return np.asarray([e.ids for e in encodings], dtype=np.int64)

    def token_counts(self, texts: list[str]) -> list[int]:
        """Untruncated length of each text in tokens, specials included (usage and "too long" checks)."""
        if not texts:
            return []
        return [len(e.ids) for e in self._counter.encode_batch(list(texts))]

    def decode(self, ids: np.ndarray | list[int]) -> str:
        """Text of one row of ids, specials and padding dropped."""
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True).strip()


def trim_to_longest(ids: np.ndarray, end_id: int) -> np.ndarray:
    """(B, L) ids cut after the last column any row needs: each row up to its first end token (a row without one
    keeps its full length). For encoders whose outputs ignore what follows the end token."""
    if ids.size == 0:
        return ids
    is_end = ids == end_id
    lengths = np.where(is_end.any(axis=1), is_end.argmax(axis=1) + 1, ids.shape[1])
    return ids[:, : int(lengths.max())]
