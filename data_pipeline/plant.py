"""Planted text for the privacy audit (``data.audit``; `raylm eval --suite privacy` measures it).

Two kinds of items, drawn with ``audit.seed`` from lines of the cleaned corpus:

  canaries   ``canary_template`` with a random ``canary_digits``-digit secret (Carlini et al. 2019, "The
             Secret Sharer"), planted ``r`` times for each r in ``canary_repetitions``; each copy opens its
             own document, followed by different corpus lines, so copies are not duplicates that dedup
             would merge (a secret that recurs in many documents). ``never_planted_canaries`` more secrets
             are drawn and never planted: the control for exposure.
  passages   ``passage_lines`` corpus lines in random order. Members are planted as ``r`` identical
             documents for each r in ``passage_repetitions``; as many non-members are built the same
             way and kept aside, so membership is a coin flip, not a difference of distribution.
             Exact dedup keeps one copy of each member: the audit reports copies planted and kept.

Planted documents join the cleaned documents before dedup and always land in the train split; the
record of every item (secrets, texts, copies planted and kept) is ``audit_planted.json`` next to the
manifest, which names it with its sha256.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pyarrow as pa

from data_pipeline.clean import content_hash, minhash_signature
from data_pipeline.config import AuditConfig, NearDedupConfig

AUDIT_SOURCE = "raylm-audit:"  # the source of every planted document: "raylm-audit:canary-0003"
AUDIT_FILE = "audit_planted.json"
AUDIT_FORMAT = "raylm-audit-plant/1"
AUDIT_SAMPLE_BYTES = 4 << 20  # cleaned text (first documents in hash order) the lines are drawn from
MIN_LINE_CHARS = 20  # shorter lines (stage directions, speaker names) make poor passages


class AuditPlanError(ValueError):
    """An audit the corpus or the settings cannot supply (too few lines, too few secrets)."""


def corpus_lines(texts: list[str]) -> list[str]:
    """The distinct stripped lines of at least ``MIN_LINE_CHARS`` characters, in first-seen order."""
    seen: dict[str, None] = {}
    for text in texts:
        for line in text.split("\n"):
            line = line.strip()
            if len(line) >= MIN_LINE_CHARS:
                seen.setdefault(line, None)
    return list(seen)


def secret_text(secret: int, digits: int) -> str:
    return f"{secret:0{digits}d}"


def plan_audit(cfg: AuditConfig, lines: list[str]) -> tuple[dict, list[tuple[str, int, str]]]:
    """(the audit record, the planted documents as (source, copy index, text)), drawn with ``cfg.seed``."""
    passages_needed = (len(cfg.passage_repetitions) + 1) * cfg.passages
    # distinct passages are drawn by rejection: ask for a pool of orderings far larger than the draw
    if len(lines) < cfg.passage_lines or math.perm(len(lines), cfg.passage_lines) < 4 * passages_needed:
        raise AuditPlanError(
            f"audit: the train split's cleaned text has {len(lines)} lines of >= {MIN_LINE_CHARS} characters, too "
            f"few to form {passages_needed} distinct passages of audit.passage_lines={cfg.passage_lines}; raise "
            "passage_lines, lower audit.passages or add documents"
        )
    rng = np.random.default_rng(cfg.seed)
    planted_counts = [r for r in cfg.canary_repetitions for _ in range(cfg.canaries_per_count)]
    total = len(planted_counts) + cfg.never_planted_canaries
    if total > 10**cfg.canary_digits // 2:
        raise AuditPlanError(
            f"audit: {total} canaries need distinct secrets from 10^{cfg.canary_digits}; raise audit.canary_digits "
            "or plant fewer (canaries_per_count, never_planted_canaries)"
        )
    secrets = rng.choice(10**cfg.canary_digits, size=total, replace=False)
    canaries = [
        {"id": f"canary-{i:04d}", "secret": secret_text(int(s), cfg.canary_digits), "repetitions": r}
        for i, (s, r) in enumerate(zip(secrets, planted_counts + [0] * cfg.never_planted_canaries))
    ]
    documents: list[tuple[str, int, str]] = []
    for c in canaries:
        line = cfg.canary_template.replace("{secret}", c["secret"])
        for copy in range(c["repetitions"]):
            filler = rng.choice(len(lines), size=cfg.filler_lines)
            documents.append((AUDIT_SOURCE + c["id"], copy, "\n".join([line, *(lines[j] for j in filler)]) + "\n"))
    passage_counts = [r for r in cfg.passage_repetitions for _ in range(cfg.passages)] + [0] * cfg.passages
    texts: set[str] = set()
    passages = []
    for i, r in enumerate(passage_counts):
        text = ""
        while not text or text in texts:  # distinct passages: a repeat would be a member and a non-member
            text = "\n".join(lines[j] for j in rng.choice(len(lines), size=cfg.passage_lines, replace=False)) + "\n"
        texts.add(text)
        passages.append({"id": f"passage-{i:04d}", "text": text, "repetitions": r, "member": r > 0})
        documents.extend((AUDIT_SOURCE + passages[-1]["id"], copy, text) for copy in range(r))
    record = {
        "format": AUDIT_FORMAT,
        "config": dataclasses.asdict(cfg),
        "canary_template": cfg.canary_template,
        "canary_digits": cfg.canary_digits,
        "canaries": canaries,
        "passages": passages,
        "planted_documents": len(documents),
    }
    return record, documents


def planted_table(documents: list[tuple[str, int, str]], near: NearDedupConfig | None) -> pa.Table:
    """The planted documents as rows of cleaned documents (``dedup.DOC_COLUMNS``, and the MinHash
    ``signature`` when near-dedup is on), so dedup and the later stages treat them as any other."""
    texts = [t for _, _, t in documents]
    columns = {
        "source": pa.array([s for s, _, _ in documents], pa.string()),
        "doc_index": pa.array([i for _, i, _ in documents], pa.int64()),
        "doc_hash": pa.array([content_hash(t) for t in texts], pa.string()),
        "text": pa.array(texts, pa.string()),
        "bytes_out": pa.array([len(t.encode("utf-8")) for t in texts], pa.int64()),
        "group": pa.array([""] * len(texts), pa.string()),
    }
    if near is not None:
        flat = np.concatenate([minhash_signature(t, near) for t in texts]) if texts else np.zeros(0, np.uint32)
        columns["signature"] = pa.FixedSizeListArray.from_arrays(pa.array(flat), near.num_perm)
    return pa.table(columns)


def with_copies_kept(record: dict, kept: dict[str, int]) -> dict:
    """The record with each item's ``copies_kept`` (planted documents that survived dedup, by source)."""
    for item in record["canaries"] + record["passages"]:
        item["copies_kept"] = kept.get(AUDIT_SOURCE + item["id"], 0)
    record["kept_documents"] = sum(kept.values())
    return record


def audit_bytes(record: dict) -> bytes:
    return (json.dumps(record, indent=1) + "\n").encode()
