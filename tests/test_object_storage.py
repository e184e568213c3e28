"""Every command that writes a run, a search or a sweep works with its storage (and its data) on object
storage: the moto S3 server on 127.0.0.1, reached through the same boto3 / pyarrow code as AWS."""

from __future__ import annotations

import json

import pytest
from helpers import tiny_config, tiny_corpus_on_s3

from orchestration.artifacts import (
    SCALING_FIT_FILE,
    TUNE_RESULTS_FILE,
    RunDir,
    latest_complete_checkpoint,
    read_metrics,
)
from orchestration.config import ScalingRunConfig, TuneRunConfig, load_config

pytestmark = pytest.mark.slow
BUCKET = "raylm-it"


@pytest.fixture(scope="module")
def s3_data(tmp_path_factory, ray_session, s3_server) -> tuple[str, str]:
    """(manifest URI on S3, endpoint URL): the tiny corpus's shards uploaded to a bucket."""
    endpoint = s3_server["endpoint_url"]
    return tiny_corpus_on_s3(tmp_path_factory.mktemp("s3data"), endpoint, BUCKET), endpoint


def _overrides(endpoint: str) -> list[str]:
    return [
        f"train.endpoint_url={endpoint}",
        "train.max_steps=10",
        "train.eval_interval=5",
        "train.checkpoint_interval=5",
    ]


@pytest.fixture(scope="module")
def trained(s3_data) -> dict:
    from orchestration.train.driver import run_training

    manifest, endpoint = s3_data
    cfg = tiny_config(manifest, f"s3://{BUCKET}/runs", "pre", zero_stage=1, overrides=_overrides(endpoint))
    return run_training(cfg, resume=False)


def test_train_report_and_eval_with_data_and_storage_on_s3(trained, s3_data):
    from orchestration.evaluate.lm import evaluate_lm
    from orchestration.report.write import write_report

    manifest, endpoint = s3_data
    run = RunDir.at(trained["run_dir"], endpoint)
    assert run.uri == f"s3://{BUCKET}/runs/pre" and trained["checkpoint"].startswith(run.uri)
    assert [r["step"] for r in read_metrics(run)] == [5, 10]
    ckpt, meta = latest_complete_checkpoint(run)
    assert meta["step"] == 10 and ckpt.uri == trained["checkpoint"]
    written = write_report(run.uri, endpoint_url=endpoint)
    assert written["report.html"] == f"{run.uri}/report.html" and run.has("report.html")
    # eval reads the checkpoint and the manifest's shards from S3 through the given endpoint
    result = evaluate_lm(trained["checkpoint"], manifest, max_sequences=8, endpoint_url=endpoint)
    assert result["loss"] == pytest.approx(read_metrics(run)[-1]["val_loss"], abs=0.5)


def test_credentials_come_from_the_default_chain_and_are_never_stored(trained, s3_data):
    """Workers found the keys in their own environment (set before Ray started, as an instance role is
    there on a cluster node): the filesystem handed to tasks carries none, and no artifact holds them."""
    import pickle

    import boto3
    from conftest import TEST_ACCESS_KEY, TEST_SECRET_KEY

    _, endpoint = s3_data
    pickled = pickle.dumps(RunDir.at(trained["run_dir"], endpoint))
    assert TEST_SECRET_KEY.encode() not in pickled and TEST_ACCESS_KEY.encode() not in pickled
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    for obj in s3.list_objects_v2(Bucket=BUCKET, Prefix="runs/pre/")["Contents"]:
        body = s3.get_object(Bucket=BUCKET, Key=obj["Key"])["Body"].read()
        assert TEST_SECRET_KEY.encode() not in body, obj["Key"]


def test_finetune_from_and_to_s3(trained, s3_data):
    from orchestration.config import FinetuneRunConfig
    from orchestration.finetune.driver import run_finetune

    manifest, endpoint = s3_data
    overrides = [
        f"finetune.checkpoint={trained['run_dir']}",
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
        *_overrides(endpoint),
    ]
    summary = run_finetune(load_config(None, overrides, schema=FinetuneRunConfig), resume=False)
    run = RunDir.at(summary["run_dir"], endpoint)
    assert {"finetune_summary.json", "finetune.md", "config.yaml", "run.json"} <= run.names()
    assert summary["best_checkpoint"].startswith(f"s3://{BUCKET}/runs/tuned/checkpoint_")
    assert summary["after"]["loss"] < summary["before"]["loss"] + 0.5


def test_tune_and_scaling_write_their_artifacts_to_s3(s3_data):
    from orchestration.report.write import write_report
    from orchestration.sweeps.scaling import run_scaling
    from orchestration.sweeps.tune import run_tune

    manifest, endpoint = s3_data
    base = [
        f"train.data={manifest}",
        f"train.endpoint_url={endpoint}",
        "train.num_workers=2",
        "train.cpus_per_worker=0.5",
        "train.micro_batch_size=4",
        "train.warmup_steps=1",
        "train.eval_interval=4",
        "train.val_sequences=8",
        "train.log_interval=4",
        "model.block_size=32",
        "model.n_layer=1",
        "model.n_head=2",
        "model.n_embd=32",
    ]
    search = run_tune(
        load_config(
            None,
            [*base, "train.max_steps=8", f"tune.storage_path=s3://{BUCKET}/tune", "tune.name=lr",
             "tune.search_space={train.lr: {grid: [0.003]}}", "tune.num_samples=1", "tune.scheduler=fifo"],
            schema=TuneRunConfig,
        )
    )  # fmt: skip
    tune_dir = RunDir.at(search["tune_dir"], endpoint)
    assert tune_dir.uri == f"s3://{BUCKET}/tune/lr" and tune_dir.has(TUNE_RESULTS_FILE)
    assert search["best"]["status"] == "completed" and search["best_config"] == tune_dir.uri_of("best_config.yaml")
    assert read_metrics(RunDir.at(search["best"]["run_dir"], endpoint))[-1]["step"] == 8
    assert write_report(tune_dir.uri, endpoint_url=endpoint)["report.html"] == tune_dir.uri_of("report.html")

    sweep = run_scaling(
        load_config(
            None,
            [*base, "train.max_steps=8", f"scaling.storage_path=s3://{BUCKET}/sweeps", "scaling.name=tiny",
             "scaling.n_layers=[1, 2]", "scaling.aspect=16", "scaling.tokens=[4096]", "scaling.min_steps=4",
             "scaling.n_boot=0"],
            schema=ScalingRunConfig,
        )
    )  # fmt: skip
    sweep_dir = RunDir.at(sweep["sweep_dir"], endpoint)
    assert sweep["failed"] == [] and len(sweep["points"]) == 2
    assert {SCALING_FIT_FILE, "scaling_points.json", "points"} <= sweep_dir.names()
    write_report(sweep_dir.uri, endpoint_url=endpoint)
    assert sweep_dir.has("report.html")


def test_a_storage_outage_during_training_is_absorbed(tmp_path, ray_session):
    """The S3 server goes away for 4 s mid-run (checkpoints every 5 steps, metrics flushed with them,
    Ray Train registering each checkpoint in its snapshot on the same storage) and comes back: the
    run carries on with no restart and every step is logged once. Before the filesystem kept its SDK
    retries through pickling, Ray Train's controller died on the snapshot write."""
    import threading
    import time

    import boto3
    from helpers import RestartableS3

    from orchestration.train.driver import run_training

    server = RestartableS3()
    endpoint, bucket = server.endpoint_url, "outage-run"
    manifest = tiny_corpus_on_s3(tmp_path, endpoint, bucket)
    overrides = [f"train.endpoint_url={endpoint}", "train.max_steps=60", "train.checkpoint_interval=5"]
    cfg = tiny_config(manifest, f"s3://{bucket}/runs", "outage", zero_stage=1, overrides=overrides)
    outcome: dict = {}

    def train() -> None:
        try:
            outcome["summary"] = run_training(cfg, resume=False)
        except Exception as err:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = err

    thread = threading.Thread(target=train)
    thread.start()
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    logged: list[int] = []
    while not logged or logged[-1] < 10:
        assert thread.is_alive(), outcome
        try:
            body = s3.get_object(Bucket=bucket, Key="runs/outage/metrics.jsonl")["Body"].read().decode()
            logged = [json.loads(line)["step"] for line in body.splitlines() if line.strip()]
        except s3.exceptions.NoSuchKey:
            pass
        time.sleep(0.2)
    assert logged[-1] < 40  # the outage starts mid-run
    server.outage(4.0).join()
    thread.join(timeout=300)
    server.stop()
    assert "error" not in outcome, outcome
    records = outcome["summary"]["records"]
    assert [r["step"] for r in records] == list(range(5, 65, 5))  # every step logged once
    assert {r["start_step"] for r in records} == {0}  # no restart from a checkpoint
    assert outcome["summary"]["checkpoint"] == f"s3://{bucket}/runs/outage/checkpoint_00000060"
