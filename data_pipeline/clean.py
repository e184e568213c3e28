"""Per-document cleaning: plain functions on one string, and a Ray Data batch function that applies
them, hashes the result and computes its MinHash signature. Nothing is dropped silently: a dropped
document keeps its row with a ``drop_reason`` and every step's removed characters are counted.
"""

from __future__ import annotations

import hashlib
import html
import re
import unicodedata

import numpy as np
import pyarrow as pa

from data_pipeline.config import CleanConfig, NearDedupConfig
from data_pipeline.pii import PII_TYPES, redact

REPLACEMENT_CHAR = "\ufffd"

_SCRIPT_STYLE = re.compile(r"<(script|style)\b[^>]*>.*?</\1\s*>", re.IGNORECASE | re.DOTALL)
_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_BLOCK_TAG = re.compile(r"</?(p|div|br|li|tr|h[1-6]|section|article|blockquote)\b[^<>]{0,1000}>", re.IGNORECASE)
_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9:-]*(\s[^<>]{0,1000})?/?>")
_ENTITY = re.compile(r"&(#\d+|#x[0-9a-fA-F]+|[A-Za-z]{2,8});")

# Gutenberg: modern "*** START OF THE/THIS PROJECT GUTENBERG EBOOK ... ***" and 1990s "*END*THE SMALL PRINT!"
_PG_START = re.compile(
    r"^.*(\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG|\*END\*THE SMALL PRINT!).*$", re.IGNORECASE | re.MULTILINE
)
_PG_END = re.compile(
    r"^.*(\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg'?s?\b).*$",
    re.IGNORECASE | re.MULTILINE,
)

_ODD_SPACE = re.compile(r"[\t\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_ZERO_WIDTH = re.compile(r"[\u200b-\u200d\u2060\ufeff]|[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_TRAILING = re.compile(r"[ ]+$", re.MULTILINE)
_BLANK_RUN = re.compile(r"\n{3,}")
_SYMBOLS = frozenset("#{}<>[]|\\^~`@$%*=_")
_WORD = re.compile(r"\w+")

STEPS = ("markup", "unicode", "whitespace", "gutenberg")
REASONS = ("empty", "too_short", "low_alpha", "high_symbol", "exact_duplicate", "near_duplicate")


def decode_utf8(data: bytes) -> tuple[str, int]:
    """Bytes -> text; invalid sequences become U+FFFD. Returns (text, number of replacements)."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        already = data.count(REPLACEMENT_CHAR.encode("utf-8"))  # genuine U+FFFD in the input
        return text, text.count(REPLACEMENT_CHAR) - already


def strip_markup(text: str) -> str:
    if "<" not in text and "&" not in text:
        return text
    text = _COMMENT.sub("", _SCRIPT_STYLE.sub("", text))
    text = _TAG.sub("", _BLOCK_TAG.sub("\n", text))
    return _ENTITY.sub(lambda m: html.unescape(m.group(0)), text)


def normalize_unicode(text: str, form: str) -> str:
    return text if form == "none" else unicodedata.normalize(form, text)


def normalize_whitespace(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _ZERO_WIDTH.sub("", _ODD_SPACE.sub(" ", text))
    return _BLANK_RUN.sub("\n\n", _TRAILING.sub("", text)).strip()


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg header (through its START marker line) and footer (from its END marker)."""
    start = _PG_START.search(text)
    if start:
        text = text[start.end() :]
    end = _PG_END.search(text)
    if end:
        text = text[: end.start()]
    return text.strip() if (start or end) else text


def clean_text(text: str, clean: CleanConfig) -> tuple[str, dict[str, int]]:
    """The text-rewriting steps ``clean`` enables (``STEPS``, in order) -> (text, characters each removed).
    Redaction and the quality filters follow in ``clean_batch``."""
    removed = dict.fromkeys(STEPS, 0)
    for step, enabled, fn in (
        ("markup", clean.strip_markup, strip_markup),
        ("unicode", clean.unicode_form != "none", lambda t: normalize_unicode(t, clean.unicode_form)),
        ("whitespace", clean.normalize_whitespace, normalize_whitespace),
        ("gutenberg", clean.strip_gutenberg, strip_gutenberg),
    ):
        if enabled:
            before = len(text)
            text = fn(text)
            removed[step] = before - len(text)
    return text, removed


def quality_reason(text: str, cfg: CleanConfig) -> str:
    """'' when the document passes the length and quality filters, else the reason it fails."""
    if not text:
        return "empty"
    if len(text) < cfg.min_chars:
        return "too_short"
    visible = [c for c in text if not c.isspace()]
    if not visible:
        return "empty"
    if sum(c.isalpha() for c in visible) / len(visible) < cfg.min_alpha_ratio:
        return "low_alpha"
    if sum(c in _SYMBOLS for c in visible) / len(visible) > cfg.max_symbol_ratio:
        return "high_symbol"
    return ""


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, 0x5EED])
    a = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) | np.uint64(1)  # odd multipliers
    b = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
    return a, b


def minhash_signature(text: str, cfg: NearDedupConfig) -> np.ndarray:
    """MinHash of the document's lowercased word ``shingle_words``-grams: uint32[num_perm].

    Shingles hash via a polynomial of per-word blake2b hashes (wrapping uint64); each permutation is a
    multiply-add-shift universal hash. Seeded, so identical across processes and runs.
    """
    words = _WORD.findall(text.lower())
    if not words:
        return np.full(cfg.num_perm, np.iinfo(np.uint32).max, dtype=np.uint32)
    word_h = np.array(
        [int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little") for w in words], dtype=np.uint64
    )
    k = min(cfg.shingle_words, len(words))
    shingles = np.zeros(len(words) - k + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(k):
            shingles = shingles * np.uint64(1_000_003) + word_h[j : len(words) - k + 1 + j]
        a, b = _permutations(cfg.num_perm, cfg.seed)
        sig = np.full(cfg.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
        for lo in range(0, len(shingles), 4096):  # bounded memory on long documents
            chunk = shingles[lo : lo + 4096]
            sig = np.minimum(sig, ((a[:, None] * chunk[None, :] + b[:, None]) >> np.uint64(32)).min(axis=1))
    return sig.astype(np.uint32)


def clean_batch(batch: pa.Table, clean: CleanConfig, near_dedup: NearDedupConfig) -> pa.Table:
    """Ray Data batch fn: rows (source, doc_index, text, replaced_chars, read_error) -> cleaned rows.

    Output adds doc_hash, drop_reason ('' = kept), chars_in/chars_out, removed_<step> counts, pii_<type>
    counts (personal data replaced by placeholders, ``clean.pii``) and, when near-dedup is on, a MinHash
    ``signature``. Dropped rows keep their counts but an empty text.
    """
    texts = batch.column("text").to_pylist()
    read_errors = batch.column("read_error").to_pylist()
    out: dict[str, list] = {
        k: []
        for k in (
            "text",
            "doc_hash",
            "drop_reason",
            "chars_in",
            "chars_out",
            "bytes_out",
            *(f"removed_{s}" for s in STEPS),
            *(f"pii_{t}" for t in PII_TYPES),
        )
    }
    signatures = []
    for text, read_error in zip(texts, read_errors):
        text = text or ""
        out["chars_in"].append(len(text))
        text, removed = clean_text(text, clean)
        found: dict = {}
        if clean.pii.enabled:
            text, found = redact(text, clean.pii.types, clean.pii.phone_region)
        reason = read_error or quality_reason(text, clean)
        for kind in PII_TYPES:  # counted for documents that pass cleaning (a dropped one reaches no shard)
            out[f"pii_{kind}"].append(0 if reason else found.get(kind, 0))
        for step in STEPS:
            out[f"removed_{step}"].append(removed[step])
        out["chars_out"].append(0 if reason else len(text))
        out["bytes_out"].append(0 if reason else len(text.encode("utf-8")))
        out["drop_reason"].append(reason)
        out["text"].append("" if reason else text)
        out["doc_hash"].append("" if reason else content_hash(text))
        if near_dedup.enabled:
            signatures.append(minhash_signature("" if reason else text, near_dedup))
    table = batch.drop_columns(["text"])
    for name, values in out.items():
        table = table.append_column(
            name, pa.array(values, type=pa.string() if name in ("text", "doc_hash", "drop_reason") else pa.int64())
        )
    if near_dedup.enabled:
        flat = pa.array(np.concatenate(signatures) if signatures else np.zeros(0, np.uint32))
        table = table.append_column("signature", pa.FixedSizeListArray.from_arrays(flat, near_dedup.num_perm))
    return table
