"""Shards are verified as they are read: a flipped bit, overwritten bytes, a truncated shard or index, a
wrong row count, an index record pointing at the wrong bytes or a manifest without an index stop the
reader with an error naming the shard and the manifest, before any batch holding bad rows is yielded;
storage outages of a few seconds are absorbed by retries."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from data_pipeline.loader import rank_batches
from data_pipeline.manifest import read_manifest
from data_pipeline.shard_reader import ShardCorruptError
from data_pipeline.shards import BLOCK_ROWS
from data_pipeline.storage import DataSourceError
from data_pipeline.stream import sequence_dataset
from tests.helpers import RestartableS3, tiny_corpus_manifest

BATCH = 32


@pytest.fixture(scope="module")
def clean_dir(tmp_path_factory) -> Path:
    return Path(tiny_corpus_manifest(tmp_path_factory.mktemp("tiny"))).parent


@pytest.fixture
def copy(clean_dir, tmp_path) -> Path:
    shutil.copytree(clean_dir, tmp_path / "data")
    return tmp_path / "data"


def reader(manifest: dict, num_steps: int, **kw):
    """The only rank of a world of one, one batch per step, reading in the caller's thread."""
    return rank_batches(
        manifest, seed=1, global_batch_size=BATCH, micro_batch_size=BATCH, rank=0, world_size=1, start_step=0,
        num_steps=num_steps, prefetch=0, **kw,
    )  # fmt: skip


def epoch(manifest: dict, **kw) -> list[np.ndarray]:
    """One full epoch of the train split, batch by batch."""
    return list(reader(manifest, manifest["splits"]["train"]["sequences"] // BATCH, **kw))


def chunk(path: Path, row_group: int) -> tuple[int, int]:
    """(offset, size) of a row group's column chunk in a shard file."""
    c = pq.read_metadata(path).row_group(row_group).column(0)
    return c.data_page_offset, c.total_compressed_size


def test_untouched_shards_pass_and_a_flipped_bit_stops_before_its_batch(copy):
    manifest = read_manifest(str(copy / "manifest.json"))
    clean = epoch(manifest)
    shard = copy / "train/shard-00001.parquet"
    offset, size = chunk(shard, 5)
    bad_rows = {r.tobytes() for r in pq.read_table(shard).column("tokens").to_numpy(zero_copy_only=False)[40:48]}
    first_bad_step = next(i for i, b in enumerate(clean) if any(r.astype(np.uint16).tobytes() in bad_rows for r in b))
    data = bytearray(shard.read_bytes())
    data[offset + size // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    got = []
    with pytest.raises(ShardCorruptError, match=f"{manifest['uri']}: shard train/shard-00001.parquet.*re-run prepare"):
        for batch in reader(manifest, num_steps=len(clean)):
            got.append(batch)
    assert len(got) == first_bad_step and all(np.array_equal(a, b) for a, b in zip(got, clean))


def test_the_ray_data_stream_checks_blocks_too(copy, ray_session):
    """sequence_dataset (fine-tuning, eval, the demo) decodes whole shards and checks every block."""
    uri = str(copy / "manifest.json")
    shard = copy / "val/shard-00000.parquet"
    offset, size = chunk(shard, 3)
    data = bytearray(shard.read_bytes())
    data[offset + size // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(Exception, match="shard val/shard-00000.parquet: rows 24..31 fail their CRC-32 check"):
        sequence_dataset(uri, "val", seed=0).take_all()


def test_overwritten_first_page_is_caught(copy):
    manifest = read_manifest(str(copy / "manifest.json"))
    shard = copy / "train/shard-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[4:68] = bytes(range(64))
    shard.write_bytes(bytes(data))
    with pytest.raises(ShardCorruptError, match="shard train/shard-00000.parquet"):
        epoch(manifest)


def test_truncated_shard_or_index_is_caught(copy):
    manifest = read_manifest(str(copy / "manifest.json"))
    shard = copy / "train/shard-00002.parquet"
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: size // 2])
    with pytest.raises(ShardCorruptError, match=rf"shard train/shard-00002.parquet is {size // 2} bytes, the manifest"):
        epoch(manifest)
    index = copy / "train/row_groups.idx"
    index.write_bytes(index.read_bytes()[:-20])
    with pytest.raises(ShardCorruptError, match=r"train index train/row_groups.idx is \d+ bytes, the manifest"):
        epoch(read_manifest(str(copy / "manifest.json")))


def test_row_count_index_and_old_manifests_are_refused(copy):
    manifest = read_manifest(str(copy / "manifest.json"))
    manifest["splits"]["train"]["shards"][1]["sequences"] += BLOCK_ROWS
    with pytest.raises(ShardCorruptError, match=r"shard train/shard-00001.parquet: \d+ row groups for \d+ rows"):
        epoch(manifest)
    # an index record that points at the wrong bytes: the chunk does not decode, named with its shard
    index = copy / "train/row_groups.idx"
    records = bytearray(index.read_bytes())
    records[0:8] = (int.from_bytes(records[0:8], "little") + 3).to_bytes(8, "little")
    index.write_bytes(bytes(records))
    with pytest.raises(ShardCorruptError, match="shard train/shard-00000.parquet: row group 0 does not decode"):
        epoch(read_manifest(str(copy / "manifest.json")))
    # a manifest from before the row-group index
    raw = json.loads((copy / "manifest.json").read_text())
    del raw["splits"]["train"]["index"]
    (copy / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(DataSourceError, match=r"key 'splits.train' lacks \['index'\].*re-run `raylm prepare`"):
        read_manifest(str(copy / "manifest.json"))


def test_a_short_storage_outage_is_retried_and_a_long_one_named(clean_dir, monkeypatch):
    """A real moto S3 server stopped mid-read and restarted 0.8 s later on the same port (after raylm's
    first 0.5 s retry, before its second), then stopped for good. The AWS SDK's own retries are cut to 3
    quick tries here so that raylm's backoff is what absorbs the outage and the long one is named after
    its 7.5 s of backoff."""
    import boto3

    from data_pipeline.storage import S3_RETRY_ATTEMPTS_ENV

    monkeypatch.setenv(S3_RETRY_ATTEMPTS_ENV, "3")
    server = RestartableS3()
    endpoint = server.endpoint_url
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="outage")
    for f in clean_dir.rglob("*"):
        if f.is_file():
            s3.put_object(Bucket="outage", Key=f"data/{f.relative_to(clean_dir)}", Body=f.read_bytes())
    manifest = read_manifest("s3://outage/data/manifest.json", endpoint_url=endpoint)
    batches = iter(reader(manifest, 20, endpoint_url=endpoint))
    next(batches)
    restart = server.outage(0.8)
    t0 = time.perf_counter()
    for _ in range(5):  # steps that touch every shard, through the outage
        next(batches)
    assert time.perf_counter() - t0 > 0.8  # no batch came before the server was back
    restart.join()
    server.stop()
    with pytest.raises(
        DataSourceError, match=r"s3://outage/data/manifest.json: (shard|train index) train/.*still failing after 5"
    ):
        for _ in range(14):
            next(batches)
