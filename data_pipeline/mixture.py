"""A data mixture in batches: which source each row of the train stream comes from, and which of its rows.

The train stream (step s holds slots [s*G, (s+1)*G)) is drawn in blocks of BLOCK_ROWS slots, one
source each: block b draws from source k when u_b = (b * PHI_64 + salt) mod 2^64 falls in k's part of
[0, 2^64) (parts as wide as the weights). A Weyl sequence: any n consecutive blocks hold n * w_k +-
O(log n) blocks of source k, so batches keep near the weights without randomness to average out, and
the stream is a pure function of (seed, weights, slot). Source k's rows come in its own stream order
(``order.TrainOrder`` over its shards, salted by k), at position = its slots before the slot. A block
of the stream is then one row group of its source: a rank reads the row groups it trains on and no
other (a row-level mix would split row groups between ranks and steps, and read each several times).
A rank's slice of a step holds one contiguous run of each source's stream; a global batch depends on
(manifest, seed, schedule, G, step), never on the world size; a resumed reader repeats an uninterrupted
one. The price of blocks: a global batch of a few blocks is near the weights only over several steps.

The weights may change at a step: ``schedule`` is [(from_step, weights)], its first from step 0; a run
changes it only by branching (``orchestration.train.driver``), so the rows before the branch are the ones
its parent trained on. A source that runs out starts its next epoch (``repeat``) or stops the run with
an error naming it (``stop``).
"""

from __future__ import annotations

import hashlib
from typing import Optional

import numpy as np

from data_pipeline.order import TrainOrder
from data_pipeline.shards import BLOCK_ROWS
from data_pipeline.storage import DataSourceError

PHI_64 = 0x9E3779B97F4A7C15  # 2^64 / golden ratio, odd: the Weyl sequence's step
MIXTURE_STREAM = 0x4D495854  # "MIXT": keeps each source's order apart from TrainOrder's rng(seed, epoch)
_CHUNK = 1 << 22  # slots counted per numpy pass


class MixtureExhaustedError(DataSourceError):
    """A source ran out of rows with train.mixture_exhausted=stop."""


def normalized(weights: dict[str, float], names: list[str], where: str) -> dict[str, float]:
    """``weights`` over exactly ``names`` (the manifest's sources, in order), each > 0, summing to 1."""
    if set(weights) != set(names):
        missing, unknown = sorted(set(names) - set(weights)), sorted(set(weights) - set(names))
        raise ValueError(
            f"{where} must give a weight to each mixture source of the data ({', '.join(names)}); "
            + (f"missing {missing}" if missing else "")
            + ("; " if missing and unknown else "")
            + (f"unknown {unknown}" if unknown else "")
        )
    bad = {k: v for k, v in weights.items() if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0}
    if bad:
        raise ValueError(f"{where}: weights must be numbers > 0, got {bad}")
    total = float(sum(weights.values()))
    return {name: weights[name] / total for name in names}


def source_shards(manifest: dict, split: str) -> dict[str, list[int]]:
    """Each mixture source's shard indexes in ``split`` (the manifest's order)."""
    names = [m["name"] for m in manifest["mixture"]]
    out: dict[str, list[int]] = {name: [] for name in names}
    for i, shard in enumerate(manifest["splits"][split]["shards"]):
        out[shard["source"]].append(i)
    return out


class MixtureOrder:
    """The train stream of a mixture manifest: ``rank_segments(lo, hi)`` gives the shard runs of slots
    [lo, hi) (read in one call) and where each row goes back in slot order."""

    def __init__(
        self, manifest: dict, seed: int, global_batch_size: int, schedule: list, exhausted: str = "repeat"
    ) -> None:
        self.names = [m["name"] for m in manifest["mixture"]]
        if not self.names:
            raise ValueError(f"{manifest['uri']} holds no data mixture (prepare it with data.mixture)")
        if exhausted not in ("repeat", "stop"):
            raise ValueError(f"exhausted must be 'repeat' or 'stop', got {exhausted!r}")
        if not schedule or schedule[0][0] != 0 or any(a[0] >= b[0] for a, b in zip(schedule, schedule[1:])):
            raise ValueError(f"a mixture schedule starts at step 0 and its steps increase, got {schedule}")
        shards = manifest["splits"]["train"]["shards"]
        self.shards = list(source_shards(manifest, "train").values())
        self.orders = [
            TrainOrder([shards[i]["sequences"] for i in mine], seed, salt=(MIXTURE_STREAM, k))
            for k, mine in enumerate(self.shards)
        ]
        self.G, self.exhausted = global_batch_size, exhausted
        self.salt = int.from_bytes(hashlib.sha256(f"raylm-mixture:{seed}".encode()).digest()[:8], "big")
        self.bounds = [  # (first slot, thresholds) per schedule entry
            (int(step) * global_batch_size, _thresholds([normalized(w, self.names, "schedule")[n] for n in self.names]))
            for step, w in schedule
        ]
        self._at, self._before = 0, np.zeros(len(self.names), dtype=np.int64)

    def sources(self, lo: int, hi: int) -> np.ndarray:
        """int source index of each slot in [lo, hi): its block's."""
        blocks = np.arange(lo, hi, dtype=np.uint64) // np.uint64(BLOCK_ROWS)
        u = blocks * np.uint64(PHI_64) + np.uint64(self.salt)  # wraps mod 2^64
        out = np.empty(hi - lo, dtype=np.int64)
        for i, (first, thresholds) in enumerate(self.bounds):
            end = self.bounds[i + 1][0] if i + 1 < len(self.bounds) else None
            a, b = max(first - lo, 0), (hi - lo if end is None else min(max(end - lo, 0), hi - lo))
            if a < b:
                out[a:b] = np.searchsorted(thresholds, u[a:b], side="right")
        return out

    def counts_before(self, t: int) -> np.ndarray:
        """Rows of each source in slots [0, t): counted on from the last call (readers move forward)."""
        if t < self._at:
            self._at, self._before = 0, np.zeros(len(self.names), dtype=np.int64)
        for a in range(self._at, t, _CHUNK):
            self._before += np.bincount(self.sources(a, min(a + _CHUNK, t)), minlength=len(self.names))
        self._at = t
        return self._before.copy()

    def epochs(self, step: int) -> dict[str, float]:
        """Epochs of each source trained on by the end of ``step`` (a fraction: 1.5 is one and a half)."""
        rows = self.counts_before((step + 1) * self.G)
        return {n: int(r) / max(o.epoch_rows, 1) for n, r, o in zip(self.names, rows, self.orders)}

    def check_fits(self, total_steps: int) -> None:
        """With exhausted=stop, ``MixtureExhaustedError`` now when a source would run out before ``total_steps``."""
        if self.exhausted != "stop":
            return
        need = self.counts_before(total_steps * self.G)
        short = [(n, int(r), o.epoch_rows) for n, r, o in zip(self.names, need, self.orders) if r > o.epoch_rows]
        if short:
            raise MixtureExhaustedError(_exhausted_text(short, total_steps))

    def rank_segments(self, lo: int, hi: int) -> tuple[list[tuple[int, int, int]], np.ndarray]:
        """(segments of slots [lo, hi) as (shard, first row, end row), source by source; ``place``: row i of
        the read goes to slot ``place[i]`` - lo)."""
        src = self.sources(lo, hi)
        before = self.counts_before(lo)
        segments = []
        for k, order in enumerate(self.orders):
            take = int((src == k).sum())
            if not take:
                continue
            if order.epoch_rows == 0:
                raise DataSourceError(f"mixture source {self.names[k]!r} has no train rows; re-run prepare")
            first = int(before[k])
            if self.exhausted == "stop" and first + take > order.epoch_rows:
                step = (lo + int(np.flatnonzero(src == k)[order.epoch_rows - first])) // self.G
                raise MixtureExhaustedError(_exhausted_text([(self.names[k], first + take, order.epoch_rows)], step))
            segments += [(self.shards[k][s], a, b) for s, a, b in order.segments(first, first + take)]
        return segments, np.argsort(src, kind="stable")


def _thresholds(weights: list[float]) -> np.ndarray:
    """The upper ends of each source's part of [0, 2^64) but the last (searchsorted gives the source)."""
    cumulative = np.cumsum(weights)[:-1]
    return np.array([min(int(c * 2**64), 2**64 - 1) for c in cumulative], dtype=np.uint64)


def _exhausted_text(short: list, step: int) -> str:
    said = ", ".join(f"{n!r} needs {need:,} rows, has {have:,}" for n, need, have in short)
    return (
        f"mixture sources ran out by step {step} with train.mixture_exhausted=stop: {said}. Set "
        "train.mixture_exhausted=repeat (they start another epoch), lower their weights "
        "(train.mixture_weights), train fewer steps, or add data to them"
    )


def default_schedule(manifest: dict, weights: Optional[dict[str, float]]) -> list:
    """[(0, weights)]: ``weights`` (train.mixture_weights) normalized, else the manifest's."""
    names = [m["name"] for m in manifest["mixture"]]
    given = weights or {m["name"]: m["weight"] for m in manifest["mixture"]}
    return [(0, normalized(given, names, "train.mixture_weights"))]
