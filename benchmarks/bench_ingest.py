"""Ingest read amplification: bytes each rank reads from storage vs the compressed bytes of the row
groups it trains on, and what the row-group index costs at start.

For 1, 2 and 4 ranks, runs every rank's ``data_pipeline.loader.rank_batches`` reader in this process
for ``--steps`` optimizer steps of ``--global-batch`` sequences and reads its counters, taken where
bytes come back from storage: shard bytes plus row-group index records read, against the compressed
bytes of the row groups holding the rows it trained on (ideal 1.0; the index's share is printed
apart). Baselines, same run: the stream reader that every rank once used read every shard in full
(measured here as the shards' sizes), and the footers the driver used to read and hand every rank
(the Parquet footers of the same shards, measured). Resume cost: rows and bytes a rank reads before
its first batch when started at an early vs a late step. Index startup: a synthetic manifest of
``--synthetic-row-groups`` row groups (index file and manifest only, no shards) timed from reading the
manifest to the records of a rank's first step, against the footers the same layout would need
(one 1024-row-group shard written and its footer measured, times the number of shards). With
``--train``, the same ratio also comes from real training: ``raylm train`` of a tiny model on 1, 2 and
4 Ray Train workers, whose ranks log bytes read and needed in metrics.jsonl (max over ranks, last step).

    .venv/bin/python benchmarks/bench_ingest.py --data runs/data/shakespeare/manifest.json [--steps 8] [--train]
    .venv/bin/python benchmarks/bench_ingest.py --smoke    # seconds: 2 steps of 16 rows on data it prepares

Prints one line per worker count and, last, ``read/needed at 4 workers: R``.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from harness import local_ray, smoke_manifest

from data_pipeline.loader import rank_batches
from data_pipeline.manifest import (
    Manifest,
    ShardEntry,
    SplitEntry,
    TokenizerEntry,
    manifest_dir,
    read_manifest,
    write_manifest,
)
from data_pipeline.order import TrainOrder
from data_pipeline.row_index import RECORD, write_index
from data_pipeline.shard_reader import ShardReader
from data_pipeline.shards import BLOCK_ROWS, CODEC, shard_bytes
from data_pipeline.storage import filesystem_for


def run_ranks(manifest: dict, args, world_size: int, start_step: int, num_steps: int, prefetch: int = 2):
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
            prefetch=prefetch,
        )
        for _ in reader:
            pass
        stats.append(reader.stats)
    return stats


def first_batch_cost(manifest: dict, args, start_step: int) -> dict:
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
        prefetch=0,
    )
    next(iter(reader))
    return reader.stats


def train_chunks(manifest: dict, args) -> np.ndarray:
    """RECORD [row groups]: the whole train index, read once here for the baseline's arithmetic."""
    fs, base = filesystem_for(manifest_dir(manifest["uri"]), args.endpoint_url)
    with fs.open_input_file(f"{base}/{manifest['splits']['train']['index']['file']}") as f:
        return np.frombuffer(f.read(), dtype=RECORD)


def footer_bytes(manifest: dict, args) -> int:
    """Bytes of the train shards' Parquet footers (what the driver once read and shipped to every rank)."""
    fs, base = filesystem_for(manifest_dir(manifest["uri"]), args.endpoint_url)
    total = 0
    for shard in manifest["splits"]["train"]["shards"]:
        with fs.open_input_file(f"{base}/{shard['file']}") as f:
            total += pq.read_metadata(f).serialized_size + 8
    return total


def synthetic_manifest(root: Path, row_groups: int, groups_per_shard: int, seq_len: int) -> str:
    """A manifest whose train split has ``row_groups`` row groups of BLOCK_ROWS rows in shards of
    ``groups_per_shard``, with its index file: every record a plausible chunk, no shard data written."""
    sizes = [groups_per_shard] * (row_groups // groups_per_shard) + (
        [row_groups % groups_per_shard] if row_groups % groups_per_shard else []
    )
    records = []
    for n in sizes:
        rec = np.zeros(n, dtype=RECORD)
        rec["length"] = BLOCK_ROWS * (seq_len + 1)  # about a byte a token, as zstd leaves real text
        rec["offset"] = 4 + np.arange(n, dtype=np.uint64) * rec["length"]
        rec["rows"], rec["crc32"] = BLOCK_ROWS, np.arange(n, dtype=np.uint32)
        records.append(rec.tobytes())
    fs = pafs.LocalFileSystem()
    fs.create_dir(str(root / "train"))
    shards = [
        ShardEntry(
            file=f"train/shard-{i:05d}.parquet",
            sequences=n * BLOCK_ROWS,
            sha256="0" * 64,
            bytes=4 + n * BLOCK_ROWS * (seq_len + 1),
            row_groups=n,
        )
        for i, n in enumerate(sizes)
    ]
    split = SplitEntry(
        documents=len(sizes),
        tokens=row_groups * BLOCK_ROWS * (seq_len + 1),
        sequences=row_groups * BLOCK_ROWS,
        dropped_tail_tokens=0,
        num_shards=len(sizes),
        shards=shards,
        index=write_index(fs, str(root), "train", records, CODEC),
    )
    tokenizer = TokenizerEntry(name="synthetic", hash="0" * 64, n_vocab=50304, eot_token=50256, ranks_file="-",
                               meta_file="-")  # fmt: skip
    manifest = Manifest(tokenizer=tokenizer, seq_len=seq_len, row_tokens=seq_len + 1, dtype="uint16",
                        splits={"train": split})  # fmt: skip
    write_manifest(manifest, fs, str(root))
    return str(root / "manifest.json")


def index_startup(args) -> str:
    """The synthetic manifest's startup, timed, and the footers the same layout would take."""
    groups_per_shard = 1024
    with tempfile.TemporaryDirectory(prefix="raylm_bench_index_") as tmp:
        uri = synthetic_manifest(Path(tmp), args.synthetic_row_groups, groups_per_shard, args.synthetic_seq_len)
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t0 = time.perf_counter()
        manifest = read_manifest(uri)
        t_manifest = time.perf_counter() - t0
        reader = ShardReader(manifest, "train")
        order = TrainOrder([s["sequences"] for s in reader.shards], seed=0)
        per_rank = args.global_batch // 4
        numbers = []
        for shard, lo, hi in order.segments(per_rank, 2 * per_rank):  # rank 1 of 4, step 0
            numbers.extend(reader.index.first[shard] + np.arange(lo // BLOCK_ROWS, -(-hi // BLOCK_ROWS)))
        records = reader.index.records(np.array(numbers))
        wall = time.perf_counter() - t0
        rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024
        manifest_bytes = Path(uri).stat().st_size
        index_bytes = Path(tmp, "train/row_groups.idx").stat().st_size
    assert len(records) == len(numbers)
    rows = np.zeros((groups_per_shard * BLOCK_ROWS, args.synthetic_seq_len + 1), dtype=np.uint16)
    data, _ = shard_bytes(rows, args.synthetic_seq_len + 1, "uint16", {"format": "synthetic"})
    one_footer = pq.read_metadata(pa.BufferReader(data)).serialized_size + 8
    footers = one_footer * -(-args.synthetic_row_groups // groups_per_shard)
    return (
        f"index startup, synthetic {args.synthetic_row_groups:,} row groups in "
        f"{-(-args.synthetic_row_groups // groups_per_shard)} shards (seq_len {args.synthetic_seq_len}): manifest "
        f"{manifest_bytes / 1e6:.2f} MB read in {t_manifest:.2f} s; to the first step's records {wall:.2f} s, "
        f"{reader.index_bytes_read:,} index bytes read of {index_bytes / 1e6:.1f} MB, peak RSS +{rss / 1e6:.0f} MB; "
        f"footers for the same layout: {footers / 1e6:.1f} MB ({one_footer:,} B per {groups_per_shard}-row-group "
        "shard, measured) read by the driver and shipped to every rank before"
    )


def train_ratio(manifest_uri: str, args, world_size: int, root: str) -> dict:
    """Read/needed per rank from a real ``raylm train`` run on ``world_size`` CPU workers."""
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
    pairs = zip(last["data_read_bytes_per_rank"], last["data_needed_bytes_per_rank"])
    return {"ratio": max(read / needed for read, needed in pairs), "read": last["data_read_bytes_per_rank"],
            "needed": last["data_needed_bytes_per_rank"]}  # fmt: skip


def main(argv: list[str] | None = None) -> dict[int, float]:
    """Runs the benchmark on ``argv`` (the command line when None); returns read/needed per worker count."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=None, help="manifest.json URI (or its directory); --smoke prepares one")
    parser.add_argument("--global-batch", type=int, default=64, help="sequences per optimizer step")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--late-step", type=int, default=0, help="resume step compared to step 1 (0: 3 epochs in)")
    parser.add_argument("--endpoint-url", default=None)
    parser.add_argument("--train", action="store_true", help="also measure through real Ray Train workers")
    parser.add_argument("--synthetic-row-groups", type=int, default=1_000_000, help="index startup manifest size")
    parser.add_argument("--synthetic-seq-len", type=int, default=2048)
    parser.add_argument(
        "--smoke", action="store_true", help="seconds: 2 steps of 16 rows; without --data, on a corpus it prepares"
    )
    args = parser.parse_args(argv)
    if args.smoke:  # smaller defaults; flags given explicitly still win
        parser.set_defaults(steps=2, global_batch=16, synthetic_row_groups=20_000)
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
    shards = manifest["splits"]["train"]["shards"]
    train_rows, shard_total = sum(s["sequences"] for s in shards), sum(s["bytes"] for s in shards)
    print(
        f"[bench_ingest] {manifest['uri']}: {train_rows:,} train rows of {manifest['row_tokens']} x "
        f"{manifest['dtype']} in {len(shards)} shards ({shard_total / 1e6:.2f} MB); row-group index "
        f"{manifest['splits']['train']['index']['row_groups'] * RECORD.itemsize / 1e3:.1f} kB; the footers the "
        f"driver used to ship every rank: {footer_bytes(manifest, args) / 1e3:.1f} kB"
    )
    chunk_total = int(train_chunks(manifest, args)["length"].sum())
    ratio = {}
    for world_size in (1, 2, 4):
        t0 = time.perf_counter()
        stats = run_ranks(manifest, args, world_size, 0, args.steps)
        wall_s = time.perf_counter() - t0
        ratio[world_size] = max(s["bytes_read"] / s["needed_bytes"] for s in stats)
        data_only = max((s["bytes_read"] - s["index_bytes_read"]) / s["needed_bytes"] for s in stats)
        # before: every rank read every shard in full, per epoch, for its 1/W of the rows (chunks)
        stream = shard_total / (chunk_total / world_size)
        s0 = stats[0]
        print(
            f"workers={world_size} steps={args.steps} global_batch={args.global_batch}: rank 0 read "
            f"{s0['bytes_read'] / 1e3:.1f} kB ({s0['index_bytes_read']:,} B of index) for row groups of "
            f"{s0['needed_bytes'] / 1e3:.1f} kB compressed; rows read/trained {s0['rows_read']}/{s0['rows_yielded']}; "
            f"read/needed {ratio[world_size]:.3f} (max over ranks; shard bytes alone {data_only:.3f}; "
            f"whole-stream reader before: {stream:.2f}); {wall_s:.2f} s"
        )
    epoch_steps = train_rows // args.global_batch
    late = args.late_step or 3 * epoch_steps + 1
    early_cost, late_cost = (first_batch_cost(manifest, args, s) for s in (1, late))
    print(
        f"resume at step 1 vs step {late} (epoch {late // max(1, epoch_steps)}), rank 1 of 4: rows read before "
        f"the first batch {early_cost['rows_read']} vs {late_cost['rows_read']}, "
        f"bytes {early_cost['bytes_read']:,} vs {late_cost['bytes_read']:,}"
    )
    print(index_startup(args))
    if args.train:
        root = tempfile.mkdtemp(prefix="raylm_bench_ingest_")
        for world_size in (1, 2, 4):
            got = train_ratio(manifest["uri"], args, world_size, root)
            ratio[world_size] = got["ratio"]
            print(
                f"raylm train, workers={world_size}: per rank read {[round(b / 1e3, 1) for b in got['read']]} kB for "
                f"row groups of {[round(b / 1e3, 1) for b in got['needed']]} kB; read/needed {got['ratio']:.3f}"
            )
    print(f"read/needed at 4 workers: {ratio[4]:.3f}" + (" (raylm train)" if args.train else ""))
    return ratio


if __name__ == "__main__":
    main()
