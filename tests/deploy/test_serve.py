"""`raylm serve`: a real Ray Serve app on 127.0.0.1 answering generate requests, refusing bad ones with
4xx, and batching concurrent requests (bounded load test)."""

from __future__ import annotations

import json
import socket
import statistics
import threading
import time
import urllib.error
import urllib.request

import pytest
from test_export import write_checkpoint

from orchestration.deploy.serve import plan_sub_batches

BLOCK_SIZE = 32
MAX_TOKENS_CAP = 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url: str, body=None, *, method: str = "POST", timeout: float = 20.0) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server(ray_session, tmp_path_factory):
    from ray import serve

    from orchestration.deploy.serve import build_app

    ckpt = write_checkpoint(tmp_path_factory.mktemp("serve_ckpt"), block_size=BLOCK_SIZE)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(
        build_app(ckpt, max_batch_size=8, batch_wait_timeout_s=0.02, max_tokens_cap=MAX_TOKENS_CAP),
        name="raylm-test",
        route_prefix="/",
    )
    yield {"url": f"http://127.0.0.1:{port}", "checkpoint": ckpt}
    serve.shutdown()


def test_sub_batches_share_settings_and_context_room():
    def req(n_prompt, temperature=0.8, seed=None, max_tokens=8):
        return {
            "ids": [1] * n_prompt,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_k": 50,
            "top_p": None,
            "seed": seed,
        }

    reqs = [req(3, 0.0), req(4), req(5, 0.0, seed=7), req(2, seed=1), req(2, seed=1), req(3, 1.0), req(6)]
    plan = sorted(sorted(b) for b in plan_sub_batches(reqs, block_size=32))
    # greedy ignores seed; seeded rows run alone; unseeded ones group by (temperature, top_k, top_p)
    assert plan == [[0, 2], [1, 6], [3], [4], [5]]
    # a 30-token prompt leaves 3 steps: an 8-token request with a short prompt must not share its call
    long_and_short = [req(30, 0.0, max_tokens=2), req(2, 0.0), req(29, 0.0, max_tokens=3)]
    assert sorted(sorted(b) for b in plan_sub_batches(long_and_short, block_size=32)) == [[0, 2], [1]]


def test_generate_info_and_seeded_reproducibility(server):
    from orchestration.evaluate.load import generate_text

    url = server["url"]
    status, out = _request(f"{url}/generate", {"prompt": "To be, or not", "max_tokens": 8, "temperature": 0})
    assert status == 200, out
    assert isinstance(out["text"], str) and 1 <= out["completion_tokens"] == len(out["tokens"]) <= 8
    assert out["finish_reason"] in ("stop", "length") and out["prompt_tokens"] > 0
    assert (
        _request(f"{url}/generate", {"prompt": "To be, or not", "max_tokens": 8, "temperature": 0})[1]["tokens"]
        == out["tokens"]
    )  # greedy is deterministic
    status, fresh = _request(f"{url}/generate", {"prompt": ""})  # defaults; empty prompt starts a document
    assert status == 200 and fresh["prompt_tokens"] == 1 and fresh["completion_tokens"] <= MAX_TOKENS_CAP

    body = {"prompt": "Whether 'tis", "max_tokens": 12, "temperature": 1.0, "top_k": 20, "top_p": 0.9, "seed": 3}
    status, seeded = _request(f"{url}/generate", body)
    assert status == 200
    assert seeded["text"] == generate_text(
        server["checkpoint"], "Whether 'tis", 12, temperature=1.0, top_k=20, top_p=0.9, seed=3
    )

    # the context window caps a long prompt's continuation: block_size + 1 - prompt tokens
    status, tail = _request(f"{url}/generate", {"prompt": "to be " * 10, "max_tokens": 16, "temperature": 0})
    assert status == 200 and tail["prompt_tokens"] + tail["completion_tokens"] <= BLOCK_SIZE + 1
    assert tail["finish_reason"] in ("context", "stop")

    status, info = _request(f"{url}/info", method="GET")
    assert status == 200 and info["model"]["block_size"] == BLOCK_SIZE and info["params"] > 0
    assert info["limits"] == {
        "max_prompt_tokens": BLOCK_SIZE - 1,
        "max_tokens_cap": MAX_TOKENS_CAP,
        "max_batch_size": 8,
        "batch_wait_timeout_s": 0.02,
    }
    assert _request(f"{url}/health", method="GET") == (200, {"status": "ok"})


@pytest.mark.parametrize(
    "body, status, message",
    [
        (b"not json", 400, "body must be JSON"),
        (b"[1, 2]", 400, "JSON object"),
        ({}, 400, "prompt must be a string"),
        ({"prompt": 5}, 400, "prompt must be a string"),
        ({"prompt": "hi", "temprature": 1}, 400, "unknown field(s) ['temprature']"),
        ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens must be in [1, 16]"),
        ({"prompt": "hi", "max_tokens": 17}, 400, "max_tokens must be in [1, 16]"),
        ({"prompt": "hi", "max_tokens": "8"}, 400, "max_tokens must be an integer"),
        ({"prompt": "hi", "temperature": -0.1}, 400, "temperature must be >= 0"),
        ({"prompt": "hi", "top_k": 0}, 400, "top_k must be >= 1"),
        ({"prompt": "hi", "top_p": 0}, 400, "top_p must be in (0, 1]"),
        ({"prompt": "hi", "top_p": 1.5}, 400, "top_p must be in (0, 1]"),
        ({"prompt": "to be or not " * 40}, 400, f"at most {BLOCK_SIZE - 1} (block_size - 1)"),
    ],
)
def test_invalid_requests_get_clear_4xx(server, body, status, message):
    got_status, out = _request(f"{server['url']}/generate", body)
    assert got_status == status and message in out["error"], out


def test_wrong_route_and_method(server):
    assert _request(f"{server['url']}/generate", method="GET")[0] == 405
    status, out = _request(f"{server['url']}/completions", {"prompt": "hi"})
    assert status == 404 and "/generate" in out["error"]


def test_concurrent_load_is_batched_without_errors(server):
    """8 clients x 5 requests, half greedy and half sampled: all 200 and served in shared batches."""
    url, clients, per_client = server["url"], 8, 5
    latencies, errors, batch_sizes = [], [], []
    lock = threading.Lock()
    start = threading.Barrier(clients)

    def client(c: int) -> None:
        start.wait(timeout=10)
        for r in range(per_client):
            body = {"prompt": f"To be {c} {r}", "max_tokens": MAX_TOKENS_CAP, "temperature": 0 if c % 2 else 0.8}
            t0 = time.perf_counter()
            try:
                status, out = _request(f"{url}/generate", body, timeout=20)
            except Exception as e:  # a timeout or reset counts as an error, with its cause kept
                status, out = None, {"error": repr(e)}
            with lock:
                latencies.append(time.perf_counter() - t0)
                if status != 200:
                    errors.append((status, out))
                else:
                    batch_sizes.append(out["batch_size"])

    before = _request(f"{url}/info", method="GET")[1]["stats"]
    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    wall_s = time.perf_counter() - t0
    stats = _request(f"{url}/info", method="GET")[1]["stats"]

    n = clients * per_client
    lat_ms = sorted(1000 * x for x in latencies)
    p50, p99 = statistics.median(lat_ms), lat_ms[min(len(lat_ms) - 1, int(0.99 * len(lat_ms)))]
    print(
        f"\nserve load: {clients} clients x {per_client} requests = {n}; completed {len(latencies)}, "
        f"errors {len(errors)}; p50 {p50:.0f} ms, p99 {p99:.0f} ms; {len(latencies) / wall_s:.1f} req/s; "
        f"max batch {max(batch_sizes, default=0)}, mean batch {statistics.mean(batch_sizes or [0]):.1f}; "
        f"serve batches {stats['batches'] - before['batches']}, generate calls "
        f"{stats['generate_calls'] - before['generate_calls']}"
    )
    assert not any(t.is_alive() for t in threads), "load test clients still running after 30 s"
    assert errors == [] and len(latencies) == n
    assert stats["requests"] - before["requests"] == n
    assert max(batch_sizes) > 1 and stats["max_batch_size_seen"] > 1
    assert stats["batches"] - before["batches"] < n  # fewer batches than requests: batching happened
