"""`raylm serve` latency and throughput: fp32, int8 and int4 weights, streamed and whole responses, and
batched vs one request at a time; one checkpoint, the same prompts, one run.

Starts Ray Serve on 127.0.0.1 and deploys the checkpoint once per weight format (int8/int4 quantized as
it loads, `raylm serve --quantize`), plus fp32 with max_batch_size=1 (the one-at-a-time baseline), all
at once, each its own app with an equal share of the CPUs; then drives one at a time with the same
closed-loop load: ``--clients`` threads, each sending ``--requests-per-client`` sampled requests of
``--max-tokens`` tokens, first for whole responses and then streamed (``"stream": true``). Per row:
weight bytes (the replica's /info), p50/p99 latency to the last token, time to first token (streamed:
the first event at the client; a whole response shows its text at the end, so its TTFT is its
latency), generated tokens/s; then ratios against fp32 batched whole responses, measured in the same
run.

    .venv/bin/python benchmarks/bench_serve.py --checkpoint RUN_OR_CHECKPOINT_DIR [--clients 8]
    .venv/bin/python benchmarks/bench_serve.py --smoke   # seconds; without --checkpoint, trains a tiny one first
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

from harness import SMOKE_SEQ_LEN, local_ray, smoke_manifest

PROMPTS = ("ROMEO:", "To be, or not to be", "First Citizen:\n", "Now is the winter", "KING LEAR:", "O, ")
WEIGHTS = ("fp32", "int8", "int4")


def _call(url: str, body: dict | None = None, timeout: float = 120.0) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        return json.loads(resp.read())


def _streamed(address, body: dict, timeout: float = 120.0) -> tuple[float, float, int]:
    """POST a streamed /generate to the app at ``address`` (a parsed URL) -> (seconds to the first text
    event, seconds to [DONE], tokens)."""
    conn = http.client.HTTPConnection(address.hostname, address.port, timeout=timeout)
    try:
        t0 = time.perf_counter()
        path = f"{address.path}/generate"
        conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:200]!r}")
        first, tokens = None, None
        while line := resp.readline():
            if not line.startswith(b"data: "):
                continue
            if line.startswith(b"data: [DONE]"):
                break
            event = json.loads(line[len(b"data: ") :])
            if "error" in event:
                raise RuntimeError(event["error"])
            first = first if first is not None else time.perf_counter() - t0
            tokens = event.get("completion_tokens", tokens)
        if tokens is None:
            raise RuntimeError("stream ended without its last event")
        return first, time.perf_counter() - t0, tokens
    finally:
        conn.close()


def drive(url: str, clients: int, per_client: int, max_tokens: int, stream: bool) -> dict:
    """Closed-loop load on the app at ``url``: each client sends its next request when the previous one
    is answered. Client c's r-th request continues PROMPTS[(c + r) % len(PROMPTS)], so every variant gets
    the same prompts."""
    address = urlparse(url)
    latencies, ttfts, tokens, errors = [], [], [], []
    lock = threading.Lock()

    def client(c: int) -> None:
        for r in range(per_client):
            body = {"prompt": PROMPTS[(c + r) % len(PROMPTS)], "max_tokens": max_tokens, "temperature": 0.8}
            t0 = time.perf_counter()
            try:
                if stream:
                    first_s, total_s, n = _streamed(address, {**body, "stream": True})
                else:
                    n = _call(f"{url}/generate", body)["completion_tokens"]
                    total_s = first_s = time.perf_counter() - t0
                with lock:
                    latencies.append(total_s)
                    ttfts.append(first_s)
                    tokens.append(n)
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
    return {
        "requests": len(latencies),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        **_percentiles("latency", latencies),
        **_percentiles("ttft", ttfts),
        "requests_per_s": len(latencies) / wall_s,
        "tokens_per_s": sum(tokens) / wall_s,
    }


def _percentiles(name: str, seconds: list[float]) -> dict:
    ms = sorted(1000 * s for s in seconds) or [float("nan")]
    return {f"{name}_p50_ms": statistics.median(ms), f"{name}_p99_ms": ms[min(len(ms) - 1, int(0.99 * len(ms)))]}


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


def main(argv: list[str] | None = None) -> dict[str, dict]:
    """Runs the benchmark on ``argv`` (the command line when None); returns the load results per row
    ("fp32 whole batch=1", "fp32 whole", "fp32 stream", "int8 whole", ...)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="run or checkpoint directory (--smoke trains one)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests-per-client", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, default=8)
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


def measure(args, checkpoint: str) -> dict[str, dict]:
    import ray
    from ray import serve

    from orchestration.deploy.serve import build_app

    # (weights, max_batch_size, responses measured): fp32 one request at a time is the batching baseline
    variants = [("fp32", 1, ("whole",))] + [(w, args.max_batch_size, ("whole", "stream")) for w in WEIGHTS]
    # Every variant is deployed at once, as its own app, with an equal share of the CPUs (replicas start
    # side by side; the one measured runs alone, the others idle); each replica runs 1 torch thread.
    cpus = ray.available_resources()["CPU"] / len(variants)

    def deploy(weights: str, batch: int) -> str:
        route = f"/{weights}-batch{batch}"
        quantize = None if weights == "fp32" else weights
        app = build_app(
            checkpoint,
            max_batch_size=batch,
            max_tokens_cap=args.max_tokens,
            quantize=quantize,
            num_cpus_per_replica=cpus,
        )
        serve.run(app, name=route.strip("/"), route_prefix=route)
        return f"http://127.0.0.1:{args.port}{route}"

    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    results: dict[str, dict] = {}
    try:
        t0 = time.perf_counter()
        urls = [deploy(weights, batch) for weights, batch, _ in variants]
        print(f"deployed {len(urls)} apps in {time.perf_counter() - t0:.1f} s", flush=True)
        for (weights, batch, responses), url in zip(variants, urls):
            model_bytes = _call(f"{url}/info")["model_bytes"]
            for response in responses:
                stream = response == "stream"
                drive(url, 2, 1, args.max_tokens, stream)  # warm-up: first-call allocations, int4's repack
                key = f"{weights} {response}" + (" batch=1" if batch == 1 else "")
                load = drive(url, args.clients, args.requests_per_client, args.max_tokens, stream)
                results[key] = {**load, "model_bytes": model_bytes, "max_batch_size": batch}
                print(f"{key}: {_row(results[key])}", flush=True)
    finally:
        serve.shutdown()
    print_table(results, args, cpus)
    return results


def _row(r: dict) -> str:
    return (
        f"{r['requests']} requests, {r['errors']} errors, p50 {r['latency_p50_ms']:.0f} ms, p99 "
        f"{r['latency_p99_ms']:.0f} ms, TTFT p50 {r['ttft_p50_ms']:.0f} ms, {r['tokens_per_s']:.0f} tokens/s"
        + (f" (first error: {r['first_error']})" if r["errors"] else "")
    )


def print_table(results: dict[str, dict], args, cpus: float) -> None:
    base = results["fp32 whole"]
    print(
        f"\n{args.clients} clients x {args.requests_per_client} requests of {args.max_tokens} tokens "
        f"(temperature 0.8), max_batch_size {args.max_batch_size} unless batch=1, one replica of {cpus:g} CPU "
        "and 1 torch thread each; ratios vs fp32 whole\n"
    )
    print("| weights | response | MB | p50 ms | p99 ms | TTFT p50 ms | TTFT p99 ms | tokens/s | x tokens/s | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for key, r in results.items():
        weights, response = key.split(" ", 1)
        print(
            f"| {weights} | {response} | {r['model_bytes'] / 1e6:.2f} | {r['latency_p50_ms']:.0f} | "
            f"{r['latency_p99_ms']:.0f} | {r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | "
            f"{r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base['tokens_per_s']:.2f} | {r['errors']} |"
        )
    ratio = {w: results[f"{w} whole"]["tokens_per_s"] / base["tokens_per_s"] for w in WEIGHTS[1:]}
    size = {w: base["model_bytes"] / results[f"{w} whole"]["model_bytes"] for w in WEIGHTS[1:]}
    print(f"\nweights: int8 {size['int8']:.2f}x, int4 {size['int4']:.2f}x smaller than fp32")
    print(
        f"vs fp32 whole: tokens/s int8 x{ratio['int8']:.2f}, int4 x{ratio['int4']:.2f}; one-at-a-time "
        f"x{results['fp32 whole batch=1']['tokens_per_s'] / base['tokens_per_s']:.2f}; streamed TTFT p50 / whole "
        f"latency p50 x{results['fp32 stream']['ttft_p50_ms'] / base['latency_p50_ms']:.2f}"
    )


if __name__ == "__main__":
    main()
