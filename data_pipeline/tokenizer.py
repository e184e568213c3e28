"""Byte-level BPE: trained with rustbpe, saved as a tiktoken rank file + JSON, encoded with tiktoken.

Files (next to every manifest, so shards are self-describing):
  tokenizer.tiktoken  one "base64(token bytes) rank" line per mergeable token (tiktoken's own format)
  tokenizer.json      {"name", "pattern", "special_tokens": {"<|endoftext|>": id}, "n_vocab", "hash"}
``hash`` is sha256 over ranks, pattern and special tokens: the identity shards and checkpoints check.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from typing import Iterable, Optional

import tiktoken
import tiktoken.load

EOT = "<|endoftext|>"
PATTERNS = {
    "gpt2": r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
    "gpt4": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""",  # noqa: E501
}
TIKTOKEN_NAMED = ("gpt2", "r50k_base", "p50k_base", "cl100k_base", "o200k_base")
RANKS_FILE, META_FILE = "tokenizer.tiktoken", "tokenizer.json"


class TokenizerError(RuntimeError):
    """A tokenizer that cannot be built or loaded, with the fix."""


def _hash(ranks: dict[bytes, int], pattern: str, special: dict[str, int]) -> str:
    h = hashlib.sha256()
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        h.update(rank.to_bytes(4, "little") + len(token).to_bytes(2, "little") + token)
    h.update(pattern.encode())
    h.update(json.dumps(special, sort_keys=True).encode())
    return h.hexdigest()


def _spec(name: str, pattern: str, ranks: dict[bytes, int]) -> dict:
    special = {EOT: len(ranks)} if EOT not in ranks else {}
    return {
        "name": name,
        "pattern": pattern,
        "ranks": ranks,
        "special_tokens": special,
        "n_vocab": len(ranks) + len(special),
        "hash": _hash(ranks, pattern, special),
    }


def train_bpe(texts: Iterable[str], vocab_size: int, pattern: str) -> dict:
    """Train a byte-level BPE (vocab_size = 256 bytes + merges) on ``texts``; returns a tokenizer spec."""
    import rustbpe

    tok = rustbpe.Tokenizer()
    tok.train_from_iterator(iter(texts), vocab_size, pattern=PATTERNS[pattern])
    ranks = {bytes(k): v for k, v in tok.get_mergeable_ranks()}
    return _spec(f"raylm-bpe-{vocab_size}-{pattern}", PATTERNS[pattern], ranks)


def tiktoken_named(name: str) -> dict:
    """A named tiktoken encoding, only from tiktoken's local cache (this never downloads)."""
    if name not in TIKTOKEN_NAMED:
        raise TokenizerError(f"tokenizer.name={name!r} is not a tiktoken encoding; choose one of {TIKTOKEN_NAMED}")

    def refuse_download(blobpath: str) -> bytes:
        cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or "<tmp>/data-gym-cache"
        raise TokenizerError(
            f"tiktoken encoding {name!r} is not in the local cache ({cache}; missing {blobpath}). Fix: on a "
            f"machine with network run `python -c \"import tiktoken; tiktoken.get_encoding('{name}')\"` with "
            "TIKTOKEN_CACHE_DIR set, copy that directory here and export TIKTOKEN_CACHE_DIR; or use tokenizer.kind=train"  # noqa: E501
        )

    saved = tiktoken.load.read_file
    tiktoken.load.read_file = refuse_download  # read_file_cached falls back to this on a cache miss
    try:
        enc = tiktoken.get_encoding(name)
    finally:
        tiktoken.load.read_file = saved
    spec = {
        "name": name,
        "pattern": enc._pat_str,
        "ranks": enc._mergeable_ranks,
        "special_tokens": dict(enc._special_tokens),
        "n_vocab": enc.n_vocab,
    }
    spec["hash"] = _hash(spec["ranks"], spec["pattern"], spec["special_tokens"])
    return spec


def to_files(spec: dict) -> dict[str, bytes]:
    """{file name: bytes} for a spec: the tiktoken rank file and the JSON metadata."""
    lines = [f"{base64.b64encode(t).decode()} {r}" for t, r in sorted(spec["ranks"].items(), key=lambda kv: kv[1])]
    meta = {k: spec[k] for k in ("name", "pattern", "special_tokens", "n_vocab", "hash")}
    return {RANKS_FILE: ("\n".join(lines) + "\n").encode(), META_FILE: (json.dumps(meta, indent=2) + "\n").encode()}


def from_files(ranks_bytes: bytes, meta_bytes: bytes, where: str = "") -> dict:
    """Parse the two files back into a spec; checks the stored hash."""
    meta = json.loads(meta_bytes)
    ranks = {}
    for line in ranks_bytes.splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    spec = {**meta, "ranks": ranks}
    actual = _hash(ranks, meta["pattern"], meta["special_tokens"])
    if actual != meta["hash"]:
        raise TokenizerError(
            f"{where}: tokenizer files are inconsistent (stored hash {meta['hash'][:12]}, "
            f"content hash {actual[:12]}); re-run prepare"
        )
    return spec


def encoding(spec: dict) -> tiktoken.Encoding:
    """The tiktoken.Encoding for a spec (named by its hash, so two different vocabularies never collide)."""
    return tiktoken.Encoding(
        name=f"{spec['name']}-{spec['hash'][:12]}",
        pat_str=spec["pattern"],
        mergeable_ranks=spec["ranks"],
        special_tokens=spec["special_tokens"],
    )


def eot_id(spec: dict) -> int:
    return spec["special_tokens"][EOT]


def token_dtype(n_vocab: int) -> str:
    return "uint16" if n_vocab <= 65536 else "uint32"


def load_spec(uri: str, endpoint_url: Optional[str] = None, region: Optional[str] = None) -> dict:
    """Read tokenizer.tiktoken + tokenizer.json from a directory / URI."""
    from data_pipeline.storage import join, read_bytes

    return from_files(
        read_bytes(join(uri, RANKS_FILE), endpoint_url, region),
        read_bytes(join(uri, META_FILE), endpoint_url, region),
        where=uri,
    )
