"""Tokenizers of different kinds behind one small interface, for comparing them on the same text.

``train_codec(kind, vocab_size, texts, pattern)`` -> a ``Codec``:
  byte     the UTF-8 bytes themselves: 256 ids, nothing to train
  bpe      raylm's own byte-level BPE (``data_pipeline.tokenizer.train_bpe``, rustbpe), encoded with tiktoken
  unigram  a Unigram language model (Kudo 2018; sentencepiece's default) trained by Hugging Face
           ``tokenizers`` over byte-level symbols: the 256 byte symbols are its initial alphabet, so it
           never needs an unknown token and decodes every text back exactly, as the BPE does
BPE and Unigram pre-split text with the same regex (``tokenizer.PATTERNS``), so what differs between
them is the segmentation algorithm alone. Every id decodes to a fixed byte string (``token_bytes``),
which is what bits per byte divides by.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import numpy as np

CodecKind = Literal["byte", "bpe", "unigram"]
CODEC_KINDS = ("byte", "bpe", "unigram")


@dataclass(frozen=True)
class Codec:
    """A trained tokenizer: ``encode`` text -> ids in [0, n_vocab), ``decode`` ids -> text;
    ``token_bytes[i]`` is how many UTF-8 bytes id i stands for."""

    name: str
    kind: str
    n_vocab: int
    encode: Callable[[str], list[int]]
    decode: Callable[[Sequence[int]], str]
    token_bytes: np.ndarray


def train_codec(kind: str, vocab_size: int, texts: Sequence[str], pattern: str = "gpt4") -> Codec:
    """Train a ``kind`` tokenizer of ``vocab_size`` ids on ``texts`` (byte: vocab_size must be 256)."""
    if kind == "byte":
        if vocab_size != 256:
            raise ValueError(f"a byte tokenizer has exactly 256 ids, got vocab_size={vocab_size}")
        return Codec(
            "byte",
            "byte",
            256,
            lambda text: list(text.encode("utf-8")),
            lambda ids: bytes(ids).decode("utf-8", errors="replace"),
            np.ones(256, dtype=np.int64),
        )
    if vocab_size <= 256:
        raise ValueError(f"a {kind} tokenizer needs vocab_size > 256 (the bytes plus what it learns), got {vocab_size}")
    if kind == "bpe":
        return _bpe(vocab_size, texts, pattern)
    if kind == "unigram":
        return _unigram(vocab_size, texts, pattern)
    raise ValueError(f"unknown tokenizer kind {kind!r}; allowed: {', '.join(CODEC_KINDS)}")


def _bpe(vocab_size: int, texts: Sequence[str], pattern: str) -> Codec:
    from data_pipeline import tokenizer as tok

    spec = tok.train_bpe(texts, vocab_size, pattern)
    enc = tok.encoding(spec)
    n_vocab = len(spec["ranks"])  # the study joins documents with text, so end-of-text is never an id
    sizes = np.array([len(enc.decode_single_token_bytes(i)) for i in range(n_vocab)], dtype=np.int64)
    return Codec(f"bpe-{vocab_size}", "bpe", n_vocab, enc.encode_ordinary, enc.decode, sizes)


def _unigram(vocab_size: int, texts: Sequence[str], pattern: str) -> Codec:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from data_pipeline.tokenizer import PATTERNS

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PATTERNS[pattern]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),  # each byte -> one symbol
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(texts, trainer)
    n_vocab = tok.get_vocab_size()
    # a byte-level symbol is one character per byte, so a piece's length is its byte count
    sizes = np.zeros(n_vocab, dtype=np.int64)
    for piece, i in tok.get_vocab().items():
        sizes[i] = len(piece)
    return Codec(
        f"unigram-{vocab_size}",
        "unigram",
        n_vocab,
        lambda text: tok.encode(text, add_special_tokens=False).ids,
        lambda ids: tok.decode(list(ids), skip_special_tokens=False),
        sizes,
    )
