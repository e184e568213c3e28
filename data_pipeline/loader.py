"""Token shards -> a deterministic stream of training rows for Ray Train workers (no ray.train import).

The stream is epoch 0, epoch 1, ... concatenated; global position p is row p of it. Epoch e visits
shards in ``rng(seed, e)`` order and each shard's rows in ``rng(seed, e, shard)`` order, so the row
at a position is a pure function of (manifest, seed, position). Every worker iterates the same
unsplit stream and keeps ``position % world_size == rank``: which rows a global batch holds depends
only on the global batch size, not on the worker count, and a resumed run sees the same rows.
"""

from __future__ import annotations

import json
from typing import Iterable, Iterator, Optional

import numpy as np
import pyarrow.parquet as pq
import ray

from data_pipeline import tokenizer as tok
from data_pipeline.prepare import MANIFEST_FORMAT
from data_pipeline.storage import DataSourceError, filesystem_for, read_bytes


class ManifestMismatchError(ValueError):
    """Shards built for another tokenizer or sequence length than the run expects."""


def _base(manifest_uri: str) -> str:
    return manifest_uri.rsplit("/", 1)[0]


def read_manifest(uri: str, endpoint_url: Optional[str] = None, region: Optional[str] = None) -> dict:
    """The parsed manifest.json at ``uri`` (a manifest file URI or its directory)."""
    if not uri.endswith(".json"):
        uri = uri.rstrip("/") + "/manifest.json"
    manifest = json.loads(read_bytes(uri, endpoint_url, region))
    if manifest.get("format") != MANIFEST_FORMAT:
        raise DataSourceError(
            f"{uri}: not a raylm token manifest (format {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r})"
        )
    manifest["uri"] = uri
    return manifest


def load_tokenizer_from_manifest(manifest_uri: str, endpoint_url: Optional[str] = None, region: Optional[str] = None):
    """The tiktoken.Encoding stored next to a manifest (checked against the manifest's hash)."""
    manifest = read_manifest(manifest_uri, endpoint_url, region)
    spec = tok.load_spec(_base(manifest["uri"]), endpoint_url, region)
    if spec["hash"] != manifest["tokenizer"]["hash"]:
        raise ManifestMismatchError(
            f"{manifest['uri']}: tokenizer files hash {spec['hash'][:12]} differ from "
            f"the manifest's {manifest['tokenizer']['hash'][:12]}; re-run prepare"
        )
    return tok.encoding(spec)


def check_manifest(manifest: dict, expected_tokenizer_hash: Optional[str], expected_seq_len: Optional[int]) -> None:
    got_hash, got_len = manifest["tokenizer"]["hash"], manifest["seq_len"]
    if expected_tokenizer_hash is not None and got_hash != expected_tokenizer_hash:
        raise ManifestMismatchError(
            f"{manifest['uri']}: shards were tokenized with tokenizer {got_hash[:16]}, but this run expects "
            f"{expected_tokenizer_hash[:16]}; prepare the data with the run's tokenizer or resume with matching data"
        )
    if expected_seq_len is not None and got_len != expected_seq_len:
        raise ManifestMismatchError(
            f"{manifest['uri']}: shards hold seq_len={got_len}, but this run expects "
            f"seq_len={expected_seq_len}; re-run prepare with output.seq_len={expected_seq_len}"
        )


def _plan(manifest: dict, split: str, seed: int, start: int, stop: int) -> list[dict]:
    """Shard read tasks covering stream positions [start, stop); shards outside it are never read."""
    shards = manifest["splits"][split]["shards"]
    sizes = np.array([s["sequences"] for s in shards], dtype=np.int64)
    epoch_len = int(sizes.sum())
    tasks = []
    for epoch in range(start // epoch_len, (stop - 1) // epoch_len + 1):
        order = (
            np.arange(len(shards)) if split == "val" else np.random.default_rng([seed, epoch]).permutation(len(shards))
        )
        offset = epoch * epoch_len
        for shard in order:
            lo, hi = max(start - offset, 0), min(stop - offset, int(sizes[shard]))
            if lo < hi:
                tasks.append(
                    {
                        "file": shards[shard]["file"],
                        "shard": int(shard),
                        "epoch": epoch,
                        "lo": lo,
                        "hi": hi,
                        "first_position": offset + lo,
                        "rows": int(sizes[shard]),
                    }
                )
            offset += int(sizes[shard])
    return tasks


def _read_rows(
    batch: dict, *, fs, base_path: str, seed: int, shuffle: bool, tokenizer_hash: str, seq_len: int, manifest_uri: str
) -> dict:
    """One shard task -> its rows [lo, hi) in the epoch's permuted order, with their stream positions."""
    (task,) = [dict(zip(batch, values)) for values in zip(*batch.values())]
    table = pq.read_table(f"{base_path}/{task['file']}", filesystem=fs)
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    if meta.get("raylm.tokenizer_hash") != tokenizer_hash or meta.get("raylm.seq_len") != str(seq_len):
        raise ManifestMismatchError(
            f"{manifest_uri}: shard {task['file']} has tokenizer "
            f"{meta.get('raylm.tokenizer_hash', '?')[:16]} / seq_len {meta.get('raylm.seq_len')}, "
            f"manifest says {tokenizer_hash[:16]} / {seq_len}"
        )
    rows = table.column("tokens").combine_chunks().flatten().to_numpy().reshape(table.num_rows, seq_len + 1)
    if table.num_rows != task["rows"]:
        raise DataSourceError(
            f"{manifest_uri}: shard {task['file']} has {table.num_rows} rows, manifest says {task['rows']}"
        )
    order = (
        np.random.default_rng([seed, int(task["epoch"]), int(task["shard"])]).permutation(table.num_rows)
        if shuffle
        else np.arange(table.num_rows)
    )
    picked = order[int(task["lo"]) : int(task["hi"])]
    return {"position": np.arange(len(picked), dtype=np.int64) + int(task["first_position"]), "tokens": rows[picked]}


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
    tasks = _plan(manifest, split, seed, start_sequence, stop)
    fs, base_path = filesystem_for(_base(manifest["uri"]), endpoint_url, region)
    ds = ray.data.from_items(tasks, override_num_blocks=max(1, len(tasks))).map_batches(
        _read_rows,
        batch_size=1,
        batch_format="numpy",
        fn_kwargs={
            "fs": fs,
            "base_path": base_path,
            "seed": seed,
            "shuffle": split != "val",
            "tokenizer_hash": manifest["tokenizer"]["hash"],
            "seq_len": manifest["seq_len"],
            "manifest_uri": manifest["uri"],
        },
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
