"""`raylm serve` throughput: batched generation vs one request at a time, same checkpoint, same run.

Starts Ray Serve on 127.0.0.1, deploys the checkpoint with max_batch_size=1 (the baseline) and then
with ``--max-batch-size``, and drives each with the same closed-loop load: ``--clients`` threads, each
sending ``--requests-per-client`` sampled requests of ``--max-tokens`` tokens. Prints p50/p99 latency,
requests/s, generated tokens/s, the batch sizes the replica saw, and batched / baseline ratios.

    .venv/bin/python benchmarks/bench_serve.py --checkpoint RUN_OR_CHECKPOINT_DIR [--clients 16]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
import urllib.request

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ray  # noqa: E402
from ray import serve  # noqa: E402

from orchestration.deploy.serve import build_app  # noqa: E402


def _call(url: str, body: dict | None = None, timeout: float = 120.0) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        return json.loads(resp.read())


def drive(url: str, clients: int, per_client: int, max_tokens: int) -> dict:
    """Closed-loop load: each client sends its next request when the previous one is answered."""
    latencies, tokens, errors = [], [], []
    lock = threading.Lock()

    def client(c: int) -> None:
        for r in range(per_client):
            t0 = time.perf_counter()
            try:
                out = _call(
                    f"{url}/generate",
                    {"prompt": f"Request {c}.{r}:", "max_tokens": max_tokens, "temperature": 0.8, "top_k": 50},
                )
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    tokens.append(out["completion_tokens"])
            except Exception as e:  # counted and reported, never dropped
                with lock:
                    errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall_s = time.perf_counter() - t0
    lat_ms = sorted(1000 * x for x in latencies) or [float("nan")]
    return {
        "requests": len(latencies),
        "errors": len(errors),
        "p50_ms": statistics.median(lat_ms),
        "p99_ms": lat_ms[min(len(lat_ms) - 1, int(0.99 * len(lat_ms)))],
        "requests_per_s": len(latencies) / wall_s,
        "tokens_per_s": sum(tokens) / wall_s,
        "stats": _call(f"{url}/info")["stats"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests-per-client", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--port", type=int, default=8123)
    args = parser.parse_args()

    ray.init()
    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    url = f"http://127.0.0.1:{args.port}"
    results = {}
    for batch in (1, args.max_batch_size):
        serve.run(
            build_app(args.checkpoint, max_batch_size=batch, max_tokens_cap=args.max_tokens),
            name="bench",
            route_prefix="/",
        )
        drive(url, 2, 1, args.max_tokens)  # warm-up
        r = results[batch] = drive(url, args.clients, args.requests_per_client, args.max_tokens)
        print(
            f"max_batch_size={batch:3d}: {r['requests']} requests, {r['errors']} errors, p50 {r['p50_ms']:.0f} ms, "
            f"p99 {r['p99_ms']:.0f} ms, {r['requests_per_s']:.1f} req/s, {r['tokens_per_s']:.0f} tokens/s, "
            f"max batch seen {r['stats']['max_batch_size_seen']}"
        )
        serve.delete("bench")
    base, batched = results[1], results[args.max_batch_size]
    print(
        f"batched / one-at-a-time: requests/s x{batched['requests_per_s'] / base['requests_per_s']:.2f}, "
        f"p50 latency x{batched['p50_ms'] / base['p50_ms']:.2f} ({args.clients} clients, {args.max_tokens} tokens)"
    )
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
