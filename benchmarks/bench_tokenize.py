"""Tokenize-stage throughput: the pipeline's Ray Data stage vs raw single-process tiktoken, same run.

Corpus: the embedded Shakespeare plays repeated ``--copies`` times (>= 100 MB by default), each copy
perturbed (a copy number per line) so no two documents are equal. Cleaning and dedup are bypassed:
this measures the tokenize stage alone (``data_pipeline.shards.tokenize_batch`` on a materialized
document dataset), not the whole prepare().

Prints tokens/s for raw ``Encoding.encode_ordinary_batch(num_threads=1)`` in this process, tokens/s
of the Ray stage over all CPUs, per-core rates and the ratio pipeline / (cores x raw).

    .venv/bin/python benchmarks/bench_tokenize.py [--copies 11] [--vocab-size 4096]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import pyarrow as pa  # noqa: E402
import ray  # noqa: E402

from data_pipeline import tokenizer as tok  # noqa: E402
from data_pipeline.clean import content_hash  # noqa: E402
from data_pipeline.config import SourceConfig  # noqa: E402
from data_pipeline.shards import tokenize_batch  # noqa: E402
from data_pipeline.sources import read_documents, resolve_sources  # noqa: E402
from data_pipeline.storage import EMBEDDED_GLOB, embedded_corpus_dir  # noqa: E402


def build_corpus(root: Path, copies: int) -> int:
    plays = sorted(embedded_corpus_dir().glob(EMBEDDED_GLOB))
    total = 0
    for c in range(copies):
        for play in plays:
            lines = play.read_text(encoding="utf-8").splitlines()
            text = "\n".join(f"{line} [{c}]" if line else line for line in lines)
            (root / f"{c:03d}_{play.name}").write_text(text, encoding="utf-8")
            total += len(text.encode())
    return total


def as_documents(batch: pa.Table) -> pa.Table:
    texts = batch.column("text").to_pylist()
    return pa.table({"doc_hash": [content_hash(t) for t in texts], "text": texts})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--copies", type=int, default=11)
    parser.add_argument("--vocab-size", type=int, default=4096)
    args = parser.parse_args()

    ray.init(include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    cores = int(ray.cluster_resources()["CPU"])
    with tempfile.TemporaryDirectory() as tmp:
        corpus_bytes = build_corpus(Path(tmp), args.copies)
        print(f"corpus: {corpus_bytes / 1e6:.1f} MB, {args.copies} perturbed copies of the Shakespeare plays")
        docs = (
            read_documents(resolve_sources(SourceConfig(uris=[f"{tmp}/*.txt"])), SourceConfig())
            .map_batches(as_documents, batch_format="pyarrow")
            .materialize()
        )
        texts = [t for b in docs.iter_batches(batch_format="pyarrow") for t in b.column("text").to_pylist()]

    plays = [p.read_text(encoding="utf-8") for p in sorted(embedded_corpus_dir().glob(EMBEDDED_GLOB))]
    spec = tok.train_bpe(plays, args.vocab_size, "gpt4")
    enc = tok.encoding(spec)

    t0 = time.perf_counter()
    raw_tokens = sum(len(ids) for ids in enc.encode_ordinary_batch(texts, num_threads=1))
    raw_s = time.perf_counter() - t0
    raw_rate = raw_tokens / raw_s
    del texts

    spec_ref = ray.put(spec)
    fn_kwargs = {"spec_ref": spec_ref, "tokenizer_hash": spec["hash"], "val_fraction": 0.05, "seed": 0}
    # warm-up: start workers and build each one's Encoding outside the timed run
    docs.limit(4 * cores).map_batches(
        tokenize_batch, batch_format="pyarrow", batch_size=1, fn_kwargs=fn_kwargs
    ).materialize()
    t0 = time.perf_counter()
    out = docs.map_batches(tokenize_batch, batch_format="pyarrow", batch_size=64, fn_kwargs=fn_kwargs).materialize()
    pipe_s = time.perf_counter() - t0
    pipe_tokens = int(out.sum("num_tokens")) - out.count()  # minus the appended eot per document
    pipe_rate = pipe_tokens / pipe_s

    assert pipe_tokens == raw_tokens, (pipe_tokens, raw_tokens)
    print(f"raw tiktoken, 1 process:   {raw_tokens:,} tokens in {raw_s:.2f} s = {raw_rate / 1e6:.2f} M tokens/s")
    print(
        f"pipeline stage, {cores} CPUs:   {pipe_tokens:,} tokens in {pipe_s:.2f} s = {pipe_rate / 1e6:.2f} M tokens/s "
        f"({pipe_rate / cores / 1e6:.2f} M tokens/s per core)"
    )
    print(f"ratio pipeline / ({cores} x raw) = {pipe_rate / (cores * raw_rate):.2f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
