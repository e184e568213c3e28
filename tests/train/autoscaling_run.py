"""An autoscaling Ray cluster that starts with no worker node; run by test_multinode.py in its own process.

Starts a head with no CPUs and an autoscaler whose one worker node type (1 CPU each, up to 2 nodes)
starts at zero nodes: Ray's fake multi-node provider, which launches each node as a raylet on this
machine, as ``ray.cluster_utils.AutoscalingCluster`` does (that helper runs ``ray stop --force``,
which would take the test session's own Ray down too, so the head is started here with its own ports
and temp dir and only its own processes are stopped). Then ``run_training`` asks for 2 workers x 1
CPU. Prints one JSON line: worker nodes before and after, and the run's summary.

    python tests/train/autoscaling_run.py --manifest runs/data/x/manifest.json --storage /tmp/runs
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKER_TYPE = "cpu_worker"


def autoscaling_config(gcs_address: str) -> dict:
    """The cluster file: a CPU-less head and one worker type that starts at zero nodes."""
    return {
        "cluster_name": "raylm-autoscaling-test",
        "max_workers": 2,
        "provider": {
            "type": "fake_multinode",
            "gcs_address": gcs_address,
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            WORKER_TYPE: {"resources": {"CPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2},
        },
        "head_node_type": "ray.head.default",
        "auth": {},
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,
        "docker": {},
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }


def worker_nodes() -> list[str]:
    import ray

    return [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]


def stop_cluster(head: subprocess.Popen, temp_dir: str, gcs_address: str) -> None:
    """The head (SIGTERM: `ray start --block` stops its processes), then whatever of this cluster is
    left: the fake nodes' processes name the temp dir or the GCS address on their command line."""
    head.send_signal(signal.SIGTERM)
    try:
        head.wait(timeout=20)
    except subprocess.TimeoutExpired:
        head.kill()
    time.sleep(1)
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if temp_dir.encode() in cmdline or gcs_address.encode() in cmdline:
            try:
                os.kill(int(proc.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--storage", required=True)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/helpers.py
    from helpers import free_ports, tiny_config

    gcs, dash, client, agent_http, agent_grpc, metrics, renv, node_mgr, obj_mgr = free_ports(9)
    gcs_address = f"127.0.0.1:{gcs}"
    temp_dir = tempfile.mkdtemp(prefix="rlas_", dir="/tmp")  # short: Ray's socket paths are length-limited
    config_file = Path(temp_dir) / "autoscaling.json"
    config_file.write_text(json.dumps(autoscaling_config(gcs_address)))
    # the head, its fake nodes and this driver share one auth token (Ray authenticates every RPC)
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    # RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0: on SIGTERM the head tears down at once instead of first
    # draining for up to 30 s (Ray 2.60's default; it waited 20 s here, every run, with nothing to drain)
    env.update(
        RAY_FAKE_CLUSTER="1",
        AUTOSCALER_UPDATE_INTERVAL_S="1",
        RAY_USAGE_STATS_ENABLED="0",
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
    )
    ray_bin = str(Path(sys.executable).parent / "ray")
    head = subprocess.Popen(
        [
            ray_bin, "start", "--head", "--block", "--disable-usage-stats",
            f"--autoscaling-config={config_file}", "--num-cpus=0", "--num-gpus=0",
            f"--temp-dir={temp_dir}", "--node-ip-address=127.0.0.1", f"--port={gcs}",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
            f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={renv}",
            f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
        ],
        env=env,
        stdout=open(Path(temp_dir) / "ray_start.log", "wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        # Ray Train's placement-group cleaner finds its cluster through RAY_ADDRESS
        os.environ["RAY_ADDRESS"] = gcs_address
        import ray

        from orchestration.train.driver import run_training

        deadline = time.monotonic() + 90
        while True:
            try:
                ray.init(address=gcs_address, log_to_driver=False)
                break
            except Exception:
                if head.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(1)
        before = worker_nodes()
        overrides = [
            "train.cpus_per_worker=1",
            "train.max_steps=10",
            "train.checkpoint_interval=10",
            "train.eval_interval=10",
            "train.scale_up_timeout_s=300",
        ]
        cfg = tiny_config(args.manifest, args.storage, "autoscaled", zero_stage=1, overrides=overrides)
        summary = run_training(cfg, resume=False)
        result = {
            "worker_nodes_before": len(before),
            "worker_nodes_after": len(worker_nodes()),
            "summary": {k: v for k, v in summary.items() if k != "records"},
        }
        print("RESULT " + json.dumps(result), flush=True)
    finally:
        import ray

        ray.shutdown()
        stop_cluster(head, temp_dir, gcs_address)


if __name__ == "__main__":
    main()
