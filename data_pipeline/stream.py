"""The Ray Data stream of token rows: fine-tuning and the demo read shards this way.

``sequence_dataset`` is a Ray Data stream of rows {position, tokens} in stream order (``order.stream_tasks``:
shards in ``rng(seed, epoch)`` order, rows in ``rng(seed, epoch, shard)`` order); each read task reads
one shard through ``ShardReader`` (index, CRC). ``worker_batches`` / ``worker_examples``: every worker
iterates the unsplit stream and keeps ``position % world_size == rank``.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Optional

import numpy as np
import ray

from data_pipeline.manifest import check_manifest, read_manifest
from data_pipeline.order import shard_row_order, stream_tasks
from data_pipeline.shard_reader import ShardReader
from data_pipeline.storage import DataSourceError


def _read_rows(batch: dict, *, manifest: dict, split: str, seed: int, endpoint_url, region) -> dict:
    """One shard task -> its rows [lo, hi) in the epoch's permuted order, with their stream positions."""
    (task,) = [dict(zip(batch, values)) for values in zip(*batch.values())]
    shard, rows = int(task["shard"]), int(task["rows"])
    reader = ShardReader(manifest, split, endpoint_url=endpoint_url, region=region)
    table = reader.read([(shard, 0, rows)], dtype=reader.dtype)  # as stored: workers widen their own rows
    order = shard_row_order(seed, int(task["epoch"]), shard, rows, shuffle=split != "val")
    picked = order[int(task["lo"]) : int(task["hi"])]
    return {"position": np.arange(len(picked), dtype=np.int64) + int(task["first_position"]), "tokens": table[picked]}


def sequence_dataset(
    manifest_uri: str,
    split: str,
    *,
    seed: int,
    start_sequence: int = 0,
    num_sequences: Optional[int] = None,
    expected_tokenizer_hash: Optional[str] = None,
    expected_seq_len: Optional[int] = None,
    endpoint_url: Optional[str] = None,
    region: Optional[str] = None,
) -> ray.data.Dataset:
    """Rows {"position": int64, "tokens": uint16/uint32[seq_len + 1]} for stream positions
    [start_sequence, start_sequence + num_sequences), in position order.

    train: shuffled per epoch as a pure function of (seed, epoch); num_sequences may span epochs;
    None means to the end of the epoch holding start_sequence. val: file order, one pass (no shuffle).
    """
    manifest = read_manifest(manifest_uri, endpoint_url, region)
    check_manifest(manifest, expected_tokenizer_hash, expected_seq_len)
    if split not in manifest["splits"]:
        raise ValueError(f"split {split!r} not in {manifest['uri']} (has {sorted(manifest['splits'])})")
    epoch_len = manifest["splits"][split]["sequences"]
    if epoch_len == 0:
        raise DataSourceError(
            f"{manifest['uri']}: split {split!r} holds no sequences; lower output.seq_len or "
            "raise output.val_fraction and re-run prepare"
        )
    if split == "val":
        start_sequence = min(start_sequence, epoch_len)
        stop = epoch_len if num_sequences is None else min(epoch_len, start_sequence + num_sequences)
    else:
        stop = (
            (start_sequence // epoch_len + 1) * epoch_len if num_sequences is None else start_sequence + num_sequences
        )
    tasks = stream_tasks(manifest, split, seed, start_sequence, stop)
    ds = ray.data.from_items(tasks, override_num_blocks=max(1, len(tasks))).map_batches(
        _read_rows,
        batch_size=1,
        batch_format="numpy",
        fn_kwargs={"manifest": manifest, "split": split, "seed": seed, "endpoint_url": endpoint_url, "region": region},
    )
    ds.context.execution_options.preserve_order = True  # iteration order = task order = position order
    return ds


def worker_batches(
    data_iterator, *, rank: int, world_size: int, micro_batch_size: int, skip_before: int = 0, prefetch_batches: int = 2
) -> Iterator[np.ndarray]:
    """int64 [micro_batch_size, seq_len + 1] arrays of the rows with position % world_size == rank and
    position >= skip_before, in stream order. ``data_iterator``: a DataIterator or Dataset over the
    unsplit stream. A trailing partial micro batch is not yielded (every rank stops at the same step).
    """
    for rows in worker_examples(
        data_iterator,
        rank=rank,
        world_size=world_size,
        micro_batch_size=micro_batch_size,
        skip_before=skip_before,
        prefetch_batches=prefetch_batches,
    ):
        yield rows["tokens"].astype(np.int64)


def worker_examples(
    data_iterator, *, rank: int, world_size: int, micro_batch_size: int, skip_before: int = 0, prefetch_batches: int = 2
) -> Iterator[dict[str, np.ndarray]]:
    """``worker_batches`` for streams with more columns than tokens (fine-tuning targets, labels):
    micro-batches as {column: array of micro_batch_size rows}, ``position`` left out."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    pending: list[dict[str, np.ndarray]] = []
    have = 0
    batches: Iterable[dict] = data_iterator.iter_batches(
        batch_size=micro_batch_size * world_size, batch_format="numpy", prefetch_batches=prefetch_batches
    )
    for batch in batches:
        mask = (batch["position"] % world_size == rank) & (batch["position"] >= skip_before)
        if not mask.any():
            continue
        pending.append({k: v[mask] for k, v in batch.items() if k != "position"})
        have += int(mask.sum())
        while have >= micro_batch_size:
            block = {k: np.concatenate([p[k] for p in pending]) for k in pending[0]}
            yield {k: v[:micro_batch_size] for k, v in block.items()}
            pending, have = [{k: v[micro_batch_size:] for k, v in block.items()}], have - micro_batch_size
