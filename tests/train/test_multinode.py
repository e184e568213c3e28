"""Multi-node behaviour on one machine: a ``ray.cluster_utils.Cluster`` of several raylets (each its
own node with its own CPUs), data and storage on the moto S3 server; an autoscaling cluster whose
worker nodes (raylets too) the autoscaler adds. Each cluster runs in a child process
(tests/train/multinode_run.py, autoscaling_run.py) so the test session's own Ray stays untouched."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import tiny_corpus_on_s3

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).with_name("multinode_run.py")
AUTOSCALING_SCRIPT = Path(__file__).with_name("autoscaling_run.py")


def test_a_lost_node_costs_no_step_beyond_the_last_checkpoint(tmp_path, s3_server):
    """3 workers on 3 nodes (ZeRO-1); one node is removed after the step-10 checkpoint; the run fails,
    and running it again on the 2 nodes left (2 workers, same global batch: the ZeRO state reshards)
    continues from the newest complete checkpoint to the end, every step logged once."""
    endpoint = s3_server["endpoint_url"]
    manifest = tiny_corpus_on_s3(tmp_path, endpoint, "raylm-multinode")
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--manifest",
            manifest,
            "--storage",
            "s3://raylm-multinode/runs",
            "--endpoint",
            endpoint,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).resolve().parents[2],
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    print({k: v for k, v in result.items() if k != "records"})

    assert len(result["worker_nodes"]) == 3  # one worker per node
    assert result["first_run_error"] not in (None, "still running")  # the node loss ended the first run
    lost_at = result["checkpoint_after_loss"]
    assert 10 <= lost_at < 60
    records = result["records"]
    steps = [r["step"] for r in records]
    assert steps == list(range(5, 65, 5))  # every logged step once: up to the checkpoint, then resumed
    assert all(r["start_step"] == 0 for r in records if r["step"] <= lost_at)
    assert all(r["start_step"] == lost_at for r in records if r["step"] > lost_at)
    assert all(len(r["data_read_rows_per_rank"]) == (3 if r["step"] <= lost_at else 2) for r in records)
    assert result["summary"]["final_step"] == 60 and records[-1]["loss"] < records[0]["loss"] - 0.2


def test_a_cluster_with_no_worker_nodes_scales_up_for_a_run(tmp_path):
    """A head with no CPUs and an autoscaler whose worker node type starts at zero nodes (Ray's fake
    multi-node provider): `raylm train` for 2 workers x 1 CPU says it waits for the autoscaler instead
    of refusing, the autoscaler adds the 2 nodes and the run finishes."""
    from helpers import tiny_corpus_manifest

    manifest = tiny_corpus_manifest(tmp_path)
    proc = subprocess.run(
        [sys.executable, str(AUTOSCALING_SCRIPT), "--manifest", manifest, "--storage", str(tmp_path / "runs")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).resolve().parents[2],
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT ") :])
    print(result)
    assert result["worker_nodes_before"] == 0 and result["worker_nodes_after"] == 2
    assert "waiting up to 300 s (train.scale_up_timeout_s) for the autoscaler to add nodes" in proc.stdout
    assert result["summary"]["final_step"] == 10
