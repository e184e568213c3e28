"""PII redaction throughput per core, recall on planted data and false finds, against the other cleaning
steps measured in the same run on the same documents.

One process, one thread (per-core numbers: prepare runs this per document inside Ray Data tasks, one
per CPU). The documents are the embedded Shakespeare texts with ``--planted`` items of each type set in
sentences and spread over them. Baseline: the default cleaning steps before redaction (markup,
unicode NFC, whitespace, Gutenberg) on the same documents. Prints MB/s per core of each, the time of
each type's detector, recall per type on the planted items (exact spans), and finds outside them (in
the plays: false spans).

    .venv/bin/python benchmarks/bench_pii.py [--planted 250]
    .venv/bin/python benchmarks/bench_pii.py --smoke    # seconds: six short texts, 20 planted per type

Last line: ``pii redaction: X MB/s per core, R x the other cleaning steps' time``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

from harness import SMOKE_TEXTS

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.pii_planted: the planted items
from data_pipeline.clean import clean_text, decode_utf8  # noqa: E402
from data_pipeline.config import CleanConfig  # noqa: E402
from data_pipeline.pii import PII_TYPES, find_pii  # noqa: E402
from data_pipeline.storage import embedded_corpus_dir  # noqa: E402
from tests.pii_planted import planted_pii, planted_text  # noqa: E402


def clean(text: str) -> str:
    """prepare's default cleaning steps before redaction (the baseline)."""
    return clean_text(text, CleanConfig())[0]


def with_planted(cleaned: list[str], planted: int, seed: int) -> tuple[list[str], list[tuple[int, int, int, str]]]:
    """Each cleaned text with its share of the planted sentences appended (after cleaning: the Gutenberg
    step cuts everything past a licence marker), and (document, start, end, type) of every item."""
    pii = planted_pii(planted, seed)
    docs, spans = [], []
    for d, text in enumerate(cleaned):
        block, where = planted_text({k: v[d :: len(cleaned)] for k, v in pii.items()}, seed + d)
        docs.append(text + "\n\n" + block)
        spans += [(d, len(text) + 2 + a, len(text) + 2 + b, kind) for a, b, kind in where]
    return docs, spans


def main(argv: list[str] | None = None) -> float:
    """Runs the benchmark; returns redaction's time / the other cleaning steps' time."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--planted", type=int, default=250, help="planted items of each type")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="six short texts, 20 planted items per type")
    args = parser.parse_args(argv)
    if args.smoke:
        parser.set_defaults(planted=20)
        args = parser.parse_args(argv)
    paths = sorted(embedded_corpus_dir().glob("*.txt"))
    paths = [p for p in paths if p.name in SMOKE_TEXTS] if args.smoke else paths
    raw = [decode_utf8(p.read_bytes())[0] for p in paths]
    raw_mb = sum(len(t.encode("utf-8")) for t in raw) / 1e6
    t0 = time.perf_counter()
    cleaned = [clean(t) for t in raw]
    clean_s = time.perf_counter() - t0
    docs, planted = with_planted(cleaned, args.planted, args.seed)
    docs_mb = sum(len(t.encode("utf-8")) for t in docs) / 1e6
    per_type = {}
    for kind in PII_TYPES:  # each detector alone, for where the time goes
        t0 = time.perf_counter()
        for doc in docs:
            find_pii(doc, [kind])
        per_type[kind] = time.perf_counter() - t0
    t0 = time.perf_counter()
    found = [find_pii(doc, PII_TYPES) for doc in docs]
    pii_s = time.perf_counter() - t0
    exact = {(d, s.start, s.end): s.kind for d, spans in enumerate(found) for s in spans}
    total = Counter(kind for *_, kind in planted)
    hits = Counter(kind for d, a, b, kind in planted if exact.get((d, a, b)) == kind)
    planted_at = {(d, a, b) for d, a, b, _ in planted}
    false = [(paths[d].name, docs[d][s.start : s.end], s.kind) for d, spans in enumerate(found) for s in spans
             if (d, s.start, s.end) not in planted_at]  # fmt: skip
    print(
        f"[bench_pii] {len(docs)} texts, {raw_mb:.2f} MB raw -> {docs_mb:.2f} MB cleaned with "
        f"{sum(total.values())} planted items; one thread"
    )
    print(f"other cleaning steps (markup, NFC, whitespace, Gutenberg): {clean_s:.2f} s, {raw_mb / clean_s:.1f} MB/s")
    print(
        "detectors alone: "
        + ", ".join(f"{k} {per_type[k]:.2f} s ({docs_mb / per_type[k]:.1f} MB/s)" for k in PII_TYPES)
    )
    print("recall on planted items (exact spans): " + ", ".join(f"{k} {hits[k]}/{total[k]}" for k in PII_TYPES))
    print(f"finds outside the planted items (false spans): {len(false)}" + (f" {false[:5]}" if false else ""))
    ratio = pii_s / clean_s
    print(f"pii redaction: {docs_mb / pii_s:.1f} MB/s per core, {ratio:.2f} x the other cleaning steps' time")
    return ratio


if __name__ == "__main__":
    main()
