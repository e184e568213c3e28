"""`raylm serve`'s metrics exported to Prometheus through Ray Serve's metrics (``ray.serve.metrics``).

As for training (``orchestration/train/prometheus.py``): every Ray node's metrics agent is scraped by
Prometheus, metrics recorded in a replica reach it with no server or port of their own, and Ray puts
``ray_`` in front of each name (``raylm_serve_requests`` is queried as ``ray_raylm_serve_requests_total``).
Serve adds its own tags to each series: ``deployment``, ``replica`` and ``application``, so
per-replica gauges sum across replicas. ``dashboards/raylm_serve.json`` queries exactly
``EXPORTED_NAMES`` (and a few of Serve's built-ins: replicas, requests queued before a replica).

Tags of ours: ``stream`` ("true" | "false") on requests and timings; ``status`` (the HTTP code) on
the request counter, ``CLIENT_GONE`` (499, nginx's "client closed request") for a request whose
client went away before its answer ended (its latency is not observed: it was never answered).
"""

from __future__ import annotations

RAY_NAMESPACE = "ray_"  # what Ray's Prometheus exporter puts in front of every metric name

REQUESTS = ("raylm_serve_requests", "/generate requests answered, by HTTP status and stream (Prometheus adds _total)")
GENERATED_TOKENS = ("raylm_serve_generated_tokens", "Tokens generated and sent (rate() gives tokens/s)")
TIME_TO_FIRST_TOKEN = (
    "raylm_serve_time_to_first_token_s",
    "Seconds from a /generate request reaching its replica to its first generated token",
)
REQUEST_LATENCY = (
    "raylm_serve_request_latency_s",
    "Seconds from a /generate request reaching its replica to the end of its answer",
)
BATCH_SIZE = ("raylm_serve_batch_size", "Requests per serve batch (decoded together)")
ONGOING = ("raylm_serve_ongoing_requests", "/generate requests admitted by this replica and not yet answered")
QUEUED = (
    "raylm_serve_queued_requests",
    "/generate requests admitted by this replica, waiting for their first token (a batch, then its prefill)",
)

CLIENT_GONE = 499
# From a GPU's few-ms first token to a CPU's 512-token answer of minutes (past the last bucket,
# histogram_quantile could only say "more than" it)
SECONDS_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64]

# Every series name as Prometheus stores it (what PromQL in dashboards/ may query).
EXPORTED_NAMES: frozenset[str] = frozenset(
    [RAY_NAMESPACE + name + "_total" for name, _ in (REQUESTS, GENERATED_TOKENS)]
    + [RAY_NAMESPACE + name for name, _ in (ONGOING, QUEUED)]
    + [
        RAY_NAMESPACE + name + suffix
        for name, _ in (TIME_TO_FIRST_TOKEN, REQUEST_LATENCY, BATCH_SIZE)
        for suffix in ("_bucket", "_sum", "_count")
    ]
)


class ServeMetrics:
    """The metrics of one replica. Create it in the replica (Serve then tags its series with the
    deployment, replica and application); works, untagged, outside Serve too."""

    def __init__(self):
        from ray.serve.metrics import Counter, Gauge, Histogram

        self._requests = Counter(REQUESTS[0], description=REQUESTS[1], tag_keys=("stream", "status"))
        self._tokens = Counter(GENERATED_TOKENS[0], description=GENERATED_TOKENS[1], tag_keys=("stream",))
        self._ttft = Histogram(
            TIME_TO_FIRST_TOKEN[0],
            description=TIME_TO_FIRST_TOKEN[1],
            boundaries=SECONDS_BOUNDARIES,
            tag_keys=("stream",),
        )
        self._latency = Histogram(
            REQUEST_LATENCY[0], description=REQUEST_LATENCY[1], boundaries=SECONDS_BOUNDARIES, tag_keys=("stream",)
        )
        self._batch_size = Histogram(BATCH_SIZE[0], description=BATCH_SIZE[1], boundaries=BATCH_BOUNDARIES)
        self._ongoing = Gauge(ONGOING[0], description=ONGOING[1])
        self._queued = Gauge(QUEUED[0], description=QUEUED[1])
        self.ongoing = 0
        self.queued = 0

    def refused(self, status: int, stream: bool) -> None:
        """A /generate request refused before it was admitted (a 4xx)."""
        self._requests.inc(1, tags={"stream": _flag(stream), "status": str(status)})

    def admitted(self) -> None:
        """A valid request waits for a batch."""
        self.ongoing += 1
        self.queued += 1
        self._set_gauges()

    def batched(self, n: int) -> None:
        """A serve batch of n requests starts decoding."""
        self._batch_size.observe(n)

    def first_token(self, seconds: float, stream: bool) -> None:
        """An admitted request got its first step, ``seconds`` after it reached the replica."""
        self.queued -= 1
        self._ttft.observe(seconds, tags={"stream": _flag(stream)})
        self._set_gauges()

    def finished(self, status: int, seconds: float, tokens: int, stream: bool, *, queued: bool) -> None:
        """An admitted request ended with ``status`` after ``seconds`` and ``tokens`` generated;
        ``queued``: before its first token."""
        self._requests.inc(1, tags={"stream": _flag(stream), "status": str(status)})
        self.ongoing -= 1
        self.queued -= queued
        if status != CLIENT_GONE:
            self._latency.observe(seconds, tags={"stream": _flag(stream)})
        if tokens:
            self._tokens.inc(tokens, tags={"stream": _flag(stream)})
        self._set_gauges()

    def _set_gauges(self) -> None:
        self._ongoing.set(self.ongoing)
        self._queued.set(self.queued)


def _flag(stream: bool) -> str:
    return "true" if stream else "false"
