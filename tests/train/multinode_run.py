"""A simulated multi-node Ray cluster losing a node mid-run; run by test_multinode.py in its own process.

Starts ``ray.cluster_utils.Cluster`` (a head with no CPUs and 1-CPU worker nodes, each its own
raylet) and trains a tiny GPT with data and storage on the S3 server at ``--endpoint``, one worker
per node. Scenarios:

- ``lost-node``: 3 workers on 3 nodes; one node is removed once the step-10 checkpoint is complete;
  then the same run is run again on the 2 nodes left with 2 workers (same global batch).
- ``elastic``: 2 nodes, ``train.min_workers=1``; one node is removed once the step-20 checkpoint is
  complete, and added back once the run has logged a step on the one worker left.

Prints one JSON line: what happened (nodes, errors, checkpoints) and the run's summary and metrics.

    python tests/train/multinode_run.py --scenario lost-node --manifest s3://b/data/manifest.json \
        --storage s3://b/runs --endpoint URL
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenario", choices=["lost-node", "elastic"], required=True)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--storage", required=True)
    ap.add_argument("--endpoint", required=True)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/helpers.py
    from helpers import free_ports

    # Ray Train's placement-group cleaner finds its cluster through RAY_ADDRESS: with the test
    # session's own Ray on this machine too, "auto" would be ambiguous. Set before any raylet starts.
    gcs_port, dashboard_port = free_ports(2)
    os.environ["RAY_ADDRESS"] = f"127.0.0.1:{gcs_port}"

    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "gcs_server_port": gcs_port,
            "dashboard_port": dashboard_port,
            "include_dashboard": True,
        },
    )
    nodes = [cluster.add_node(num_cpus=1) for _ in range(3 if args.scenario == "lost-node" else 2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    result = (lost_node if args.scenario == "lost-node" else elastic)(args, cluster, nodes)
    print("RESULT " + json.dumps(result), flush=True)
    ray.shutdown()
    cluster.shutdown()


def config(args, run_name: str, overrides: list[str]):
    from helpers import tiny_config

    base = [f"train.endpoint_url={args.endpoint}", "train.cpus_per_worker=1"]  # one worker per 1-CPU node
    return tiny_config(args.manifest, args.storage, run_name, zero_stage=1, overrides=base + overrides)


def in_background(fn) -> tuple[threading.Thread, dict]:
    """``fn()`` on a thread; the dict gets its "error" (None when it returned) or stays empty while it runs."""
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["summary"] = fn()
            outcome["error"] = None
        except Exception as err:  # noqa: BLE001 - reported to the test
            outcome["error"] = f"{type(err).__name__}: {err}"[:300]

    thread = threading.Thread(target=target)
    thread.start()
    return thread, outcome


def wait_for(condition, thread: threading.Thread, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while thread.is_alive() and time.monotonic() < deadline and not condition():
        time.sleep(0.2)


def checkpoint_at_least(run, step: int) -> bool:
    from orchestration.artifacts import latest_complete_checkpoint

    found = latest_complete_checkpoint(run) if run.exists() else None
    return found is not None and found[1]["step"] >= step


def lost_node(args, cluster, nodes) -> dict:
    from ray.util.state import list_actors

    from orchestration.artifacts import RunDir, latest_complete_checkpoint, read_metrics
    from orchestration.train.driver import run_training

    def cfg(num_workers: int, accum: int):  # global batch 24 either way
        overrides = [f"train.num_workers={num_workers}", f"train.grad_accum_steps={accum}", "train.max_steps=60"]
        return config(args, "multinode", overrides + ["train.eval_interval=10", "train.max_failures=0"])

    run = RunDir.at(f"{args.storage}/multinode", args.endpoint)
    thread, outcome = in_background(lambda: run_training(cfg(3, 2), resume=False))
    # Where the workers run is read as soon as all three are up (the state API can take seconds under
    # load); the node goes as soon as the step-10 checkpoint is complete, with 50 steps still to run.
    placed: list = []

    def placed_and_checkpointed() -> bool:
        if not placed:
            alive = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
            placed.extend(sorted({a.node_id for a in alive}) if len(alive) == 3 else [])
        return bool(placed) and checkpoint_at_least(run, 10)

    wait_for(placed_and_checkpointed, thread)
    cluster.remove_node(nodes[-1], allow_graceful=False)  # the node is gone, not drained
    thread.join(timeout=300)
    lost_at = latest_complete_checkpoint(run)[1]["step"]
    summary = run_training(cfg(2, 3), resume=True)  # the same run on the two nodes left
    return {
        "worker_nodes": placed,
        "first_run_error": outcome.get("error", "still running"),
        "checkpoint_after_loss": lost_at,
        "summary": {k: summary[k] for k in ("final_step", "final_loss", "final_val_loss")},
        "records": read_metrics(run),
    }


def elastic(args, cluster, nodes) -> dict:
    from orchestration.artifacts import RunDir, read_metrics
    from orchestration.train.driver import run_training

    overrides = [
        "train.num_workers=2",
        "train.min_workers=1",  # global batch 16: 2 workers x 4 x 2, or 1 worker x 4 x 4
        # long enough on one worker for Ray Train to see the node come back: its autoscaling
        # coordinator re-reads the cluster's resources every 20 s (seen here: 280-360 steps later)
        "train.max_steps=1200",
        "train.log_interval=20",
        "train.checkpoint_interval=20",
        "train.eval_interval=400",
        "train.max_failures=3",
        "train.resize_check_interval_s=2",
    ]
    run = RunDir.at(f"{args.storage}/elastic", args.endpoint)
    thread, outcome = in_background(lambda: run_training(config(args, "elastic", overrides), resume=False))
    wait_for(lambda: checkpoint_at_least(run, 20), thread)
    cluster.remove_node(nodes[-1], allow_graceful=False)

    def on_one_worker() -> bool:
        return any(len(r["data_read_rows_per_rank"]) == 1 for r in (read_metrics(run) if run.exists() else []))

    wait_for(on_one_worker, thread)
    cluster.add_node(num_cpus=1)
    thread.join(timeout=400)
    summary = outcome.get("summary") or {}
    return {
        "error": outcome.get("error", "still running"),
        "summary": {k: summary.get(k) for k in ("final_step", "final_loss", "final_val_loss")},
        "records": read_metrics(run),
    }


if __name__ == "__main__":
    main()
