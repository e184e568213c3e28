"""Experiment trackers, offline: what the worker loop logs lands in TensorBoard event files, an MLflow
file store and an offline W&B run, read back with each library's own reader; a resume continues the
same run; a remote (S3) run directory gets the files; missing packages fail with the extra to install."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs  # noqa: F401  # loaded in every training worker already, as is torch:
import pytest
import torch  # noqa: F401  # the open-time check below then times only what open_trackers adds

from orchestration.train.trackers import RUN_DIR_TAG, TrackerError, check_trackers, open_trackers

CONFIG = {"model": {"n_layer": 2, "rope": True}, "train": {"lr": 0.001, "betas": [0.9, 0.95], "run_name": "r"}}


def record(step: int, loss: float, val: bool = False) -> dict:
    """A record shaped like the loop's metrics.jsonl line (mfu None on CPU, a per-rank list)."""
    rec = {
        "step": step,
        "start_step": 0,
        "loss": loss,
        "lr": 1e-3,
        "grad_norm": 0.5,
        "tokens": step * 512,
        "step_time_s": 0.1,
        "data_wait_s": 0.001,
        "optimizer_state_numel_per_rank": [10, 10],
        "tokens_per_s": 5120.0,
        "flops_per_s": 1e9,
        "mfu": None,
    }
    if val:
        rec.update(val_loss=loss + 0.5, val_perplexity=2.0)
    return rec


def run_two_attempts(names: list[str], run_dir: str, endpoint_url: str | None = None) -> float:
    """Attempt 1 logs steps 2, 4, 6 and dies without a checkpoint past 4; attempt 2 resumes at 4, redoes
    6 (new values), logs 8 and a summary. Returns the seconds open + the first log took in attempt 1."""
    t0 = time.perf_counter()
    first = open_trackers(names, run_dir=run_dir, run_name="r", config=CONFIG, resume_step=0, endpoint_url=endpoint_url)
    first.log(record(2, 4.0))
    open_s = time.perf_counter() - t0
    first.log(record(4, 3.0, val=True))
    first.log(record(6, 2.5))
    first.close()
    second = open_trackers(
        names, run_dir=run_dir, run_name="r", config=CONFIG, resume_step=4, endpoint_url=endpoint_url
    )
    second.log(record(6, 2.0))
    second.log(record(8, 1.5, val=True))
    second.summary({"final_step": 8, "final_loss": 1.5, "final_val_loss": 2.0, "checkpoint": f"{run_dir}/checkpoint_8"})
    second.close()
    return open_s


def check_tensorboard(tb_dir: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb_dir))
    events.Reload()
    tags = events.Tags()
    # attempt 1's step 6 is purged by the resume at 4; None and list fields are not scalars
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(2, 4.0), (4, 3.0), (6, 2.0), (8, 1.5)]
    assert [(e.step, e.value) for e in events.Scalars("val_loss")] == [(4, 3.5), (8, 2.0)]
    assert {"lr", "tokens", "tokens_per_s", "data_wait_s"} <= set(tags["scalars"])
    assert not {"mfu", "step", "start_step", "optimizer_state_numel_per_rank"} & set(tags["scalars"])
    texts = {tag: events.Tensors(tag)[-1].tensor_proto.string_val[0].decode() for tag in tags["tensors"]}
    config_text = next(v for k, v in texts.items() if k.startswith("config"))
    summary_text = next(v for k, v in texts.items() if k.startswith("summary"))
    assert json.loads(config_text) == CONFIG
    assert json.loads(summary_text)["final_loss"] == 1.5


def check_mlflow(store: Path, run_dir: str) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store.as_uri())
    experiment = client.get_experiment_by_name("raylm")
    (run,) = client.search_runs([experiment.experiment_id])  # the resume continued the same MLflow run
    assert run.data.tags[RUN_DIR_TAG] == run_dir and run.info.run_name == "r" and run.info.status == "FINISHED"
    assert run.data.params["train.lr"] == "0.001" and run.data.params["train.betas"] == "[0.9, 0.95]"
    assert run.data.params["model.rope"] == "True"
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))
    # MLflow cannot delete metric points: attempt 1's step 6 stays beside attempt 2's
    assert history == [(2, 4.0), (4, 3.0), (6, 2.0), (6, 2.5), (8, 1.5)]
    assert run.data.metrics["summary/final_val_loss"] == 2.0
    assert run.data.tags["summary/checkpoint"] == f"{run_dir}/checkpoint_8"
    assert "mfu" not in run.data.metrics


def test_tensorboard_and_mlflow_in_a_local_run_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = str(tmp_path / "run")
    open_s = run_two_attempts(["tensorboard", "mlflow"], run_dir)
    # Opening (importing MLflow takes seconds) happens on the tracker thread, not before the first step.
    assert open_s < 1.0, f"open_trackers + log took {open_s:.2f} s"
    check_tensorboard(tmp_path / "run" / "tensorboard")
    check_mlflow(tmp_path / "run" / "mlflow", run_dir)


def test_remote_run_dir_is_staged_locally_and_copied_up(tmp_path, s3_server, monkeypatch):
    import boto3

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    endpoint = s3_server["endpoint_url"]
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="trackers")
    run_dir = "s3://trackers/runs/r"
    # attempt 2 starts from what attempt 1 copied up (its local staging directory is wiped first)
    run_two_attempts(["tensorboard", "mlflow"], run_dir, endpoint_url=endpoint)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="trackers", Prefix="runs/r/")["Contents"]]
    assert any(k.startswith("runs/r/tensorboard/events.out.tfevents.") for k in keys)
    assert "runs/r/mlflow/" in "".join(keys)
    local = tmp_path / "copy"
    for key in keys:
        target = local / key[len("runs/r/") :]
        if key.endswith("/"):  # a folder marker (MLflow needs its empty folders, e.g. a run's artifacts/)
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file("trackers", key, str(target))
    check_tensorboard(local / "tensorboard")
    check_mlflow(local / "mlflow", run_dir)


def read_wandb_records(path: Path) -> list:
    """The protobuf records of an offline ``.wandb`` file (a LevelDB-style log: 7-byte file header, 32 KiB
    blocks, each chunk a 7-byte header <crc32 u32, length u16, type u8>; types 1 full, 2-4 first/middle/last)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, chunks, out = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer too short for a header: padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(chunks)
            out.append(rec)
            chunks = b""
    return out


def values(items) -> dict:
    """A W&B history/summary record's items as {key: value} (a key is either flat or nested)."""
    return {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}


def test_wandb_offline_run_holds_config_metrics_and_summary(tmp_path, monkeypatch):
    for var in ("WANDB_MODE", "WANDB_PROJECT", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    run_dir = str(tmp_path / "run")
    trackers = open_trackers(["wandb"], run_dir=run_dir, run_name="r", config=CONFIG)
    for step, loss in [(2, 4.0), (4, 3.0)]:
        trackers.log(record(step, loss, val=step == 4))
    trackers.summary({"final_step": 4, "final_loss": 3.0})
    trackers.close()
    resumed = open_trackers(["wandb"], run_dir=run_dir, run_name="r", config=CONFIG, resume_step=4)
    resumed.log(record(6, 2.0))
    resumed.close()

    runs = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and runs[0].name[-16:] == runs[1].name[-16:]  # one W&B run id across the resume
    records = read_wandb_records(next(runs[0].glob("run-*.wandb")))
    (run,) = [r.run for r in records if r.HasField("run")]
    assert run.display_name == "r" and run.project == "raylm"
    assert {i.key: json.loads(i.value_json) for i in run.config.update if i.key in CONFIG} == CONFIG
    history = [values(r.history.item) for r in records if r.HasField("history")]
    assert [(h["step"], h["loss"]) for h in history] == [(2, 4.0), (4, 3.0)]
    assert history[1]["val_loss"] == 3.5 and "mfu" not in history[0]
    summary = {k: v for r in records if r.HasField("summary") for k, v in values(r.summary.update).items()}
    assert summary["final_loss"] == 3.0
    resumed = read_wandb_records(next(runs[1].glob("run-*.wandb")))
    kinds = [r.WhichOneof("record_type") for r in resumed]
    assert [values(r.history.item)["step"] for r in resumed if r.HasField("history")] == [6], (runs, kinds)


def test_unknown_repeated_and_missing_trackers_fail_clearly(tmp_path, monkeypatch):
    with pytest.raises(TrackerError, match=r"unknown tracker 'neptune'; allowed: tensorboard, mlflow, wandb"):
        check_trackers(["tensorboard", "neptune"])
    with pytest.raises(TrackerError, match="lists a tracker twice"):
        check_trackers(["mlflow", "mlflow"])
    # Without site-packages (python -S) none of the trackers is importable: the error names the extra.
    probe = "from orchestration.train.trackers import check_trackers as c\nc(['wandb'])"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run([sys.executable, "-S", "-c", probe], env=env, capture_output=True, text=True)
    assert out.returncode == 1
    assert "'wandb' needs the 'wandb' package" in out.stderr and "pip install 'raylm[wandb]'" in out.stderr
    # A tracker that fails at run time surfaces at the loop's next call, naming the tracker.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://nowhere")
    broken = open_trackers(["mlflow"], run_dir=str(tmp_path / "run"), run_name="r", config=CONFIG)
    with pytest.raises(TrackerError, match=r"tracker 'mlflow' failed"):
        broken.log(record(2, 1.0))
        broken.close()


def test_no_trackers_is_a_no_op(tmp_path):
    trackers = open_trackers([], run_dir=str(tmp_path / "run"), run_name="r", config=CONFIG)
    trackers.log(record(2, 1.0))
    trackers.summary({"final_step": 2})
    trackers.close()
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_trackers_in_a_ray_worker(tmp_path, ray_session, monkeypatch):
    """Where the loop runs them: rank 0 is a Ray worker process (its stdout captured by Ray, no terminal)."""
    from ray import cloudpickle
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for var in ("MLFLOW_TRACKING_URI", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)
    run_dir = str(tmp_path / "run")
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # a test module is not importable by workers

    @ray_session.remote(num_cpus=0)
    def rank0() -> None:
        trackers = open_trackers(["tensorboard", "mlflow", "wandb"], run_dir=run_dir, run_name="r", config=CONFIG)
        for step in (2, 4):
            trackers.log(record(step, 1.0 / step))
        trackers.summary({"final_step": 4, "final_loss": 0.25})
        trackers.close()

    ray_session.get(rank0.remote(), timeout=300)
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [2, 4]
    assert len(list((tmp_path / "run" / "mlflow").glob("*/*/metrics/loss"))) == 1
    (wandb_file,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    assert [values(r.history.item)["step"] for r in read_wandb_records(wandb_file) if r.HasField("history")] == [2, 4]
