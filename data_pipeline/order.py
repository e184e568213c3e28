"""The order rows are trained in: a pure function of (manifest, seed, epoch), never of the reader.

``TrainOrder`` (per-rank training): epoch e of the train split is its 8-row blocks (one row group each)
in ``rng(seed, e)`` order, so any stream position maps to (shard, row) without reading anything.
``stream_tasks`` (the Ray Data stream of fine-tuning and the demo): epoch e visits shards in
``rng(seed, e)`` order (file order for val) and each shard's rows in ``rng(seed, e, shard)`` order
(``shard_row_order``). ``poisson_rows`` (DP-SGD): step s trains on each train row independently with
probability q, drawn from ``rng(seed, POISSON_STREAM, s)``.
"""

from __future__ import annotations

import numpy as np

from data_pipeline.shards import BLOCK_ROWS


class TrainOrder:
    """The train split's stream order: epoch e is the blocks (BLOCK_ROWS consecutive rows of a shard)
    in ``rng(seed, e)`` order, full blocks first, then each shard's shorter last block. An epoch is
    cut to a multiple of BLOCK_ROWS so every epoch starts block-aligned: the last ``N % BLOCK_ROWS``
    rows of each epoch's order (a different few each epoch) are left out of that epoch. ``salt`` keeps
    the orders of several streams of one seed apart (a data mixture's sources: ``rng(seed, *salt, e)``)."""

    def __init__(self, rows_per_shard: list[int], seed: int, salt: tuple[int, ...] = ()) -> None:
        sizes = np.asarray(rows_per_shard, dtype=np.int64)
        blocks = (sizes + BLOCK_ROWS - 1) // BLOCK_ROWS
        self.shard = np.repeat(np.arange(len(sizes)), blocks)
        self.start = np.arange(int(blocks.sum()), dtype=np.int64) - np.repeat(np.cumsum(blocks) - blocks, blocks)
        self.start *= BLOCK_ROWS
        self.rows = np.minimum(BLOCK_ROWS, sizes[self.shard] - self.start)
        total = int(sizes.sum())
        self.epoch_rows = total - total % BLOCK_ROWS if total >= BLOCK_ROWS else total
        self.seed, self.salt, self._cached = seed, salt, (-1, None, None)

    def order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(block indices in stream order, each block's end position within the epoch)."""
        if self._cached[0] != epoch:
            rng = np.random.default_rng([self.seed, *self.salt, epoch])
            full = self.rows == BLOCK_ROWS
            idx = np.concatenate([rng.permutation(np.flatnonzero(full)), rng.permutation(np.flatnonzero(~full))])
            self._cached = (epoch, idx, np.cumsum(self.rows[idx]))
        return self._cached[1], self._cached[2]

    def segments(self, lo: int, hi: int) -> list[tuple[int, int, int]]:
        """(shard, first row, end row) runs holding stream positions [lo, hi), in stream order."""
        out, pos = [], lo
        while pos < hi:
            epoch, at = divmod(pos, self.epoch_rows)
            stop = min(hi - epoch * self.epoch_rows, self.epoch_rows)
            idx, ends = self.order(epoch)
            b = int(np.searchsorted(ends, at, "right"))
            while at < stop:
                block = idx[b]
                begin = int(ends[b] - self.rows[block])
                take = min(int(ends[b]), stop) - at
                first = int(self.start[block]) + at - begin
                out.append((int(self.shard[block]), first, first + take))
                at += take
                b += 1
            pos = epoch * self.epoch_rows + stop
        return out


POISSON_STREAM = 0x44505347  # "DPSG": keeps the Poisson draws apart from TrainOrder's rng(seed, epoch)


def poisson_rows(num_rows: int, sample_rate: float, seed: int, step: int) -> np.ndarray:
    """The sorted train-row indices (over the split's shards in file order) in step ``step``'s Poisson
    sample: each of ``num_rows`` rows in independently with probability ``sample_rate``. Drawn as a
    binomial count and then that many distinct rows uniformly, which is the same distribution, in time
    of the sample's size rather than the split's. A pure function of (num_rows, sample_rate, seed, step)."""
    rng = np.random.default_rng([seed, POISSON_STREAM, step])
    count = int(rng.binomial(num_rows, sample_rate))
    return np.sort(rng.choice(num_rows, size=count, replace=False))


def stream_tasks(manifest: dict, split: str, seed: int, start: int, stop: int) -> list[dict]:
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


def shard_row_order(seed: int, epoch: int, shard: int, rows: int, shuffle: bool) -> np.ndarray:
    """The order a stream epoch visits one shard's rows in."""
    return np.random.default_rng([seed, epoch, shard]).permutation(rows) if shuffle else np.arange(rows)
