"""Multi-node behaviour on one machine: a ``ray.cluster_utils.Cluster`` of several raylets (each its
own node with its own CPUs), data and storage on the moto S3 server. The cluster runs in a child
process (tests/train/multinode_run.py) so the test session's own Ray instance stays untouched."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import tiny_corpus_on_s3

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).with_name("multinode_run.py")


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
