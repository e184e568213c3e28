"""Ingest read amplification: bytes each rank reads from storage vs bytes of the rows it trains on.

For 1, 2 and 4 ranks, runs every rank's ``data_pipeline.loader.rank_batches`` reader in this process
for ``--steps`` optimizer steps of ``--global-batch`` sequences and reads its counters: bytes read,
measured at the filesystem layer (a counting pyarrow filesystem under the reader), against the bytes of
the rows it yielded (rows x (seq_len + 1) x token bytes). Footers are read once by the driver
(``shard_footers``) and handed to the ranks, as training does; the ratio when each rank reads them
itself is printed too. Baseline, same run: the stream reader this replaces had every rank read every
shard in full, measured here by reading all train shards through the same counting filesystem.
Resume cost: rows and bytes a rank reads before its first batch when started at an early vs a late step.
With ``--train``, the same measure also comes from real training: ``raylm train`` of a tiny model on
1, 2 and 4 Ray Train workers, whose ranks log the bytes their reader fetched (the same counting
filesystem) and the bytes of the rows they trained on in metrics.jsonl; the ratio there is the max over
ranks at the last step, driver footers excluded as above.

    .venv/bin/python benchmarks/bench_ingest.py --data runs/data/shakespeare/manifest.json [--steps 8] [--train]
    .venv/bin/python benchmarks/bench_ingest.py --smoke    # seconds: 2 steps of 16 rows on data it prepares

Prints one line per worker count and, last, ``read/trained at 4 workers: R``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
from harness import local_ray, smoke_manifest

from data_pipeline.loader import ShardReader, rank_batches, read_manifest, shard_footers


def run_ranks(manifest: dict, args, world_size: int, start_step: int, num_steps: int, footers, prefetch: int = 2):
    """Each rank's stats after reading ``num_steps`` steps from ``start_step``."""
    stats = []
    for rank in range(world_size):
        reader = rank_batches(
            manifest,
            seed=args.seed,
            global_batch_size=args.global_batch,
            micro_batch_size=args.micro_batch,
            rank=rank,
            world_size=world_size,
            start_step=start_step,
            num_steps=num_steps,
            endpoint_url=args.endpoint_url,
            footers=footers,
            prefetch=prefetch,
        )
        for _ in reader:
            pass
        stats.append(reader.stats)
    return stats


def first_batch_cost(manifest: dict, args, start_step: int, footers) -> dict:
    """Rank 1 of 4, started at ``start_step``, read in the caller's thread up to its first batch."""
    reader = rank_batches(
        manifest,
        seed=args.seed,
        global_batch_size=args.global_batch,
        micro_batch_size=args.micro_batch,
        rank=1,
        world_size=4,
        start_step=start_step,
        num_steps=1_000_000,
        endpoint_url=args.endpoint_url,
        footers=footers,
        prefetch=0,
    )
    next(iter(reader))
    return reader.stats


def whole_stream_bytes(manifest: dict, args) -> tuple[int, int]:
    """(bytes read, rows) when one reader decodes every train shard in full, as each rank did before."""
    reader = ShardReader(manifest, "train", endpoint_url=args.endpoint_url)
    for shard in reader.shards:
        pq.read_table(f"{reader.base_path}/{shard['file']}", filesystem=reader.fs)
    return reader.counter.bytes_read, sum(s["sequences"] for s in reader.shards)


def train_ratio(manifest_uri: str, args, world_size: int, root: str) -> dict:
    """Read/trained per rank from a real ``raylm train`` run on ``world_size`` CPU workers."""
    from orchestration.artifacts import RunDir, read_metrics
    from orchestration.config import load_config
    from orchestration.train.driver import run_training

    overrides = [
        f"train.data={manifest_uri}",
        f"train.storage_path={root}",
        f"train.run_name=ingest-w{world_size}",
        f"train.num_workers={world_size}",
        f"train.cpus_per_worker={min(1.0, 2.0 / world_size)}",
        f"train.micro_batch_size={args.micro_batch}",
        f"train.global_batch_size={args.global_batch}",
        f"train.max_steps={args.steps}",
        "train.warmup_steps=1",
        f"train.log_interval={args.steps}",
        "train.eval_interval=0",
        "train.checkpoint_interval=0",
        "train.val_sequences=8",
        f"train.endpoint_url={args.endpoint_url}" if args.endpoint_url else "train.endpoint_url=null",
        "model.n_layer=1",
        "model.n_head=2",
        "model.n_embd=32",
        f"model.block_size={read_manifest(manifest_uri, args.endpoint_url)['seq_len']}",
    ]
    summary = run_training(load_config(None, overrides), resume=False)
    last = read_metrics(RunDir.at(summary["run_dir"]))[-1]
    pairs = zip(last["data_read_bytes_per_rank"], last["data_trained_bytes_per_rank"])
    return {"ratio": max(read / trained for read, trained in pairs), "read": last["data_read_bytes_per_rank"],
            "trained": last["data_trained_bytes_per_rank"]}  # fmt: skip


def main(argv: list[str] | None = None) -> dict[int, float]:
    """Runs the benchmark on ``argv`` (the command line when None); returns read/trained per worker count."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=None, help="manifest.json URI (or its directory); --smoke prepares one")
    parser.add_argument("--global-batch", type=int, default=64, help="sequences per optimizer step")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--late-step", type=int, default=0, help="resume step compared to step 1 (0: 3 epochs in)")
    parser.add_argument("--endpoint-url", default=None)
    parser.add_argument("--train", action="store_true", help="also measure through real Ray Train workers")
    parser.add_argument(
        "--smoke", action="store_true", help="seconds: 2 steps of 16 rows; without --data, on a corpus it prepares"
    )
    args = parser.parse_args(argv)
    if args.smoke:  # smaller defaults; flags given explicitly still win
        parser.set_defaults(steps=2, global_batch=16)
        args = parser.parse_args(argv)
    if args.data is not None:
        return measure(args)
    if not args.smoke:
        parser.error("--data is required (a manifest written by `raylm prepare`), or run with --smoke")
    with tempfile.TemporaryDirectory(prefix="raylm_bench_ingest_") as tmp, local_ray(include_dashboard=False):
        args.data = smoke_manifest(Path(tmp))
        return measure(args)


def measure(args) -> dict[int, float]:
    manifest = read_manifest(args.data, args.endpoint_url)
    t0 = time.perf_counter()
    footers = shard_footers(manifest, "train", args.endpoint_url)
    footer_bytes = sum(f.serialized_size + 8 for f in footers.values())
    print(
        f"[bench_ingest] {manifest['uri']}: {manifest['splits']['train']['sequences']:,} train rows of "
        f"{manifest['row_tokens']} x {manifest['dtype']}; driver read {len(footers)} footers "
        f"({footer_bytes / 1e3:.1f} kB) in {time.perf_counter() - t0:.2f} s"
    )
    stream_bytes, stream_rows = whole_stream_bytes(manifest, args)
    row_bytes = ShardReader(manifest, "train").row_bytes
    ratio = {}
    for world_size in (1, 2, 4):
        t0 = time.perf_counter()
        stats = run_ranks(manifest, args, world_size, 0, args.steps, footers)
        wall_s = time.perf_counter() - t0
        own = run_ranks(manifest, args, world_size, 0, args.steps, None)
        ratio[world_size] = max(s["bytes_read"] / s["row_bytes_yielded"] for s in stats)
        own_ratio = max(s["bytes_read"] / s["row_bytes_yielded"] for s in own)
        # before: every rank read the whole stream, i.e. per epoch all shards for 1/W of the rows
        today = stream_bytes / (stream_rows // world_size * row_bytes)
        s0 = stats[0]
        print(
            f"workers={world_size} steps={args.steps} global_batch={args.global_batch}: per rank read "
            f"{s0['bytes_read'] / 1e3:.1f} kB for {s0['row_bytes_yielded'] / 1e3:.1f} kB of trained rows, rows "
            f"read/trained {s0['rows_read']}/{s0['rows_yielded']}; read/trained {ratio[world_size]:.3f} (max over "
            f"ranks; {own_ratio:.2f} if each rank reads the footers itself; whole-stream reader before: "
            f"{today:.2f}); {wall_s:.2f} s"
        )
    epoch_steps = manifest["splits"]["train"]["sequences"] // args.global_batch
    late = args.late_step or 3 * epoch_steps + 1
    early_cost, late_cost = (first_batch_cost(manifest, args, s, footers) for s in (1, late))
    print(
        f"resume at step 1 vs step {late} (epoch {late // max(1, epoch_steps)}), rank 1 of 4: rows read before "
        f"the first batch {early_cost['rows_read']} vs {late_cost['rows_read']}, "
        f"bytes {early_cost['bytes_read']:,} vs {late_cost['bytes_read']:,}"
    )
    if args.train:
        import tempfile

        root = tempfile.mkdtemp(prefix="raylm_bench_ingest_")
        for world_size in (1, 2, 4):
            got = train_ratio(manifest["uri"], args, world_size, root)
            ratio[world_size] = got["ratio"]
            print(
                f"raylm train, workers={world_size}: per rank read {[round(b / 1e3, 1) for b in got['read']]} kB for "
                f"{[round(b / 1e3, 1) for b in got['trained']]} kB of trained rows; read/trained {got['ratio']:.3f}"
            )
    print(f"read/trained at 4 workers: {ratio[4]:.3f}" + (" (raylm train)" if args.train else ""))
    return ratio


if __name__ == "__main__":
    main()
