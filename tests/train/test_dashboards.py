"""Grafana dashboards query only metrics that exist, and raylm's metrics really reach Prometheus.

A metric name in a dashboard is either raylm's own (EXPORTED_NAMES of orchestration/train/prometheus.py
and orchestration/deploy/serve_metrics.py) or a Ray built-in found in the installed Ray's source: in
Ray's own Grafana panel definitions (ray/dashboard/modules/metrics/dashboards/) or declared as a metric
name where Ray defines them (ray/data/_internal/stats.py for Ray Data,
ray/dashboard/modules/reporter/reporter_agent.py for nodes). Upgrading Ray and losing a metric fails
here instead of leaving an empty panel.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path

import pytest

from orchestration.deploy import serve_metrics
from orchestration.train.prometheus import EXPORTED_NAMES, GAUGES, TrainMetricsExporter

ROOT = Path(__file__).parents[2]
DASHBOARDS = sorted((ROOT / "dashboards").glob("*.json"))
METRIC = re.compile(r"\bray_[a-zA-Z0-9_]+\b")
RAYLM_NAMES = EXPORTED_NAMES | serve_metrics.EXPORTED_NAMES  # training's and serve's


def _exprs(dashboard: dict) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])] + [
        v["definition"] for v in dashboard["templating"]["list"] if v.get("definition")
    ]


def _ray_source() -> str:
    import ray

    pkg = Path(ray.__file__).parent
    files = [
        *sorted((pkg / "dashboard/modules/metrics/dashboards").glob("*.py")),
        pkg / "data/_internal/stats.py",
        pkg / "dashboard/modules/reporter/reporter_agent.py",
    ]
    return "\n".join(f.read_text() for f in files)


def _is_ray_builtin(name: str, source: str) -> bool:
    """Queried by Ray's own dashboards, or declared as ``"<name without ray_>"`` in Ray's source."""
    return re.search(rf"\b{name}\b", source) is not None or f'"{name[len("ray_") :]}"' in source


def test_the_four_dashboards_are_there():
    assert {p.name for p in DASHBOARDS} == {
        "raylm_training.json",
        "raylm_data_pipeline.json",
        "raylm_cluster.json",
        "raylm_serve.json",
    }


@pytest.mark.parametrize("path", DASHBOARDS, ids=[p.name for p in DASHBOARDS])
def test_dashboard_is_grafana_json_with_a_datasource_variable(path):
    d = json.loads(path.read_text())
    assert d["uid"].startswith("raylm-") and d["title"] and d["panels"]
    names = [v["name"] for v in d["templating"]["list"]]
    assert names[0] == "datasource"  # works with whatever the Prometheus data source is called
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    for p in d["panels"]:
        assert p["targets"] and all(t["expr"].strip() for t in p["targets"]), p["title"]
        assert p["datasource"]["uid"] == "${datasource}"
    for var in names[1:]:  # every template variable is used by some query
        assert any(f"${var}" in e for e in _exprs(d)), var


@pytest.mark.parametrize("path", DASHBOARDS, ids=[p.name for p in DASHBOARDS])
def test_every_queried_metric_is_exported_by_raylm_or_ray(path):
    source = _ray_source()
    queried = {m for e in _exprs(json.loads(path.read_text())) for m in METRIC.findall(e)}
    assert queried
    unknown = [
        m
        for m in sorted(queried)
        if not (m in RAYLM_NAMES if m.startswith("ray_raylm_") else _is_ray_builtin(m, source))
    ]
    assert not unknown, f"{path.name} queries metrics nobody exports: {unknown}"


def test_the_builtin_check_has_teeth():
    source = _ray_source()
    assert _is_ray_builtin("ray_node_cpu_utilization", source) and _is_ray_builtin("ray_data_output_bytes", source)
    assert not _is_ray_builtin("ray_node_cpu_utilisation", source)
    assert not _is_ray_builtin("ray_data_made_up_bytes", source)


def test_training_dashboard_shows_every_raylm_metric():
    exprs = " ".join(_exprs(json.loads((ROOT / "dashboards" / "raylm_training.json").read_text())))
    for name, _ in GAUGES.values():
        assert f"ray_{name}" in exprs, name
    assert "ray_raylm_tokens_total" in exprs and "ray_raylm_checkpoint_duration_s_bucket" in exprs


def test_serve_dashboard_shows_every_serve_metric():
    """Every metric raylm serve exports is on its dashboard (its scrape is checked in
    tests/deploy/test_serve.py::test_serve_metrics_reach_prometheus), and nothing of training's."""
    exprs = " ".join(_exprs(json.loads((ROOT / "dashboards" / "raylm_serve.json").read_text())))
    queried = set(METRIC.findall(exprs))
    base = {re.sub(r"_(bucket|sum|count)$", "", name) for name in serve_metrics.EXPORTED_NAMES}
    missing = sorted(b for b in base if not any(q.startswith(b) for q in queried))
    assert not missing, f"serve metrics no panel shows: {missing}"
    assert not queried & EXPORTED_NAMES  # training's names on the serve dashboard would be a slip
    assert "ray_serve_deployment_replica_healthy" in queried and "ray_serve_deployment_queued_queries" in queried


# --- the exporter, end to end through Ray's metrics agent ----------------------------------------


def _scrape(ray, want: set[str], timeout_s: float = 45.0) -> dict[str, list[str]]:
    """This node's metrics endpoint as {series name: lines} for run "prom-test", polled until every
    name in ``want`` shows up (a worker's records reach it every metrics_report_interval_ms, Ray's
    setting: 10 s by default) or the timeout passes."""
    node = next(n for n in ray.nodes() if n["Alive"])
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    deadline = time.monotonic() + timeout_s
    while True:
        body = urllib.request.urlopen(url, timeout=10).read().decode()
        series: dict[str, list[str]] = {}
        for line in body.splitlines():
            if 'run="prom-test"' in line:
                series.setdefault(line.split("{", 1)[0], []).append(line)
        if want <= series.keys() or time.monotonic() > deadline:
            return series
        time.sleep(0.25)


def test_worker_records_reach_prometheus_with_run_and_rank_tags(ray_session):
    ray = ray_session

    @ray.remote(num_cpus=0)
    class Worker:  # stands in for a Ray Train worker: metrics are recorded in a Ray worker process
        def __init__(self):
            self.exporter = TrainMetricsExporter("prom-test", rank=1)

        def log_steps(self):
            self.exporter.record(
                {
                    "step": 10,
                    "loss": 4.25,
                    "tokens": 1000,
                    "tokens_per_s": 512.0,
                    "step_time_s": 0.5,
                    "data_wait_s": 0.01,
                    "mfu": None,
                    "lr": 1e-3,
                }
            )
            self.exporter.record(
                {
                    "step": 20,
                    "loss": 3.5,
                    "val_loss": 3.75,
                    "tokens": 3000,
                    "mfu": 0.41,
                    "checkpoint_duration_s": 2.5,
                    "gpu_memory_bytes": 123456,
                }
            )

    worker = Worker.remote()
    ray.get(worker.log_steps.remote())
    want = {
        "ray_raylm_loss",
        "ray_raylm_val_loss",
        "ray_raylm_tokens_total",
        "ray_raylm_mfu",
        "ray_raylm_checkpoint_duration_s_count",
        "ray_raylm_gpu_memory_bytes",
        "ray_raylm_tokens_per_s",
    }
    series = _scrape(ray, want)
    ray.kill(worker)
    assert want <= series.keys(), f"missing {want - series.keys()}; got {sorted(series)}"
    assert set(series) <= EXPORTED_NAMES  # the declared names the dashboard check relies on
    loss = series["ray_raylm_loss"][0]
    assert 'worker="1"' in loss and loss.endswith(" 3.5")  # the latest value, tagged with the rank
    assert series["ray_raylm_tokens_total"][0].endswith(" 3000.0")  # counter = cumulative tokens
    buckets = {
        re.search(r'le="([^"]+)"', ln).group(1): float(ln.rsplit(" ", 1)[1])
        for ln in series["ray_raylm_checkpoint_duration_s_bucket"]
    }
    assert buckets["2.0"] == 0 and buckets["5.0"] == 1  # one 2.5 s save (Ray's _sum is bucket-midpoint approximate)
    assert series["ray_raylm_checkpoint_duration_s_count"][0].endswith(" 1.0")
    assert "ray_raylm_lr" not in series  # keys without a metric are ignored
