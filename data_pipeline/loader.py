"""Token shards -> one rank's training micro-batches (no ray.train import): the rank batcher.

The train stream is epoch 0, epoch 1, ... of 8-row blocks in an order that is a pure function of
(manifest, seed, epoch) (``order.TrainOrder``); rank r of W takes positions [s*G + r*G/W,
s*G + (r+1)*G/W) of step s and fetches only the row groups holding them (``shard_reader.ShardReader``:
the row-group index, range reads, CRC-32 per row group), so a global batch depends on (manifest,
seed, G, step) and never on W, and resuming at step k reads step k's rows first. A data mixture's
manifest is drawn at its weights instead (``mixture.MixtureOrder``: the same guarantees, per source).
``rank_val_batches`` gives each rank its part of a fixed validation set (of one mixture source, or
all). ``poisson_rank_batches`` (DP-SGD) gives each rank
its share of every step's Poisson sample of the train rows (``order.poisson_rows``). A background
thread reads ahead (``prefetch``).
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator, Optional

import numpy as np

from data_pipeline.mixture import MixtureOrder, default_schedule, source_shards
from data_pipeline.order import TrainOrder, poisson_rows
from data_pipeline.shard_reader import ShardReader
from data_pipeline.storage import DataSourceError


class RankBatches:
    """An iterable of one rank's micro-batches, read ahead by a background thread (``prefetch`` read
    units queued; 0 reads in the caller's thread), with ``stats``: bytes_read (all bytes storage
    returned: shard range reads plus index records), index_bytes_read (the index's part),
    needed_bytes (the compressed bytes of the row groups holding the rows asked for: the denominator of
    the read amplification), rows_read (rows decoded), rows_yielded and row_bytes_yielded (those rows
    as stored, uncompressed)."""

    def __init__(self, reader: ShardReader, units: Callable[[], Iterator[list]], prefetch: int) -> None:
        self.reader, self._units, self.prefetch = reader, units, prefetch
        self.rows_yielded = 0

    @property
    def stats(self) -> dict:
        return {
            "bytes_read": self.reader.bytes_read + self.reader.index_bytes_read,
            "index_bytes_read": self.reader.index_bytes_read,
            "needed_bytes": self.reader.needed_bytes,
            "rows_read": self.reader.rows_read,
            "rows_yielded": self.rows_yielded,
            "row_bytes_yielded": self.rows_yielded * self.reader.row_bytes,
        }

    def __iter__(self):
        units = self._units() if self.prefetch <= 0 else _prefetched(self._units(), self.prefetch)
        for unit in units:
            for item in unit:
                self.rows_yielded += len(item) if isinstance(item, np.ndarray) else int((item[1] > 0).sum())
                yield item


def _prefetched(units: Iterator[list], depth: int) -> Iterator[list]:
    """``units`` produced by a daemon thread up to ``depth`` ahead; its errors re-raised here, in order."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop, done = threading.Event(), object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for unit in units:
                if not put(unit):
                    return
            put(done)
        except BaseException as err:  # handed to the consumer, which raises it
            put(err)

    thread = threading.Thread(target=work, name="raylm-data-prefetch", daemon=True)
    thread.start()
    try:
        while (item := q.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=10)


def _check_steps(rank: int, world_size: int, start_step: int, num_steps: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if start_step < 0 or num_steps < 0:
        raise ValueError(f"start_step ({start_step}) and num_steps ({num_steps}) must be >= 0")


def rank_batches(
    manifest: dict,
    *,
    seed: int,
    global_batch_size: int,
    micro_batch_size: int,
    rank: int,
    world_size: int,
    start_step: int,
    num_steps: int,
    endpoint_url: Optional[str] = None,
    region: Optional[str] = None,
    prefetch: int = 2,
    mixture_schedule: Optional[list] = None,
    mixture_exhausted: str = "repeat",
) -> RankBatches:
    """Rank ``rank``'s int64 [micro_batch_size, seq_len + 1] micro-batches of the train split for
    optimizer steps [start_step, start_step + num_steps): per step, G/(W*micro) micro-batches of its
    slice [s*G + r*G/W, s*G + (r+1)*G/W) of the stream (G = global_batch_size, W = world_size). A
    mixture manifest's stream draws from its sources at ``mixture_schedule``'s weights ([(from_step,
    {source: weight})]; None: the manifest's), a source that runs out repeating or raising
    ``MixtureExhaustedError`` (``mixture_exhausted``: repeat / stop).

    The rows at a stream position are a pure function of (manifest, seed, position), so each global
    batch is a function of (manifest, seed, G, step) whatever W, and a reader started at step k yields
    what an uninterrupted one yields from k, reading only step k's rows first. Only the row groups
    holding the rank's rows are fetched, and only their index records.
    """
    _check_steps(rank, world_size, start_step, num_steps)
    if global_batch_size % world_size or (global_batch_size // world_size) % micro_batch_size:
        raise ValueError(
            f"global_batch_size {global_batch_size} must split into world_size {world_size} x micro_batch_size "
            f"{micro_batch_size} x an integer number of micro-batches"
        )
    reader = ShardReader(manifest, "train", endpoint_url=endpoint_url, region=region)
    per_rank = global_batch_size // world_size
    if manifest.get("mixture"):
        schedule = mixture_schedule or default_schedule(manifest, None)
        mixture = MixtureOrder(manifest, seed, global_batch_size, schedule, mixture_exhausted)

        def mixed_units() -> Iterator[list]:
            for step in range(start_step, start_step + num_steps):
                lo = step * global_batch_size + rank * per_rank
                segments, place = mixture.rank_segments(lo, lo + per_rank)
                rows = np.empty((per_rank, reader.row_tokens), dtype=np.int64)
                rows[place] = reader.read(segments)
                yield [rows[i : i + micro_batch_size] for i in range(0, per_rank, micro_batch_size)]

        return RankBatches(reader, mixed_units, prefetch)
    order = TrainOrder([s["sequences"] for s in reader.shards], seed)
    if order.epoch_rows == 0:
        raise DataSourceError(f"{manifest['uri']}: the train split holds no sequences; re-run prepare")

    def units() -> Iterator[list]:
        for step in range(start_step, start_step + num_steps):
            lo = step * global_batch_size + rank * per_rank
            rows = reader.read(order.segments(lo, lo + per_rank))
            yield [rows[i : i + micro_batch_size] for i in range(0, per_rank, micro_batch_size)]

    return RankBatches(reader, units, prefetch)


def poisson_rank_batches(
    manifest: dict,
    *,
    seed: int,
    sample_rate: float,
    rank: int,
    world_size: int,
    start_step: int,
    num_steps: int,
    endpoint_url: Optional[str] = None,
    region: Optional[str] = None,
    prefetch: int = 2,
) -> RankBatches:
    """Rank ``rank``'s int64 [rows, seq_len + 1] array for each step of [start_step, start_step + num_steps):
    every ``world_size``-th row, from the rank-th, of the step's Poisson sample of the whole train split
    (``order.poisson_rows``), so the ranks' union is that sample, their shares differ by at most a row, and
    a rank may get none (an empty array). The sample is a function of (manifest, seed, sample_rate, step),
    whatever the world size; a resumed reader repeats an uninterrupted one from its step."""
    _check_steps(rank, world_size, start_step, num_steps)
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    reader = ShardReader(manifest, "train", endpoint_url=endpoint_url, region=region)
    sizes = np.array([s["sequences"] for s in reader.shards], dtype=np.int64)
    first = np.concatenate([[0], np.cumsum(sizes)])
    if first[-1] == 0:
        raise DataSourceError(f"{manifest['uri']}: the train split holds no sequences; re-run prepare")

    def units() -> Iterator[list]:
        for step in range(start_step, start_step + num_steps):
            rows = poisson_rows(int(first[-1]), sample_rate, seed, step)[rank::world_size]
            shards = np.searchsorted(first, rows, "right") - 1
            segments = [(int(s), int(r - first[s]), int(r - first[s]) + 1) for s, r in zip(shards, rows)]
            yield [reader.read(segments)]

    return RankBatches(reader, units, prefetch)


def rank_val_batches(
    manifest: dict,
    *,
    num_sequences: int,
    micro_batch_size: int,
    rank: int,
    world_size: int,
    endpoint_url: Optional[str] = None,
    region: Optional[str] = None,
    prefetch: int = 2,
    source: Optional[str] = None,
) -> RankBatches:
    """Rank ``rank``'s share of a fixed validation set: the first ``num_sequences`` rows of the val split
    in file order (fewer if val is smaller; of the mixture source ``source``'s shards when given), cut
    into ``world_size`` contiguous parts. Yields
    (int64 tokens [micro_batch_size, seq_len + 1], float32 weights [micro_batch_size]); every rank yields
    the same number of micro-batches (ZeRO-3 forwards are collective), padding rows are zeros with weight
    0, so a weight-averaged per-sequence loss is the same set's mean at any world size."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if num_sequences < 1 or micro_batch_size < 1:
        raise ValueError(f"num_sequences ({num_sequences}) and micro_batch_size ({micro_batch_size}) must be >= 1")
    reader = ShardReader(manifest, "val", endpoint_url=endpoint_url, region=region)
    if source is not None and source not in [m["name"] for m in manifest.get("mixture", [])]:
        raise ValueError(f"{manifest['uri']} has no mixture source {source!r}")
    shards = source_shards(manifest, "val")[source] if source is not None else list(range(len(reader.shards)))
    sizes = np.array([reader.shards[i]["sequences"] for i in shards], dtype=np.int64)
    n = min(num_sequences, int(sizes.sum()))
    if n == 0:
        raise DataSourceError(
            f"{manifest['uri']}: the val split holds no sequences"
            + (f" of mixture source {source!r}" if source is not None else "")
            + "; raise output.val_fraction and re-run prepare"
        )
    lo, hi = rank * n // world_size, (rank + 1) * n // world_size
    num_micro = ((n + world_size - 1) // world_size + micro_batch_size - 1) // micro_batch_size
    first = np.concatenate([[0], np.cumsum(sizes)])

    def units() -> Iterator[list]:
        for m in range(num_micro):
            a, b = min(lo + m * micro_batch_size, hi), min(lo + (m + 1) * micro_batch_size, hi)
            segments = [
                (shards[i], max(a, int(first[i])) - int(first[i]), min(b, int(first[i + 1])) - int(first[i]))
                for i in range(len(sizes))
                if max(a, first[i]) < min(b, first[i + 1])
            ]
            tokens = np.zeros((micro_batch_size, reader.row_tokens), dtype=np.int64)
            weights = np.zeros(micro_batch_size, dtype=np.float32)
            tokens[: b - a], weights[: b - a] = reader.read(segments), 1.0
            yield [(tokens, weights)]

    return RankBatches(reader, units, prefetch)
