"""Tokenize-stage throughput: the pipeline's Ray Data stage vs raw single-process tiktoken, same run.

Corpus: the embedded Shakespeare plays repeated ``--copies`` times (>= 100 MB by default), each copy
perturbed (a copy number per line) so no two documents are equal. Cleaning and dedup are bypassed:
this measures the tokenize stage alone (``data_pipeline.prepare.tokenize_stage``, what prepare runs, on
a materialized document dataset), not the whole prepare().

Baseline, same documents and tokenizer: raw single-process tiktoken, the faster of
``encode_ordinary_batch(num_threads=1)`` in this process (which also runs Ray's driver) and
``encode_to_numpy`` per document (the same ids; what the stage calls) in a plain process. Also
measured: ``cores`` plain processes encoding a share each at once, i.e. what this machine's cores give
tiktoken with no pipeline around it. Each runs ``--repeats`` times, interleaved with the stage; the best
run of each counts. Last line: ``tokenize stage / (cores x raw tiktoken): R``.

    .venv/bin/python benchmarks/bench_tokenize.py [--copies 11] [--vocab-size 4096] [--repeats 3]
    .venv/bin/python benchmarks/bench_tokenize.py --smoke    # seconds: 4 plays, vocab 512, 1 repeat
"""

from __future__ import annotations

import argparse
import os
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


_ENCODING = None  # in each plain process of the capacity measurement


def _start_process(spec: dict) -> None:
    global _ENCODING
    from data_pipeline import tokenizer as tok

    _ENCODING = tok.encoding(spec)


def _encode_share(texts: list[str]) -> int:
    return sum(len(_ENCODING.encode_to_numpy(t, disallowed_special=())) for t in texts)


def raw_run(enc, texts: list[str]) -> tuple[int, float]:
    """(tokens, seconds) of this process encoding ``texts`` with ``encode_ordinary_batch``, one thread."""
    t0 = time.perf_counter()
    tokens = sum(len(ids) for ids in enc.encode_ordinary_batch(texts, num_threads=1))
    return tokens, time.perf_counter() - t0


def processes_run(pool, texts: list[str], processes: int) -> tuple[int, float]:
    """(tokens, seconds) of ``processes`` warm plain processes of ``pool`` encoding a byte-balanced share
    each, at once."""
    shares: list[list[str]] = [[] for _ in range(processes)]
    loads = [0] * processes
    for t in sorted(texts, key=len, reverse=True):
        i = loads.index(min(loads))
        shares[i].append(t)
        loads[i] += len(t)
    t0 = time.perf_counter()
    tokens = sum(pool.map(_encode_share, shares))
    return tokens, time.perf_counter() - t0


def stage_run(tokenize_stage, docs, spec: dict) -> tuple[int, float]:
    """(tokens without the eot per document, seconds) of the stage over ``docs``, materialized."""
    import pyarrow.compute as pc

    t0 = time.perf_counter()
    out = tokenize_stage(docs, spec).materialize()
    seconds = time.perf_counter() - t0
    # read back in the driver: Dataset.sum would shuffle
    counted = [(pc.sum(b.column("num_tokens")).as_py(), b.num_rows) for b in out.iter_batches(batch_format="pyarrow")]
    return sum(n for n, _ in counted) - sum(rows for _, rows in counted), seconds


def main(argv: list[str] | None = None) -> float:
    """Runs the benchmark on ``argv`` (the command line when None); returns the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--copies", type=int, default=11)
    parser.add_argument("--plays", type=int, default=None, help="the first N embedded plays (default: all 78)")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side, interleaved; the best counts")
    parser.add_argument("--smoke", action="store_true", help="seconds: one copy of 4 plays, vocab 512, 1 repeat")
    args = parser.parse_args(argv)
    if args.smoke:  # smaller defaults; flags given explicitly still win
        parser.set_defaults(copies=1, plays=4, vocab_size=512, repeats=1)
        args = parser.parse_args(argv)
    ship_by_value(__name__)
    with local_ray(include_dashboard=False, log_to_driver=False):
        return measure(args)


def measure(args) -> float:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

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
        docs = (
            read_documents(resolve_sources(SourceConfig(uris=[f"{tmp}/*.txt"])), SourceConfig())
            .map_batches(as_documents, batch_format="pyarrow")
            .materialize()
        )
    texts = [t for b in docs.iter_batches(batch_format="pyarrow") for t in b.column("text").to_pylist()]
    print(
        f"corpus: {corpus_bytes / 1e6:.1f} MB, {len(texts)} documents ({args.copies} perturbed copies of "
        f"{len(plays)} plays) in {docs.num_blocks()} blocks; {cores} CPUs; load average {_load()}"
    )
    spec = tok.train_bpe([p.read_text(encoding="utf-8") for p in plays], args.vocab_size, "gpt4")
    enc = tok.encoding(spec)

    raw: dict[str, list[float]] = {}
    procs, stage = [], []
    in_driver, plain_one = "encode_ordinary_batch, this process", "encode_to_numpy, plain process"
    spawn = multiprocessing.get_context("spawn")  # never fork a process that runs Ray's threads
    with ProcessPoolExecutor(cores, mp_context=spawn, initializer=_start_process, initargs=(spec,)) as pool:
        processes_run(pool, texts[: 2 * cores], cores)  # warm-up: every process has started
        # warm-up: start Ray's workers and build each one's Encoding outside the timed runs
        tokenize_stage(docs.limit(4 * cores).materialize(), spec).materialize()
        for _ in range(args.repeats):
            expected, seconds = raw_run(enc, texts)
            raw.setdefault(in_driver, []).append(expected / seconds)
            runs = {
                plain_one: processes_run(pool, texts, 1),
                "processes": processes_run(pool, texts, cores),
                "stage": stage_run(tokenize_stage, docs, spec),
            }
            for name, (tokens, _) in runs.items():
                if tokens != expected:
                    raise RuntimeError(f"{name} made {tokens:,} tokens, raw tiktoken {expected:,}: not the same work")
            raw.setdefault(plain_one, []).append(runs[plain_one][0] / runs[plain_one][1])
            procs.append(runs["processes"][0] / runs["processes"][1])
            stage.append(runs["stage"][0] / runs["stage"][1])

    best_api = max(raw, key=lambda api: max(raw[api]))
    raw_rate, procs_rate, stage_rate = max(raw[best_api]), max(procs), max(stage)
    ratio = stage_rate / (cores * raw_rate)
    print(f"{expected:,} tokens per run; best of {args.repeats} (M tokens/s of every run in brackets)")
    for api, rates in raw.items():
        mark = "  <- raw, the fastest" if api == best_api else ""
        print(f"raw tiktoken, 1 process, {api}: {max(rates) / 1e6:.2f} M tokens/s {_runs(rates)}{mark}")
    print(
        f"raw tiktoken, {cores} plain processes at once: {procs_rate / 1e6:.2f} M tokens/s {_runs(procs)} = "
        f"{procs_rate / (cores * raw_rate):.2f} of {cores} x raw ({best_api}): what the cores give tiktoken"
    )
    print(
        f"tokenize stage, Ray Data on {cores} CPUs: {stage_rate / 1e6:.2f} M tokens/s {_runs(stage)} "
        f"({stage_rate / cores / 1e6:.2f} per core) = {stage_rate / procs_rate:.2f} of the plain processes"
    )
    print(f"load average {_load()} (pid {os.getpid()})")
    print(f"tokenize stage / (cores x raw tiktoken): {ratio:.2f}")
    return ratio


def _runs(rates: list[float]) -> str:
    return "[" + ", ".join(f"{r / 1e6:.2f}" for r in rates) + "]"


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
