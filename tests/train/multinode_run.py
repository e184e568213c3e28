"""A simulated multi-node Ray cluster losing nodes mid-run; run by test_multinode.py in its own process.

Starts a moto S3 server of its own on 127.0.0.1 (the test session's server has outages of its own
while this runs beside the session's tests) with the tiny corpus on it, and one
``ray.cluster_utils.Cluster`` (a head with no CPUs and three 1-CPU worker nodes, each its own raylet,
all under ``--ray-tmpdir``, so that a Ray the session's commands start or join never finds it), and
trains a tiny GPT with data and storage on that server, one worker per node, through two scenarios in
turn on the same cluster (one cluster start, one process):

1. lost node: 3 workers on the 3 nodes; one node is removed once the step-10 checkpoint is complete,
   the run fails (no retries), and the same run is run again on the 2 nodes left with 2 workers.
2. elastic, on those 2 nodes: ``train.min_workers=1``; one node is removed once Ray Train has
   registered the first checkpoint, the run goes on with 1 worker; once that worker has a checkpoint
   of its own registered, a node is added back and the run grows to 2 workers again by itself; once
   a step is logged on 2 workers, a stop request (``raylm stop``) ends it after a checkpoint.

Prints one JSON line: per scenario what happened (nodes, errors, checkpoints) and the run's summary
and metrics, and a timeline (seconds since start) of the events, to show where the time goes.

    python tests/train/multinode_run.py --root DIR --ray-tmpdir /tmp/SHORT
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

# Ray Train waits this long for a worker group's placement group before it retries (default 60 s).
# After a node loss the elastic run's first retries ask for 2 workers again (Ray Train's view of the
# cluster lags by up to 20 s, see ELASTIC_STEPS), which can never be placed: each wait is a stall.
WORKER_GROUP_START_TIMEOUT_S = "5"
BUCKET = "raylm-multinode"


class Timeline:
    """Events as (what, seconds since the script started), for the test's output."""

    def __init__(self) -> None:
        self.t0, self.events = time.monotonic(), []

    def mark(self, what: str) -> None:
        self.events.append((what, round(time.monotonic() - self.t0, 1)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True, help="a directory for the corpus")
    ap.add_argument("--ray-tmpdir", required=True, help="Ray's temp dir: short (socket paths are length-limited)")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/helpers.py
    from helpers import RestartableS3, free_ports, tiny_corpus_on_s3

    timeline = Timeline()
    os.environ["RAY_TMPDIR"] = args.ray_tmpdir
    s3 = RestartableS3()
    args.endpoint, args.storage = s3.endpoint_url, f"s3://{BUCKET}/runs"
    args.manifest = tiny_corpus_on_s3(Path(args.root), s3.endpoint_url, BUCKET)
    # Ray Train's placement-group cleaner finds its cluster through RAY_ADDRESS: with the test
    # session's own Ray on this machine too, "auto" would be ambiguous. Set before any raylet starts.
    gcs_port, dashboard_port = free_ports(2)
    os.environ["RAY_ADDRESS"] = f"127.0.0.1:{gcs_port}"
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = WORKER_GROUP_START_TIMEOUT_S

    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "gcs_server_port": gcs_port,
            "dashboard_port": dashboard_port,
            "include_dashboard": True,
            # A removed node is declared dead after 3 failed 1-s health checks instead of Ray's 5 x 3 s
            # (measured here: 7 s instead of 16 s); each check still waits 10 s for a busy raylet.
            "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3},
        },
    )
    nodes = [cluster.add_node(num_cpus=1) for _ in range(3)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    timeline.mark("cluster up")
    result = {"lost_node": lost_node(args, cluster, nodes, timeline)}
    left = [node for node in nodes if node in cluster.worker_nodes]  # the 2 nodes the first scenario left
    result["elastic"] = elastic(args, cluster, left, timeline)
    result["timeline"] = timeline.events
    print("RESULT " + json.dumps(result), flush=True)
    ray.shutdown()
    cluster.shutdown()
    s3.stop()


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


def wait_for(condition, thread: threading.Thread, timeout_s: float = 300, poll_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while thread.is_alive() and time.monotonic() < deadline and not condition():
        time.sleep(poll_s)


def read_settled(read):
    """``read()`` of a file the run rewrites while we poll it; a read that overlapped a rewrite (S3 reads
    take the size first, then the bytes) fails to parse and is tried again a moment later."""
    for _ in range(20):
        try:
            return read()
        except (ValueError, OSError):  # a torn read: unparsable, or shorter than the size it was given
            time.sleep(0.1)
    return read()


def registered_checkpoint_step(run) -> int:
    """The step of the newest checkpoint Ray Train has registered (listed in its snapshot): the one a
    restarted worker group resumes from. A checkpoint complete on storage is registered a moment later,
    and not at all if a rank dies first. -1 when there is none."""
    from orchestration.checkpoint_format import read_checkpoint_meta
    from orchestration.train.driver import RAY_SNAPSHOT_FILE

    if not run.exists() or not run.has(RAY_SNAPSHOT_FILE):
        return -1
    snapshot = read_settled(lambda: run.read_json(RAY_SNAPSHOT_FILE))
    listed = [r["checkpoint_dir_name"] for r in snapshot.get("checkpoint_results", [])]

    def meta(name: str):  # None when Ray has deleted it since (num_to_keep)
        try:
            return read_checkpoint_meta(run.child(name))
        except FileNotFoundError:
            return None

    return max((m["step"] for m in map(meta, listed) if m is not None), default=-1)


def newest_checkpoint_step(run) -> int:
    """The step of the run's newest complete checkpoint on storage; -1 when there is none."""
    from orchestration.checkpoint_format import latest_complete_checkpoint

    found = latest_complete_checkpoint(run) if run.exists() else None
    return -1 if found is None else found[1]["step"]


def lost_node(args, cluster, nodes, timeline: Timeline) -> dict:
    from ray.util.state import list_actors

    from orchestration.artifacts import METRICS_FILE, RunDir, read_metrics
    from orchestration.checkpoint_format import latest_complete_checkpoint
    from orchestration.train.driver import run_training

    def cfg(num_workers: int, accum: int):  # global batch 24 either way: 3 x 4 x 2 = 2 x 4 x 3
        overrides = [f"train.num_workers={num_workers}", f"train.grad_accum_steps={accum}", "train.max_steps=60"]
        return config(args, "multinode", overrides + ["train.eval_interval=10", "train.max_failures=0"])

    run = RunDir.at(f"{args.storage}/multinode", args.endpoint)
    thread, outcome = in_background(lambda: run_training(cfg(3, 2), resume=False))
    # Where the workers run is read as soon as all three are up (the state API can take seconds under
    # load); the node goes as soon as the step-10 checkpoint is complete, with 50 steps still to run.
    placed: list = []
    logged: list = []

    def placed_and_checkpointed() -> bool:
        if not placed:
            alive = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
            placed.extend(sorted({a.node_id for a in alive}) if len(alive) == 3 else [])
            if placed:
                timeline.mark("lost node: 3 workers alive")
        if placed and not logged and run.exists() and run.has(METRICS_FILE):
            logged.append(True)
            timeline.mark("lost node: first step logged")
        return bool(placed) and newest_checkpoint_step(run) >= 10

    wait_for(placed_and_checkpointed, thread)
    timeline.mark("lost node: step-10 checkpoint")
    cluster.remove_node(nodes[-1], allow_graceful=False)  # the node is gone, not drained
    timeline.mark("lost node: node removed")
    thread.join(timeout=300)
    timeline.mark("lost node: first run ended")
    lost_at = latest_complete_checkpoint(run)[1]["step"]
    summary = run_training(cfg(2, 3), resume=True)  # the same run on the two nodes left
    timeline.mark("lost node: re-run on 2 nodes done")
    return {
        "worker_nodes": placed,
        "first_run_error": outcome.get("error", "still running"),
        "checkpoint_after_loss": lost_at,
        "summary": {k: summary[k] for k in ("final_step", "final_loss", "final_val_loss")},
        "records": read_metrics(run),
    }


# The elastic run's length. Ray Train sees nodes come and go only through Ray Data's autoscaling
# coordinator actor, which re-reads the cluster's nodes every 20 s (`_AutoscalingCoordinatorActor.
# TICK_INTERVAL_S`, a class constant: no setting shortens it). The node comes back once the one worker
# has a checkpoint registered, and is seen at worst ~28 s later (adding it ~2 s, the tick 20 s, the
# resize check 1-3 s, stopping the worker ~2 s): the run must still be going on its one worker then.
# One worker ran this config at 43 steps/s on a quiet 2-core machine (0.020 s a step, 0.023 s with
# logging and checkpoints): 28 s is ~1,300 steps at 45/s; with the <= 200 before it, 1,800 leave room.
# Once it has grown, the run is stopped on request (`raylm stop`) instead of training to the end.
ELASTIC_STEPS = 1800
ELASTIC_LOG_INTERVAL, ELASTIC_CHECKPOINT_INTERVAL = 25, 50  # every checkpoint step is a logged step


def elastic(args, cluster, nodes, timeline: Timeline) -> dict:
    from orchestration.artifacts import RunDir, read_metrics, request_stop
    from orchestration.checkpoint_format import MODEL_FILE
    from orchestration.train.driver import run_training

    overrides = [
        "train.num_workers=2",
        "train.min_workers=1",  # global batch 24: 2 workers x 4 x 3, or 1 worker x 4 x 6
        f"train.max_steps={ELASTIC_STEPS}",
        f"train.log_interval={ELASTIC_LOG_INTERVAL}",
        f"train.checkpoint_interval={ELASTIC_CHECKPOINT_INTERVAL}",
        "train.eval_interval=0",  # only at the end: evaluation is not what this run is about
        "train.max_failures=3",
        "train.resize_check_interval_s=1",
    ]
    run = RunDir.at(f"{args.storage}/elastic", args.endpoint)

    def steps_on(workers: int) -> list[int]:
        """The logged steps trained on ``workers`` workers so far."""
        records = read_settled(lambda: read_metrics(run)) if run.exists() else []
        return [r["step"] for r in records if len(r["data_read_rows_per_rank"]) == workers]

    timeline.mark("elastic: start")
    thread, outcome = in_background(lambda: run_training(config(args, "elastic", overrides), resume=False))
    wait_for(lambda: registered_checkpoint_step(run) >= 0, thread, poll_s=0.5)
    removed_after = registered_checkpoint_step(run)
    timeline.mark(f"elastic: step-{removed_after} checkpoint registered")
    cluster.remove_node(nodes[-1], allow_graceful=False)
    timeline.mark("elastic: node removed")
    wait_for(lambda: bool(steps_on(1)), thread, poll_s=0.5)
    first_on_one = min(steps_on(1), default=0)
    timeline.mark(f"elastic: step {first_on_one} logged on 1 worker")
    # The node comes back once the one worker has a checkpoint registered: growing restarts from it,
    # so the steps logged on one worker are kept only up to it.
    wait_for(lambda: registered_checkpoint_step(run) >= first_on_one, thread, poll_s=0.2)
    added_after = registered_checkpoint_step(run)
    timeline.mark(f"elastic: step-{added_after} checkpoint registered on 1 worker")
    cluster.add_node(num_cpus=1)
    timeline.mark("elastic: node added")
    wait_for(lambda: any(s > added_after for s in steps_on(2)), thread, timeout_s=400, poll_s=1)
    timeline.mark(f"elastic: step {min((s for s in steps_on(2) if s > added_after), default=None)} logged on 2 workers")
    # Grown: the rest of ELASTIC_STEPS would prove nothing more. `raylm stop`'s request ends the run at
    # its next log interval, after a checkpoint, as a user would stop it.
    if thread.is_alive():
        request_stop(run)
        timeline.mark("elastic: stop requested")
    thread.join(timeout=400)
    timeline.mark("elastic: done")
    summary = outcome.get("summary") or {}
    return {
        "error": outcome.get("error", "still running"),
        "checkpoint_at_removal": removed_after,
        "checkpoint_at_node_added": added_after,
        "max_steps": ELASTIC_STEPS,
        "log_interval": ELASTIC_LOG_INTERVAL,
        "summary": {k: summary.get(k) for k in ("final_step", "final_loss", "final_val_loss", "checkpoint")},
        "stopped_on_request": summary.get("stopped_on_request", False),
        "checkpoint_consolidated": bool(summary.get("checkpoint"))
        and RunDir.at(summary["checkpoint"], args.endpoint).has(MODEL_FILE),
        "records": read_metrics(run),
    }


if __name__ == "__main__":
    main()
