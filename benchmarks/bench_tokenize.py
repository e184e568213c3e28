"""Tokenize-stage throughput: the pipeline's Ray Data stage vs raw single-process tiktoken, same run.

Corpus: the embedded Shakespeare plays repeated ``--copies`` times (>= 100 MB by default), each copy
perturbed (a copy number per line) so no two documents are equal. Cleaning and dedup are bypassed:
this measures the tokenize stage alone (``data_pipeline.prepare.tokenize_stage`` on a materialized
document dataset), not the whole prepare().

Baseline, same documents and tokenizer, in this process: raw tiktoken ``encode_ordinary_batch(
num_threads=1)``. Prints its tokens/s, the stage's over all CPUs, and last the ratio
stage / (cores x raw).

    .venv/bin/python benchmarks/bench_tokenize.py [--copies 11] [--vocab-size 4096]
    .venv/bin/python benchmarks/bench_tokenize.py --smoke    # seconds: 4 plays, vocab 512
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from harness import local_ray, ship_by_value


def build_corpus(root: Path, plays: list[Path], copies: int) -> int:
    total = 0
    for c in range(copies):
        for play in plays:
            lines = play.read_text(encoding="utf-8").splitlines()
            text = "\n".join(f"{line} [{c}]" if line else line for line in lines)
            (root / f"{c:03d}_{play.name}").write_text(text, encoding="utf-8")
            total += len(text.encode())
    return total


def as_documents(batch):
    """Read rows -> the rows the tokenize stage gets in prepare (content hash, split, text)."""
    import pyarrow as pa

    from data_pipeline.clean import content_hash

    texts = batch.column("text").to_pylist()
    return pa.table(
        {
            "doc_hash": [content_hash(t) for t in texts],
            "split": pa.array([0] * len(texts), pa.int8()),
            "text": texts,
        }
    )


def main(argv: list[str] | None = None) -> float:
    """Runs the benchmark on ``argv`` (the command line when None); returns the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--copies", type=int, default=11)
    parser.add_argument("--plays", type=int, default=None, help="the first N embedded plays (default: all 78)")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--smoke", action="store_true", help="seconds: one copy of 4 plays, vocab 512")
    args = parser.parse_args(argv)
    if args.smoke:  # smaller defaults; flags given explicitly still win
        parser.set_defaults(copies=1, plays=4, vocab_size=512)
        args = parser.parse_args(argv)
    ship_by_value(__name__)
    with local_ray(include_dashboard=False, log_to_driver=False):
        return measure(args)


def measure(args) -> float:
    import pyarrow.compute as pc
    import ray

    from data_pipeline import tokenizer as tok
    from data_pipeline.config import SourceConfig
    from data_pipeline.prepare import tokenize_stage
    from data_pipeline.sources import read_documents, resolve_sources
    from data_pipeline.storage import EMBEDDED_GLOB, embedded_corpus_dir

    ray.data.DataContext.get_current().enable_progress_bars = False
    cores = int(ray.cluster_resources()["CPU"])
    plays = sorted(embedded_corpus_dir().glob(EMBEDDED_GLOB))[: args.plays]
    with tempfile.TemporaryDirectory() as tmp:
        corpus_bytes = build_corpus(Path(tmp), plays, args.copies)
        print(f"corpus: {corpus_bytes / 1e6:.1f} MB, {args.copies} perturbed copies of {len(plays)} Shakespeare plays")
        docs = (
            read_documents(resolve_sources(SourceConfig(uris=[f"{tmp}/*.txt"])), SourceConfig())
            .map_batches(as_documents, batch_format="pyarrow")
            .materialize()
        )
        texts = [t for b in docs.iter_batches(batch_format="pyarrow") for t in b.column("text").to_pylist()]

    spec = tok.train_bpe([p.read_text(encoding="utf-8") for p in plays], args.vocab_size, "gpt4")
    enc = tok.encoding(spec)

    t0 = time.perf_counter()
    raw_tokens = sum(len(ids) for ids in enc.encode_ordinary_batch(texts, num_threads=1))
    raw_s = time.perf_counter() - t0
    raw_rate = raw_tokens / raw_s
    del texts

    # warm-up: start workers and build each one's Encoding outside the timed run
    tokenize_stage(docs.limit(4 * cores), spec).materialize()
    t0 = time.perf_counter()
    out = tokenize_stage(docs, spec).materialize()
    pipe_s = time.perf_counter() - t0
    # minus the appended eot per document (read back in the driver: Dataset.sum would shuffle)
    counts = [(pc.sum(b.column("num_tokens")).as_py(), b.num_rows) for b in out.iter_batches(batch_format="pyarrow")]
    pipe_tokens = sum(n for n, _ in counts) - sum(rows for _, rows in counts)
    pipe_rate = pipe_tokens / pipe_s

    if pipe_tokens != raw_tokens:
        raise RuntimeError(f"the stage made {pipe_tokens:,} tokens, raw tiktoken {raw_tokens:,}: not the same work")
    ratio = pipe_rate / (cores * raw_rate)
    print(f"raw tiktoken, 1 process:   {raw_tokens:,} tokens in {raw_s:.2f} s = {raw_rate / 1e6:.2f} M tokens/s")
    print(
        f"pipeline stage, {cores} CPUs:   {pipe_tokens:,} tokens in {pipe_s:.2f} s = {pipe_rate / 1e6:.2f} M tokens/s "
        f"({pipe_rate / cores / 1e6:.2f} M tokens/s per core)"
    )
    print(f"tokenize stage / (cores x raw tiktoken): {ratio:.2f}")
    return ratio


if __name__ == "__main__":
    main()
