"""Per-rank reading: world-size invariant global batches, exact and cheap resumption, read amplification
measured at the filesystem layer, epochs, and a validation set that is the same at any world size."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from data_pipeline.loader import rank_batches, rank_val_batches
from data_pipeline.manifest import read_manifest
from data_pipeline.shards import BLOCK_ROWS
from tests.helpers import tiny_corpus_manifest

SEED, GLOBAL_BATCH, MICRO = 5, 32, 4


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> dict:
    return read_manifest(tiny_corpus_manifest(tmp_path_factory.mktemp("tiny")))


def all_rows(manifest: dict, split: str) -> np.ndarray:
    base = Path(manifest["uri"]).parent
    return np.concatenate(
        [
            pq.read_table(base / s["file"]).column("tokens").combine_chunks().flatten().to_numpy().reshape(-1, 33)
            for s in manifest["splits"][split]["shards"]
        ]
    ).astype(np.int64)


def global_batches(manifest, world_size: int, start_step: int, num_steps: int, **kw) -> tuple[list, list]:
    """Each step's global batch, rebuilt as the ranks' slices concatenated in rank order, and the ranks' stats."""
    per_rank, stats = [], []
    for rank in range(world_size):
        reader = rank_batches(
            manifest,
            seed=SEED,
            global_batch_size=GLOBAL_BATCH,
            micro_batch_size=MICRO,
            rank=rank,
            world_size=world_size,
            start_step=start_step,
            num_steps=num_steps,
            **kw,
        )
        per_rank.append(list(reader))
        stats.append(reader.stats)
    micro_per_step = GLOBAL_BATCH // world_size // MICRO
    assert all(len(r) == num_steps * micro_per_step for r in per_rank)
    steps = [
        np.concatenate([np.concatenate(r[s * micro_per_step : (s + 1) * micro_per_step]) for r in per_rank])
        for s in range(num_steps)
    ]
    return steps, stats


def as_set(rows: np.ndarray) -> list[bytes]:
    return sorted(r.tobytes() for r in rows)


def test_global_batches_do_not_depend_on_world_size(manifest):
    one, _ = global_batches(manifest, 1, 0, 8)
    assert one[0].dtype == np.int64 and one[0].shape == (GLOBAL_BATCH, manifest["seq_len"] + 1)
    assert len({b.tobytes() for b in one}) == 8  # steps differ
    for world_size in (2, 4):
        steps, _ = global_batches(manifest, world_size, 0, 8, prefetch=world_size)  # 2: threaded read-ahead
        assert all(np.array_equal(a, b) for a, b in zip(one, steps))
    # every row is a real row of the split
    known = set(as_set(all_rows(manifest, "train")))
    assert all(r.tobytes() in known for b in one for r in b)


def test_resume_yields_the_same_batches_and_reads_the_same_few_rows(manifest):
    n = manifest["splits"]["train"]["sequences"]
    epoch_steps = n // GLOBAL_BATCH
    late = 2 * epoch_steps + 3  # inside epoch 2
    full, _ = global_batches(manifest, 1, 0, late + 3, prefetch=0)
    cost = {}
    for start in (1, late):
        resumed, _ = global_batches(manifest, 2, start, 3, prefetch=0)
        assert all(np.array_equal(a, b) for a, b in zip(full[start : start + 3], resumed))
        reader = rank_batches(
            manifest,
            seed=SEED,
            global_batch_size=GLOBAL_BATCH,
            micro_batch_size=MICRO,
            rank=1,
            world_size=4,
            start_step=start,
            num_steps=50,
            prefetch=0,
        )
        next(iter(reader))
        cost[start] = reader.stats
    # before its first batch a resumed rank reads its slice of one step, wherever it resumes
    assert cost[1]["rows_read"] == cost[late]["rows_read"] == GLOBAL_BATCH // 4
    assert cost[late]["bytes_read"] <= 1.25 * cost[1]["bytes_read"]


def test_a_rank_reads_only_the_row_groups_it_trains_on_and_their_index_records(manifest):
    steps = 12
    _, per_rank = global_batches(manifest, 4, 0, steps)
    lengths = {  # every row group's compressed chunk, from the shards' own footers
        (shard, g): entry.row_group(g).column(0).total_compressed_size
        for shard, entry in enumerate(
            pq.read_metadata(Path(manifest["uri"]).parent / s["file"]) for s in manifest["splits"]["train"]["shards"]
        )
        for g in range(entry.num_row_groups)
    }
    for stats in per_rank:
        assert stats["rows_yielded"] == steps * GLOBAL_BATCH // 4
        assert stats["rows_read"] == stats["rows_yielded"]  # block-aligned slices: no row read in vain
        groups = stats["rows_read"] // BLOCK_ROWS
        # shard bytes read are exactly the chunks of the row groups trained on; the index adds 20 B a group
        assert stats["bytes_read"] - stats["index_bytes_read"] == stats["needed_bytes"]
        assert 0 < stats["index_bytes_read"] <= 20 * groups + 512 * steps
        assert groups * min(lengths.values()) <= stats["needed_bytes"] <= groups * max(lengths.values())
        assert stats["bytes_read"] <= 1.10 * stats["needed_bytes"]


def test_epochs_wrap_into_new_permutations(manifest):
    rows = all_rows(manifest, "train")
    n = len(rows)
    epoch_rows = n - n % BLOCK_ROWS
    steps = -(-2 * epoch_rows // GLOBAL_BATCH) + 1
    stream = np.concatenate(global_batches(manifest, 1, 0, steps)[0])
    first, second = stream[:epoch_rows], stream[epoch_rows : 2 * epoch_rows]
    # each epoch is the split (each row at most once), less the last n % BLOCK_ROWS rows of its order
    assert Counter(as_set(first)) <= Counter(as_set(rows)) and Counter(as_set(second)) <= Counter(as_set(rows))
    assert not np.array_equal(first, second)
    other_seed = rank_batches(
        manifest, seed=SEED + 1, global_batch_size=GLOBAL_BATCH, micro_batch_size=GLOBAL_BATCH, rank=0, world_size=1,
        start_step=0, num_steps=1,
    )  # fmt: skip
    assert not np.array_equal(next(iter(other_seed)), stream[:GLOBAL_BATCH])


def test_val_set_is_the_first_rows_once_each_at_any_world_size(manifest):
    val = all_rows(manifest, "val")
    num_sequences = 50
    assert len(val) > num_sequences
    means = []
    for world_size in (1, 2, 3, 4):
        per_rank = [
            list(
                rank_val_batches(
                    manifest, num_sequences=num_sequences, micro_batch_size=4, rank=r, world_size=world_size
                )
            )
            for r in range(world_size)
        ]
        assert len({len(r) for r in per_rank}) == 1  # same number of forwards on every rank
        tokens = np.concatenate([t for r in per_rank for t, _ in r])
        weights = np.concatenate([w for r in per_rank for _, w in r])
        assert tokens.dtype == np.int64 and weights.dtype == np.float32
        assert np.array_equal(tokens[weights > 0], val[:num_sequences])
        assert set(np.unique(weights)) <= {0.0, 1.0} and np.all(tokens[weights == 0] == 0)
        per_sequence = tokens[:, 1:].mean(axis=1)  # stands in for a per-sequence loss
        means.append(float((per_sequence * weights).sum() / weights.sum()))
    assert np.allclose(means, means[0], rtol=1e-12)
    # a set larger than the split is the whole split
    whole = list(rank_val_batches(manifest, num_sequences=10_000, micro_batch_size=8, rank=0, world_size=1))
    assert np.array_equal(np.concatenate([t for t, w in whole])[np.concatenate([w for _, w in whole]) > 0], val)


def test_refuses_batches_that_do_not_split_evenly(manifest):
    with pytest.raises(ValueError, match="global_batch_size 30 must split into world_size 4"):
        rank_batches(
            manifest, seed=0, global_batch_size=30, micro_batch_size=2, rank=0, world_size=4, start_step=0,
            num_steps=1,
        )  # fmt: skip
    with pytest.raises(ValueError, match="rank 4 is outside world_size 4"):
        rank_val_batches(manifest, num_sequences=8, micro_batch_size=2, rank=4, world_size=4)
