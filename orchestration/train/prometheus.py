"""Training metrics exported to Prometheus through Ray's metrics agent (``ray.util.metrics``).

Every Ray node runs a metrics agent that Prometheus scrapes; metrics declared here reach it from
whichever Ray worker records them, with no extra server or port. Ray prefixes every application
metric with ``ray_`` (its Prometheus namespace), so ``raylm_loss`` is queried as ``ray_raylm_loss``;
Ray's own built-ins (``ray_node_*``, ``ray_data_*``) live beside them. The dashboards in
``dashboards/`` query exactly the names in ``EXPORTED_NAMES``.

Tags: ``run`` (train.run_name) and ``worker`` (the Ray Train world rank), so one Grafana variable
selects a run and per-rank series (data wait, GPU memory) stay apart.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

PREFIX = "raylm_"
RAY_NAMESPACE = "ray_"  # what Ray's Prometheus exporter puts in front of every metric name
TAG_KEYS = ("run", "worker")

# record key -> (metric name, description). Values are the ones the worker loop already computes
# for metrics.jsonl: loss / val_loss / tokens_per_s / mfu are run-wide (the same on every rank),
# step_time_s / data_wait_s / gpu_memory_bytes are per rank.
GAUGES: dict[str, tuple[str, str]] = {
    "tokens_per_s": ("raylm_tokens_per_s", "Training throughput of the whole run, tokens per second"),
    "loss": ("raylm_loss", "Training loss, mean across ranks, at the last log step"),
    "val_loss": ("raylm_val_loss", "Validation loss at the last evaluation"),
    "mfu": ("raylm_mfu", "Model FLOPs utilization (0-1) across all devices; absent on CPU"),
    "step_time_s": ("raylm_step_time_s", "Mean seconds per optimizer step over the last log window"),
    "data_wait_s": ("raylm_data_wait_s", "Mean seconds per step this rank waited for its next batch"),
    "gpu_memory_bytes": ("raylm_gpu_memory_bytes", "Peak CUDA memory allocated by this rank, bytes"),
}
# Cumulative training tokens (the record's ``tokens``); a counter so rate() gives tokens/s over any window.
TOKENS_COUNTER = ("raylm_tokens", "Tokens trained on so far (Prometheus adds the _total suffix)")
CHECKPOINT_HISTOGRAM = ("raylm_checkpoint_duration_s", "Seconds a rank spent saving one checkpoint")
CHECKPOINT_BOUNDARIES_S = [0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600]

# Every series name as Prometheus stores it (what PromQL in dashboards/ may query).
EXPORTED_NAMES: frozenset[str] = frozenset(
    [RAY_NAMESPACE + name for name, _ in GAUGES.values()]
    + [RAY_NAMESPACE + TOKENS_COUNTER[0] + "_total"]
    + [RAY_NAMESPACE + CHECKPOINT_HISTOGRAM[0] + s for s in ("_bucket", "_sum", "_count")]
)


class TrainMetricsExporter:
    """Sets raylm's Prometheus metrics from a worker loop's metrics record.

    Create one per Ray Train worker (``TrainMetricsExporter(run_name, rank)``) after Ray is up and
    call ``record(record)`` at each log step with the same dict written to metrics.jsonl. Keys it
    does not know are ignored and ``None`` values (MFU on CPU) are skipped, so the full record can be
    passed as is. ``gpu_memory_bytes`` is filled in from the record's ``peak_memory_bytes`` (this
    rank's, ``orchestration.train.memory``) when CUDA is in use and the record lacks it.
    ``checkpoint_duration_s`` in a record (or ``record_checkpoint(seconds)``) observes one checkpoint
    save.
    """

    def __init__(self, run_name: str, rank: int):
        from ray.util.metrics import Counter, Gauge, Histogram

        self.tags = {"run": str(run_name), "worker": str(rank)}
        self._gauges = {key: Gauge(name, description=desc, tag_keys=TAG_KEYS) for key, (name, desc) in GAUGES.items()}
        self._tokens = Counter(TOKENS_COUNTER[0], description=TOKENS_COUNTER[1], tag_keys=TAG_KEYS)
        self._checkpoint = Histogram(
            CHECKPOINT_HISTOGRAM[0],
            description=CHECKPOINT_HISTOGRAM[1],
            boundaries=CHECKPOINT_BOUNDARIES_S,
            tag_keys=TAG_KEYS,
        )
        self._last_tokens: Optional[int] = None  # a resumed run starts its counter at the checkpoint's tokens

    def record(self, metrics: Mapping[str, Any]) -> None:
        """Export the known keys of one metrics record (see the class docstring)."""
        values = dict(metrics)
        if "gpu_memory_bytes" not in values and _cuda_in_use():
            values["gpu_memory_bytes"] = values.get("peak_memory_bytes")
        for key, gauge in self._gauges.items():
            if values.get(key) is not None:
                gauge.set(float(values[key]), tags=self.tags)
        tokens = values.get("tokens")
        if tokens is not None:
            # Counters only go up: count the tokens since the previous record, or all of them at
            # the first record after a (re)start so the counter reflects the run's position.
            delta = tokens - (self._last_tokens or 0)
            if delta > 0:
                self._tokens.inc(float(delta), tags=self.tags)
            self._last_tokens = tokens
        if values.get("checkpoint_duration_s") is not None:
            self.record_checkpoint(values["checkpoint_duration_s"])

    def record_checkpoint(self, seconds: float) -> None:
        """Observe one checkpoint save that took ``seconds``."""
        self._checkpoint.observe(float(seconds), tags=self.tags)


def _cuda_in_use() -> bool:
    """Whether this process has initialised CUDA (the peak in its records is then the GPU's)."""
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available() and torch.cuda.is_initialized()
