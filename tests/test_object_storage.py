"""Every command that writes a run works with its storage (and its data) on object storage: the moto
S3 server on 127.0.0.1, reached through the same boto3 / pyarrow code as AWS. One pretraining run
rides out a storage outage and then feeds eval, report and a fine-tune from and to S3; the search's
test (tests/sweeps/test_tune.py) runs on S3 too."""

from __future__ import annotations

import json

import pytest
from helpers import tiny_config, tiny_corpus_on_s3

from orchestration.artifacts import RunDir, read_metrics
from orchestration.checkpoint_format import latest_complete_checkpoint
from orchestration.config import load_config

pytestmark = pytest.mark.slow
BUCKET = "raylm-it"
STEPS = 30


@pytest.fixture(scope="module")
def s3_data(tmp_path_factory, ray_session, s3_server) -> tuple[str, str]:
    """(manifest URI on S3, endpoint URL): the tiny corpus's shards uploaded to a bucket."""
    endpoint = s3_server["endpoint_url"]
    return tiny_corpus_on_s3(tmp_path_factory.mktemp("s3data"), endpoint, BUCKET), endpoint


@pytest.fixture(scope="module")
def trained(s3_data, s3_server) -> dict:
    """A ZeRO-1 run with data and storage on S3 (checkpoints every 5 steps, metrics flushed with them,
    Ray Train registering each checkpoint in its snapshot on the same storage), during which the S3
    server goes away for 4 s and comes back: {"summary" or "error", "logged_at_outage": steps}."""
    import threading
    import time

    import boto3

    from orchestration.train.driver import run_training

    manifest, endpoint = s3_data
    overrides = [
        f"train.endpoint_url={endpoint}",
        f"train.max_steps={STEPS}",
        "train.eval_interval=10",
        "train.checkpoint_interval=5",
    ]
    cfg = tiny_config(manifest, f"s3://{BUCKET}/runs", "pre", zero_stage=1, overrides=overrides)
    outcome: dict = {}

    def train() -> None:
        try:
            outcome["summary"] = run_training(cfg, resume=False)
        except Exception as err:  # noqa: BLE001 - handed to the tests
            outcome["error"] = err

    thread = threading.Thread(target=train)
    thread.start()
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    logged: list[int] = []
    while thread.is_alive() and (not logged or logged[-1] < 10):
        try:
            body = s3.get_object(Bucket=BUCKET, Key="runs/pre/metrics.jsonl")["Body"].read().decode()
            logged = [json.loads(line)["step"] for line in body.splitlines() if line.strip()]
        except s3.exceptions.NoSuchKey:
            pass
        time.sleep(0.2)
    if thread.is_alive():
        s3_server["server"].outage(4.0).join()
    thread.join(timeout=300)
    return {**outcome, "logged_at_outage": logged}


def test_a_storage_outage_during_training_is_absorbed(trained):
    """The run carries on with no restart and every step is logged once. Before the filesystem kept its
    SDK retries through pickling, Ray Train's controller died on the snapshot write."""
    assert "error" not in trained, trained
    assert 10 <= trained["logged_at_outage"][-1] < STEPS  # the outage started mid-run
    records = trained["summary"]["records"]
    assert [r["step"] for r in records] == list(range(5, STEPS + 5, 5))  # every step logged once
    assert {r["start_step"] for r in records} == {0}  # no restart from a checkpoint
    assert trained["summary"]["checkpoint"] == f"s3://{BUCKET}/runs/pre/checkpoint_{STEPS:08d}"


@pytest.fixture(scope="module")
def pretrained(trained) -> dict:
    """The run's summary: it must have finished for anything to be read from it."""
    assert "error" not in trained, trained
    return trained["summary"]


def test_train_report_and_eval_with_data_and_storage_on_s3(pretrained, s3_data):
    from orchestration.evaluate.lm import evaluate_lm
    from orchestration.report.write import write_report

    manifest, endpoint = s3_data
    run = RunDir.at(pretrained["run_dir"], endpoint)
    assert run.uri == f"s3://{BUCKET}/runs/pre" and pretrained["checkpoint"].startswith(run.uri)
    assert [r["step"] for r in read_metrics(run)] == list(range(5, STEPS + 5, 5))
    ckpt, meta = latest_complete_checkpoint(run)
    assert meta["step"] == STEPS and ckpt.uri == pretrained["checkpoint"]
    written = write_report(run.uri, endpoint_url=endpoint)
    assert written["report.html"] == f"{run.uri}/report.html" and run.has("report.html")
    # eval reads the checkpoint and the manifest's shards from S3 through the given endpoint
    result = evaluate_lm(pretrained["checkpoint"], manifest, max_sequences=8, endpoint_url=endpoint)
    assert result["loss"] == pytest.approx(read_metrics(run)[-1]["val_loss"], abs=0.5)


def test_credentials_come_from_the_default_chain_and_are_never_stored(pretrained, s3_data):
    """Workers found the keys in their own environment (set before Ray started, as an instance role is
    there on a cluster node): the filesystem handed to tasks carries none, and no artifact holds them."""
    import pickle

    import boto3
    from conftest import TEST_ACCESS_KEY, TEST_SECRET_KEY

    _, endpoint = s3_data
    pickled = pickle.dumps(RunDir.at(pretrained["run_dir"], endpoint))
    assert TEST_SECRET_KEY.encode() not in pickled and TEST_ACCESS_KEY.encode() not in pickled
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    for obj in s3.list_objects_v2(Bucket=BUCKET, Prefix="runs/pre/")["Contents"]:
        body = s3.get_object(Bucket=BUCKET, Key=obj["Key"])["Body"].read()
        assert TEST_SECRET_KEY.encode() not in body, obj["Key"]


def test_finetune_from_and_to_s3(pretrained, s3_data):
    from orchestration.config import FinetuneRunConfig
    from orchestration.finetune.driver import run_finetune

    manifest, endpoint = s3_data
    overrides = [
        f"finetune.checkpoint={pretrained['run_dir']}",
        f"finetune.data={manifest}",
        "finetune.task=lm",
        "finetune.max_val_examples=16",
        f"train.storage_path=s3://{BUCKET}/runs",
        "train.run_name=tuned",
        "train.num_workers=2",
        "train.cpus_per_worker=0.5",
        "train.micro_batch_size=4",
        "train.warmup_steps=1",
        "train.log_interval=4",
        "finetune.patience=0",
        f"train.endpoint_url={endpoint}",
        "train.max_steps=10",
        "train.eval_interval=5",
        "train.checkpoint_interval=5",
    ]
    summary = run_finetune(load_config(None, overrides, schema=FinetuneRunConfig), resume=False)
    run = RunDir.at(summary["run_dir"], endpoint)
    assert {"finetune_summary.json", "finetune.md", "config.yaml", "run.json"} <= run.names()
    assert summary["best_checkpoint"].startswith(f"s3://{BUCKET}/runs/tuned/checkpoint_")
    assert summary["after"]["loss"] < summary["before"]["loss"] + 0.5
