"""s3 -> s3 prepare against a real S3 server (moto, loopback), configured by endpoint_url like MinIO/R2."""

from __future__ import annotations

import gzip
import json

import boto3
import pyarrow.parquet as pq
import pytest

from data_pipeline.config import CleanConfig, DataConfig, NearDedupConfig, OutputConfig, SourceConfig, TokenizerConfig
from data_pipeline.manifest import load_tokenizer_from_manifest, read_manifest
from data_pipeline.prepare import prepare
from data_pipeline.storage import DataSourceError, embedded_corpus_dir, filesystem_for
from data_pipeline.stream import sequence_dataset

pytestmark = pytest.mark.usefixtures("sort_based_shuffle")


PLAYS = ["lovers_complaint_gut.txt", "passionate_pilgrim_gut.txt", "phoenix_and_the_turtle_gut.txt"]


def s3_config(s3, uris, out_uri) -> DataConfig:
    return DataConfig(
        sources=SourceConfig(uris=uris, endpoint_url=s3["endpoint_url"], region=s3["region"]),
        clean=CleanConfig(min_chars=50),
        near_dedup=NearDedupConfig(num_perm=32, bands=8),
        tokenizer=TokenizerConfig(vocab_size=400, pattern="gpt2"),
        output=OutputConfig(
            uri=out_uri,
            seq_len=32,
            val_fraction=0.25,
            shard_tokens=4000,
            endpoint_url=s3["endpoint_url"],
            region=s3["region"],
        ),
    )


@pytest.fixture(scope="module")
def s3_corpus(s3_server):
    client = boto3.client("s3", endpoint_url=s3_server["endpoint_url"], region_name=s3_server["region"])
    for bucket in ("raw-corpus", "token-shards"):
        client.create_bucket(Bucket=bucket)
    texts = {p: (embedded_corpus_dir() / p).read_text(encoding="utf-8") for p in PLAYS}
    for name, text in texts.items():
        client.put_object(Bucket="raw-corpus", Key=f"plays/{name}", Body=text.encode())
    lines = "\n".join(
        json.dumps({"text": f"Stanza {i}. " + texts[PLAYS[0]][i * 700 : (i + 1) * 700]}) for i in range(6)
    )
    client.put_object(Bucket="raw-corpus", Key="plays/extra/stanzas.jsonl.gz", Body=gzip.compress(lines.encode()))
    return texts


def test_s3_to_s3_prepare_and_read_back(ray_session, s3_server, s3_corpus):
    manifest_uri = prepare(s3_config(s3_server, ["s3://raw-corpus/plays/"], "s3://token-shards/runs/a"))
    assert manifest_uri == "s3://token-shards/runs/a/manifest.json"
    m = read_manifest(manifest_uri, endpoint_url=s3_server["endpoint_url"])
    assert (
        m["sources"] == [{"uri": "s3://raw-corpus/plays/", "files": 4, "bytes": m["sources"][0]["bytes"]}]
        and m["sources"][0]["bytes"] > 20_000
    )
    assert m["cleaning"]["documents_in"] == 3 + 6
    enc = load_tokenizer_from_manifest(manifest_uri, endpoint_url=s3_server["endpoint_url"])
    assert enc.n_vocab == 401

    fs, base = filesystem_for("s3://token-shards/runs/a", s3_server["endpoint_url"], s3_server["region"])
    total_tokens, stream = 0, []
    for split in ("train", "val"):
        for shard in m["splits"][split]["shards"]:
            table = pq.read_table(f"{base}/{shard['file']}", filesystem=fs)
            assert table.num_rows == shard["sequences"]
            flat = table.column("tokens").combine_chunks().flatten().to_pylist()
            total_tokens += len(flat)
            stream += flat
        assert total_tokens > 0
    assert total_tokens == sum(m["splits"][s]["tokens"] for s in ("train", "val"))
    # every token came from the corpus: the decoded stream's documents are pieces of the uploaded text
    text = enc.decode(stream)
    assert "\ufffd" not in text
    corpus = "\n".join(s3_corpus.values())
    for piece in text.split("<|endoftext|>"):
        middle = piece.strip()[100:160]
        assert middle in corpus, middle

    rows = sequence_dataset(
        manifest_uri, "train", seed=3, num_sequences=10, endpoint_url=s3_server["endpoint_url"]
    ).take_all()
    assert [r["position"] for r in rows] == list(range(10)) and rows[0]["tokens"].shape == (33,)


def test_missing_bucket_names_the_uri(ray_session, s3_server, s3_corpus):
    with pytest.raises(DataSourceError, match="s3://no-such-bucket/x: no such file, directory or bucket"):
        prepare(s3_config(s3_server, ["s3://no-such-bucket/x"], "s3://token-shards/runs/b"))
    with pytest.raises(DataSourceError, match="s3://raw-corpus/plays/\\*.parquet: no files matching"):
        prepare(s3_config(s3_server, ["s3://raw-corpus/plays/*.parquet"], "s3://token-shards/runs/b"))


def test_wrong_credentials_are_refused_with_a_clear_error(ray_session, s3_server, s3_corpus, monkeypatch):
    from moto import settings

    # moto checks signatures only once its no-auth allowance is used up; 0 = check every request
    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(DataSourceError, match="s3://raw-corpus/plays/: cannot list.*credentials") as err:
        prepare(s3_config(s3_server, ["s3://raw-corpus/plays/"], "/tmp/unused-output"))
    assert "ACCESS_DENIED" in str(err.value)


@pytest.mark.parametrize("uri", ["s3://", "s3://Bad_Bucket/corpus", "gs://a/corpus", "s3://x..y/corpus"])
def test_malformed_bucket_names_fail_before_any_request(uri):
    from data_pipeline.storage import DataSourceError, filesystem_for

    with pytest.raises(DataSourceError, match="not a valid bucket name"):
        filesystem_for(uri)


def test_s3_filesystem_keeps_its_retries_when_pickled(monkeypatch):
    """Ray Train gets the run's filesystem pickled (controller, workers); pyarrow's own pickling
    drops retry_strategy, raylm's keeps the number of tries. A bad tries setting is named."""
    import pickle

    from data_pipeline.storage import S3_RETRY_ATTEMPTS, S3_RETRY_ATTEMPTS_ENV, RetryingS3FileSystem

    fs, _ = filesystem_for("s3://bucket/run", "http://127.0.0.1:9")
    assert isinstance(fs, RetryingS3FileSystem) and fs.retry_attempts == S3_RETRY_ATTEMPTS
    monkeypatch.setenv(S3_RETRY_ATTEMPTS_ENV, "4")
    fs, _ = filesystem_for("s3://bucket/run", "http://127.0.0.1:9")
    monkeypatch.delenv(S3_RETRY_ATTEMPTS_ENV)
    copy = pickle.loads(pickle.dumps(fs))
    assert isinstance(copy, RetryingS3FileSystem) and copy.retry_attempts == 4
    assert copy.equals(fs)  # endpoint, region and the rest travel too
    monkeypatch.setenv(S3_RETRY_ATTEMPTS_ENV, "many")
    with pytest.raises(DataSourceError, match=f"{S3_RETRY_ATTEMPTS_ENV}='many': give a whole number"):
        filesystem_for("s3://bucket/run", "http://127.0.0.1:9")
