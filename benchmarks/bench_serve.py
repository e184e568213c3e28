"""`raylm serve` throughput: batched generation vs one request at a time, same checkpoint, same run.

Starts Ray Serve on 127.0.0.1, deploys the checkpoint with max_batch_size=1 (the baseline) and then
with ``--max-batch-size``, and drives each with the same closed-loop load: ``--clients`` threads, each
sending ``--requests-per-client`` sampled requests of ``--max-tokens`` tokens. Prints p50/p99 latency,
requests/s, generated tokens/s, the batch sizes the replica saw, and batched / baseline ratios.

    .venv/bin/python benchmarks/bench_serve.py --checkpoint RUN_OR_CHECKPOINT_DIR [--clients 16]
    .venv/bin/python benchmarks/bench_serve.py --smoke   # seconds; without --checkpoint, trains a tiny one first
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from harness import SMOKE_SEQ_LEN, local_ray, smoke_manifest


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


def smoke_checkpoint(root: Path) -> str:
    """The run directory of a tiny `raylm train` run (1 worker, 4 steps) on the smoke data under ``root``."""
    from orchestration.config import load_config
    from orchestration.train.driver import run_training

    overrides = [
        f"train.data={smoke_manifest(root)}",
        f"train.storage_path={root}",
        "train.run_name=smoke",
        "train.num_workers=1",
        "train.micro_batch_size=4",
        "train.max_steps=4",
        "train.warmup_steps=1",
        "train.log_interval=2",
        "train.eval_interval=0",
        "model.preset=tiny",
        f"model.block_size={SMOKE_SEQ_LEN}",
    ]
    return run_training(load_config(None, overrides), resume=False)["run_dir"]


def main(argv: list[str] | None = None) -> dict[int, dict]:
    """Runs the benchmark on ``argv`` (the command line when None); returns the load results per
    max_batch_size."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="run or checkpoint directory (--smoke trains one)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests-per-client", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument(
        "--smoke", action="store_true", help="seconds: 4 clients x 2 requests; trains a checkpoint if none is given"
    )
    args = parser.parse_args(argv)
    if args.smoke:  # smaller defaults; flags given explicitly still win
        parser.set_defaults(clients=4, requests_per_client=2, max_tokens=8, max_batch_size=4)
        args = parser.parse_args(argv)
    if args.checkpoint is None and not args.smoke:
        parser.error("--checkpoint is required (a run or checkpoint directory of `raylm train`), or run with --smoke")
    with tempfile.TemporaryDirectory(prefix="raylm_bench_serve_") as tmp, local_ray():
        return measure(args, args.checkpoint or smoke_checkpoint(Path(tmp)))


def measure(args, checkpoint: str) -> dict[int, dict]:
    from ray import serve

    from orchestration.deploy.serve import build_app

    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    url = f"http://127.0.0.1:{args.port}"
    results = {}
    try:
        for batch in (1, args.max_batch_size):
            serve.run(
                build_app(checkpoint, max_batch_size=batch, max_tokens_cap=args.max_tokens),
                name="bench",
                route_prefix="/",
            )
            drive(url, 2, 1, args.max_tokens)  # warm-up
            r = results[batch] = drive(url, args.clients, args.requests_per_client, args.max_tokens)
            print(
                f"max_batch_size={batch:3d}: {r['requests']} requests, {r['errors']} errors, p50 {r['p50_ms']:.0f} "
                f"ms, p99 {r['p99_ms']:.0f} ms, {r['requests_per_s']:.1f} req/s, {r['tokens_per_s']:.0f} tokens/s, "
                f"max batch seen {r['stats']['max_batch_size_seen']}"
            )
            serve.delete("bench")
    finally:
        serve.shutdown()
    base, batched = results[1], results[args.max_batch_size]
    print(
        f"batched / one-at-a-time: requests/s x{batched['requests_per_s'] / base['requests_per_s']:.2f}, "
        f"p50 latency x{batched['p50_ms'] / base['p50_ms']:.2f} ({args.clients} clients, {args.max_tokens} tokens)"
    )
    return results


if __name__ == "__main__":
    main()
