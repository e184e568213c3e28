"""Loader: deterministic stream order, cheap exact resumption, worker-count independence, refusals."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from data_pipeline.config import CleanConfig, DataConfig, NearDedupConfig, OutputConfig, SourceConfig, TokenizerConfig
from data_pipeline.loader import rank_batches, rank_val_batches
from data_pipeline.manifest import ManifestMismatchError, read_manifest
from data_pipeline.order import stream_tasks
from data_pipeline.prepare import prepare
from data_pipeline.shards import BLOCK_ROWS
from data_pipeline.storage import embedded_corpus_dir
from data_pipeline.stream import sequence_dataset, worker_batches
from tests.helpers import tiny_corpus_manifest

PLAYS = [
    "lovers_complaint_gut.txt",
    "passionate_pilgrim_gut.txt",
    "phoenix_and_the_turtle_gut.txt",
    "comedy_of_errours_gut_f.txt",
]


def tiny_config(corpus: Path, out: Path) -> DataConfig:
    return DataConfig(
        sources=SourceConfig(uris=[f"{corpus}/*.txt"]),
        clean=CleanConfig(min_chars=50),
        near_dedup=NearDedupConfig(enabled=False),
        tokenizer=TokenizerConfig(vocab_size=300, sample_bytes=1_000_000),
        output=OutputConfig(uri=str(out), seq_len=16, val_fraction=0.3, shard_tokens=6000, seed=1),
    )


@pytest.fixture(scope="module")
def manifests(ray_session, tmp_path_factory) -> tuple[str, str]:
    """prepare's shards of four plays, and another tokenizer's shards of the same seq_len (16) written
    without Ray by ``helpers.tiny_corpus_manifest``: only the tokenizer tells them apart."""
    corpus = tmp_path_factory.mktemp("plays")
    for p in PLAYS:
        shutil.copy(embedded_corpus_dir() / p, corpus / p)
    ours = prepare(tiny_config(corpus, tmp_path_factory.mktemp("shards") / "v300"))
    return ours, tiny_corpus_manifest(tmp_path_factory.mktemp("other"), seq_len=16)


def rows_of(ds) -> tuple[list[int], np.ndarray]:
    batches = list(ds.iter_batches(batch_size=64, batch_format="numpy"))
    return (np.concatenate([b["position"] for b in batches]).tolist(), np.concatenate([b["tokens"] for b in batches]))


def all_rows(manifest_uri: str, split: str) -> np.ndarray:
    m = read_manifest(manifest_uri)
    base = Path(manifest_uri).parent
    return np.concatenate(
        [
            pq.read_table(base / s["file"])
            .column("tokens")
            .combine_chunks()
            .flatten()
            .to_numpy()
            .reshape(-1, m["row_tokens"])
            for s in m["splits"][split]["shards"]
        ]
    )


def as_set(rows: np.ndarray) -> list[bytes]:
    return sorted(r.tobytes() for r in rows)


def test_epoch_order_is_a_pure_function_of_seed_and_epoch(manifests):
    uri = manifests[0]
    n = read_manifest(uri)["splits"]["train"]["sequences"]
    assert read_manifest(uri)["splits"]["train"]["num_shards"] >= 3 and n > 200
    pos, a = rows_of(sequence_dataset(uri, "train", seed=7, num_sequences=2 * n))
    assert pos == list(range(2 * n))
    _, again = rows_of(sequence_dataset(uri, "train", seed=7, num_sequences=2 * n))
    _, other_seed = rows_of(sequence_dataset(uri, "train", seed=8, num_sequences=n))
    assert np.array_equal(a, again)
    assert not np.array_equal(a[:n], other_seed)
    assert not np.array_equal(a[:n], a[n:])  # epoch 1 is another permutation ...
    assert as_set(a[:n]) == as_set(a[n:]) == as_set(all_rows(uri, "train"))  # ... of the same rows


def test_resume_skips_whole_shards_without_reading_them(manifests, tmp_path):
    uri = manifests[0]
    m = read_manifest(uri)
    n = m["splits"]["train"]["sequences"]
    _, full = rows_of(sequence_dataset(uri, "train", seed=7, num_sequences=n))
    first = stream_tasks(m, "train", 7, 0, n)[0]
    start = first["hi"]  # the end of the first shard visited in epoch 0
    assert [t["shard"] for t in stream_tasks(m, "train", 7, start, n)] == [
        t["shard"] for t in stream_tasks(m, "train", 7, 0, n)
    ][1:]
    copy = tmp_path / "copy"
    shutil.copytree(Path(uri).parent, copy)
    (copy / m["splits"]["train"]["shards"][first["shard"]]["file"]).unlink()  # a skipped shard is never opened
    pos, resumed = rows_of(sequence_dataset(str(copy / "manifest.json"), "train", seed=7, start_sequence=start))
    assert pos == list(range(start, n)) and np.array_equal(resumed, full[start:])
    with pytest.raises(Exception, match="No such file|not found|FileNotFound"):
        rows_of(
            sequence_dataset(str(copy / "manifest.json"), "train", seed=7, start_sequence=start - 1, num_sequences=2)
        )


def test_batches_do_not_depend_on_world_size_or_resumption(manifests):
    uri, global_batch = manifests[0], 8

    def run(world_size: int, start: int = 0, skip_before: int = 0, steps: int = 6) -> list[np.ndarray]:
        per_rank = []
        for rank in range(world_size):
            ds = sequence_dataset(
                uri, "train", seed=11, start_sequence=start, num_sequences=global_batch * steps - start
            )
            per_rank.append(
                list(
                    worker_batches(
                        ds.iterator(),
                        rank=rank,
                        world_size=world_size,
                        micro_batch_size=global_batch // world_size,
                        skip_before=skip_before,
                    )
                )
            )
        # the global batch at a step: interleave ranks back into stream order
        return [np.stack([r[s] for r in per_rank], axis=1).reshape(global_batch, -1) for s in range(len(per_rank[0]))]

    one = run(1)
    assert len(one) == 6 and one[0].dtype == np.int64 and one[0].shape == (8, 17)
    two = run(2)
    four_resumed = run(4, start=3 * global_batch)
    two_skipped = run(2, start=2 * global_batch, skip_before=3 * global_batch)  # resume inside a fit
    assert all(np.array_equal(a, b) for a, b in zip(one, two))
    assert len(four_resumed) == 3 and all(np.array_equal(a, b) for a, b in zip(one[3:], four_resumed))
    assert len(two_skipped) == 3 and all(np.array_equal(a, b) for a, b in zip(one[3:], two_skipped))


def test_val_is_one_unshuffled_pass(manifests):
    uri = manifests[0]
    n = read_manifest(uri)["splits"]["val"]["sequences"]
    pos, rows = rows_of(sequence_dataset(uri, "val", seed=123, num_sequences=10 * n))
    assert pos == list(range(n)) and np.array_equal(rows, all_rows(uri, "val"))


def test_refuses_another_tokenizer_or_seq_len(manifests, tmp_path):
    uri, other = manifests
    theirs = read_manifest(other)["tokenizer"]["hash"]
    ours = read_manifest(uri)["tokenizer"]["hash"]
    assert theirs != ours
    with pytest.raises(ManifestMismatchError, match=f"{uri}.*{ours[:16]}.*expects {theirs[:16]}"):
        sequence_dataset(uri, "train", seed=0, expected_tokenizer_hash=theirs)
    with pytest.raises(ManifestMismatchError, match=f"{uri}.*seq_len=16.*expects seq_len=32"):
        sequence_dataset(uri, "train", seed=0, expected_seq_len=32)
    # a shard swapped in from the other tokenizer's run disagrees with the manifest's size and CRCs
    copy = tmp_path / "mixed"
    shutil.copytree(Path(uri).parent, copy)
    shard = read_manifest(uri)["splits"]["val"]["shards"][0]["file"]
    shutil.copy(Path(other).parent / read_manifest(other)["splits"]["val"]["shards"][0]["file"], copy / shard)
    with pytest.raises(Exception, match=f"shard {shard} (is \\d+ bytes, the manifest says|.*CRC-32)"):
        rows_of(sequence_dataset(str(copy / "manifest.json"), "val", seed=0, expected_tokenizer_hash=ours))


def test_prepared_shards_are_read_per_rank(manifests):
    """prepare's shards (8-row row groups with block checksums) through the per-rank reader."""
    m = read_manifest(manifests[0])
    n = m["splits"]["train"]["sequences"]
    epoch_rows = n - n % BLOCK_ROWS
    reader = rank_batches(
        m, seed=3, global_batch_size=16, micro_batch_size=4, rank=1, world_size=2, start_step=0,
        num_steps=epoch_rows // 16,
    )  # fmt: skip
    half = np.concatenate(list(reader))
    other = rank_batches(
        m, seed=3, global_batch_size=16, micro_batch_size=4, rank=0, world_size=2, start_step=0,
        num_steps=epoch_rows // 16,
    )  # fmt: skip
    epoch = np.concatenate([half, np.concatenate(list(other))])
    assert len(epoch) == epoch_rows // 16 * 16  # each row at most once (the corpus repeats a few rows)
    assert Counter(as_set(epoch)) <= Counter(as_set(all_rows(manifests[0], "train").astype(np.int64)))
    # 8 rows per rank per step: whole 8-row blocks, no row read in vain
    assert reader.stats["rows_read"] == reader.stats["rows_yielded"] == len(half)
    val = list(rank_val_batches(m, num_sequences=10**6, micro_batch_size=16, rank=0, world_size=1))
    tokens, weights = np.concatenate([t for t, _ in val]), np.concatenate([w for _, w in val])
    assert np.array_equal(tokens[weights > 0], all_rows(manifests[0], "val"))
