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


def _run_child(script: Path, *args: str) -> tuple[dict, str]:
    """Run a cluster script in its own process: (the JSON of its RESULT line, its stdout)."""
    proc = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).resolve().parents[2],
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT ") :]), proc.stdout


def _run_scenario(scenario: str, tmp_path: Path, endpoint: str) -> dict:
    """A multinode_run.py scenario with the tiny corpus and the run on the S3 server (its own bucket)."""
    bucket = f"raylm-{scenario}"
    manifest = tiny_corpus_on_s3(tmp_path, endpoint, bucket)
    args = ["--scenario", scenario, "--manifest", manifest, "--storage", f"s3://{bucket}/runs", "--endpoint", endpoint]
    return _run_child(SCRIPT, *args)[0]


def test_a_lost_node_costs_no_step_beyond_the_last_checkpoint(tmp_path, s3_server):
    """3 workers on 3 nodes (ZeRO-1); one node is removed after the step-10 checkpoint; the run fails,
    and running it again on the 2 nodes left (2 workers, same global batch: the ZeRO state reshards)
    continues from the newest complete checkpoint to the end, every step logged once."""
    result = _run_scenario("lost-node", tmp_path, s3_server["endpoint_url"])
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


def test_an_elastic_run_continues_on_fewer_workers_and_grows_back(tmp_path, s3_server):
    """2 workers on 2 nodes with train.min_workers=1: a node removed after the step-20 checkpoint, the
    run goes on with 1 worker (same global batch, ZeRO state resharded) from its newest checkpoint;
    the node added back, it grows to 2 workers again; no restart by hand, every step logged once."""
    result = _run_scenario("elastic", tmp_path, s3_server["endpoint_url"])
    records = result["records"]
    workers = [len(r["data_read_rows_per_rank"]) for r in records]
    print(result["error"], result["summary"], list(zip([r["step"] for r in records], workers)))
    assert result["error"] is None and result["summary"]["final_step"] == 1200
    assert [r["step"] for r in records] == list(range(20, 1220, 20))  # every logged step once
    shrunk = workers.index(1)
    assert workers[0] == 2 and 2 in workers[shrunk:]  # 2 workers, then 1, then 2 again
    starts = sorted({r["start_step"] for r in records})
    assert len(starts) >= 3 and starts[0] == 0  # two resumes from checkpoints, no step lost beyond them


def test_a_cluster_with_no_worker_nodes_scales_up_for_a_run(tmp_path):
    """A head with no CPUs and an autoscaler whose worker node type starts at zero nodes (Ray's fake
    multi-node provider): `raylm train` for 2 workers x 1 CPU says it waits for the autoscaler instead
    of refusing, the autoscaler adds the 2 nodes and the run finishes."""
    from helpers import tiny_corpus_manifest

    manifest = tiny_corpus_manifest(tmp_path)
    result, stdout = _run_child(AUTOSCALING_SCRIPT, "--manifest", manifest, "--storage", str(tmp_path / "runs"))
    print(result)
    assert result["worker_nodes_before"] == 0 and result["worker_nodes_after"] == 2
    assert "waiting up to 300 s (train.scale_up_timeout_s) for the autoscaler to add nodes" in stdout
    assert result["summary"]["final_step"] == 10
