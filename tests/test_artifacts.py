"""Artifacts: run directories on local disk and on the moto S3 server, checkpoint completeness, the
background metrics log."""

from __future__ import annotations

import json

import pytest

from orchestration.artifacts import (
    STOP_REQUEST_FILE,
    MetricsLog,
    RunDir,
    clear_stop_request,
    read_config,
    read_metrics,
    request_stop,
    stop_requested,
    write_config,
    write_latest_run,
    write_run_facts,
)
from orchestration.checkpoint_format import CHECKPOINT_META_FILE, complete_checkpoint_meta, latest_complete_checkpoint


def test_checkpoint_marker_decides_completeness(tmp_path):
    run = tmp_path / "run"
    for step, complete in ((10, True), (20, False)):
        d = run / f"checkpoint_{step:08d}"
        (d / "ds").mkdir(parents=True)
        (d / "ds" / "shard.pt").write_bytes(b"x" * 10)
        files = {"ds/shard.pt": 10, "model.safetensors": 5}
        if complete:
            (d / "model.safetensors").write_bytes(b"y" * 5)
        (d / CHECKPOINT_META_FILE).write_text(json.dumps({"step": step, "files": files}))
    (run / "checkpoint_00000030").mkdir()  # no marker at all: an upload that died early
    where = RunDir.at(str(run))
    assert complete_checkpoint_meta(where.child("checkpoint_00000020")) is None
    ckpt, meta = latest_complete_checkpoint(where)
    assert ckpt.uri.endswith("checkpoint_00000010") and meta["step"] == 10
    (run / "checkpoint_00000010" / "model.safetensors").write_bytes(b"y" * 4)  # truncated file
    assert latest_complete_checkpoint(where) is None


def test_metrics_log_writes_in_the_background_and_truncates(tmp_path):
    run = RunDir.at(str(tmp_path / "run"))
    log = MetricsLog(run, flush_interval_s=0.05)
    for step in (5, 10, 15):
        log.append({"step": step, "loss": 1.0 / step})
    log.close()
    assert [r["step"] for r in read_metrics(run)] == [5, 10, 15]
    again = MetricsLog(run)
    again.truncate_after(10)
    again.append({"step": 15, "loss": 0.5})
    again.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(run)] == [(5, 0.2), (10, 0.1), (15, 0.5)]


def test_run_dir_reads_and_writes_on_object_storage(s3_server):
    import boto3

    boto3.client("s3", endpoint_url=s3_server["endpoint_url"], region_name="us-east-1").create_bucket(
        Bucket="artifacts"
    )
    run = RunDir.at("s3://artifacts/runs/one", s3_server["endpoint_url"])
    assert not run.exists() and read_metrics(run) == []
    write_config(run, {"train": {"lr": 0.001}})
    log = MetricsLog(run)
    log.append({"step": 1, "loss": 2.0})
    log.close()
    assert run.exists() and {"config.yaml", "metrics.jsonl"} <= run.names()
    assert read_config(run) == {"train": {"lr": 0.001}}
    assert read_metrics(RunDir.at("s3://artifacts/runs/one", s3_server["endpoint_url"])) == [{"step": 1, "loss": 2.0}]
    with pytest.raises(FileNotFoundError):
        run.read_bytes("missing.json")


def test_a_stop_request_names_a_run_or_its_family_and_is_cleared_once(tmp_path):
    """`raylm stop` writes the request into a run directory (a family means its newest run); the worker
    loop reads it, and the next launch of the run removes it."""
    run, family = RunDir.at(str(tmp_path / "shakespeare-1")), RunDir.at(str(tmp_path / "shakespeare"))
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        request_stop(run)  # no run there yet
    write_run_facts(run, {"total_steps": 10})
    write_latest_run(family, run.uri)
    assert request_stop(family) == run.uri_of(STOP_REQUEST_FILE) and stop_requested(run)
    assert not stop_requested(family)
    assert clear_stop_request(run) and not stop_requested(run) and not clear_stop_request(run)
