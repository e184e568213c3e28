"""A simulated 3-node Ray cluster losing a node mid-run; run by test_multinode.py in its own process.

Starts ``ray.cluster_utils.Cluster`` (a head with no CPUs and three 1-CPU worker nodes, each its own
raylet), trains a tiny GPT on 3 workers with data and storage on the S3 server at ``--endpoint``,
removes one worker node once the step-10 checkpoint is complete, then runs the same run again on the
2 nodes left with 2 workers (same global batch). Prints one JSON line: the nodes the 3 workers ran
on, the error the first run ended with, the newest complete checkpoint after the loss, the resumed
run's summary and metrics.

    python tests/train/multinode_run.py --manifest s3://b/data/manifest.json --storage s3://b/runs --endpoint URL
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--storage", required=True)
    ap.add_argument("--endpoint", required=True)
    args = ap.parse_args()

    # Ray Train's placement-group cleaner finds its cluster through RAY_ADDRESS: with the test
    # session's own Ray on this machine too, "auto" would be ambiguous. Set before any raylet starts.
    gcs_port = free_port()
    os.environ["RAY_ADDRESS"] = f"127.0.0.1:{gcs_port}"
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/helpers.py

    import ray
    from helpers import tiny_config
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    from orchestration.artifacts import RunDir, latest_complete_checkpoint, read_metrics
    from orchestration.train.driver import run_training

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "gcs_server_port": gcs_port,
            "dashboard_port": free_port(),
            "include_dashboard": True,
        },
    )
    workers = [cluster.add_node(num_cpus=1) for _ in range(3)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)

    def config(num_workers: int, accum: int):
        overrides = [
            f"train.endpoint_url={args.endpoint}",
            f"train.num_workers={num_workers}",
            "train.cpus_per_worker=1",  # one worker per 1-CPU node
            f"train.grad_accum_steps={accum}",  # global batch 24 either way
            "train.max_steps=60",
            "train.checkpoint_interval=10",
            "train.eval_interval=10",
            "train.max_failures=0",
        ]
        return tiny_config(args.manifest, args.storage, "multinode", zero_stage=1, overrides=overrides)

    run = RunDir.at(f"{args.storage}/multinode", args.endpoint)
    outcome: dict = {}

    def first_run() -> None:
        try:
            run_training(config(3, 2), resume=False)
            outcome["error"] = None
        except Exception as err:  # noqa: BLE001 - reported to the test, which expects the run to fail
            outcome["error"] = f"{type(err).__name__}: {err}"[:300]

    thread = threading.Thread(target=first_run)
    thread.start()
    # Where the workers run is read as soon as all three are up (the state API can take seconds under
    # load); the node goes as soon as the step-10 checkpoint is complete, with 50 steps still to run.
    nodes: list = []
    deadline = time.monotonic() + 300
    while thread.is_alive() and time.monotonic() < deadline:
        if not nodes:
            alive = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
            nodes = sorted({a.node_id for a in alive}) if len(alive) == 3 else []
        found = latest_complete_checkpoint(run) if run.exists() else None
        if nodes and found is not None and found[1]["step"] >= 10:
            break
        time.sleep(0.2)
    cluster.remove_node(workers[-1], allow_graceful=False)  # the node is gone, not drained
    thread.join(timeout=300)
    lost_at = latest_complete_checkpoint(run)[1]["step"]

    summary = run_training(config(2, 3), resume=True)  # the same run on the two nodes left
    result = {
        "worker_nodes": nodes,
        "first_run_error": outcome.get("error", "still running"),
        "checkpoint_after_loss": lost_at,
        "summary": {k: summary[k] for k in ("final_step", "final_loss", "final_val_loss")},
        "records": read_metrics(run),
    }
    print("RESULT " + json.dumps(result), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
