"""`raylm serve`: a real Ray Serve app on 127.0.0.1 answering generate requests, refusing bad ones with
4xx naming the field while concurrent good ones succeed, and batching concurrent requests (bounded
load test)."""

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


def _request(
    url: str, body=None, *, method: str = "POST", timeout: float = 20.0, content_type: str = "application/json"
) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": content_type})
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
    from orchestration.evaluate.sample import generate_text

    url = server["url"]
    status, out = _request(f"{url}/generate", {"prompt": "To be, or not", "max_tokens": 8, "temperature": 0})
    assert status == 200, out
    assert isinstance(out["text"], str) and 1 <= out["completion_tokens"] == len(out["tokens"]) <= 8
    assert out["finish_reason"] in ("stop", "length") and out["prompt_tokens"] > 0
    assert (
        _request(f"{url}/generate", {"prompt": "To be, or not", "max_tokens": 8, "temperature": 0})[1]["tokens"]
        == out["tokens"]
    )  # greedy is deterministic
    # a legal top_p too small for float32 keeps the most likely token (it was a 500): greedy's tokens
    tiny_p = {"prompt": "To be, or not", "max_tokens": 8, "temperature": 1.0, "top_p": 1e-300}
    status, nucleus = _request(f"{url}/generate", tiny_p)
    assert status == 200 and nucleus["tokens"] == out["tokens"], nucleus
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
        ({"prompt": "hi", "max_tokens": 8.0}, 400, "max_tokens must be an integer"),
        ({"prompt": "hi", "max_tokens": True}, 400, "max_tokens must be an integer"),
        ({"prompt": "hi", "temperature": -0.1}, 400, "temperature must be 0 (greedy) or in [0.001, 100]"),
        ({"prompt": "hi", "temperature": 1e-300}, 400, "temperature must be 0 (greedy) or in [0.001, 100]"),
        ({"prompt": "hi", "temperature": 1e300}, 400, "temperature must be 0 (greedy) or in [0.001, 100]"),
        ({"prompt": "hi", "temperature": float("nan")}, 400, "temperature must be a finite number, got nan"),
        ({"prompt": "hi", "temperature": float("inf")}, 400, "temperature must be a finite number, got inf"),
        ({"prompt": "hi", "temperature": float("-inf")}, 400, "temperature must be a finite number"),
        ({"prompt": "hi", "temperature": "0.5"}, 400, "temperature must be a finite number"),
        ({"prompt": "hi", "temperature": None}, 400, "temperature must be a finite number"),
        ({"prompt": "hi", "top_k": 0}, 400, "top_k must be >= 1"),
        ({"prompt": "hi", "top_k": 2.5}, 400, "top_k must be an integer or null"),
        ({"prompt": "hi", "top_p": 0}, 400, "top_p must be in (0, 1]"),
        ({"prompt": "hi", "top_p": 1.5}, 400, "top_p must be in (0, 1]"),
        ({"prompt": "hi", "top_p": float("nan")}, 400, "top_p must be a finite number or null, got nan"),
        ({"prompt": "hi", "seed": 2**63}, 400, "seed must be in [0, 2**63 - 1]"),
        ({"prompt": "hi", "seed": 2**200}, 400, "seed must be in [0, 2**63 - 1]"),
        ({"prompt": "hi", "seed": -1}, 400, "seed must be in [0, 2**63 - 1]"),
        ({"prompt": "hi", "seed": "7"}, 400, "seed must be an integer or null"),
        ({"prompt": ["hi"]}, 400, "prompt must be a string"),
        ({"prompt": "to be or not " * 40}, 400, f"at most {BLOCK_SIZE - 1} (block_size - 1)"),
    ],
)
def test_invalid_requests_get_clear_4xx(server, body, status, message):
    got_status, out = _request(f"{server['url']}/generate", body)
    assert got_status == status and message in out["error"], out


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_non_json_content_type_is_415(server, content_type):
    import http.client
    from urllib.parse import urlparse

    address = urlparse(server["url"])
    conn = http.client.HTTPConnection(address.hostname, address.port, timeout=20)
    try:  # http.client sends exactly these headers (urllib would add a form Content-Type itself)
        conn.request(
            "POST",
            "/generate",
            body=b'{"prompt": "hi"}',
            headers={"Content-Type": content_type} if content_type else {},
        )
        resp = conn.getresponse()
        status, out = resp.status, json.loads(resp.read())
    finally:
        conn.close()
    assert status == 415 and "Content-Type must be application/json" in out["error"], out
    ok = _request(f"{server['url']}/generate", {"prompt": "hi"}, content_type="application/json; charset=utf-8")
    assert ok[0] == 200, ok


# (body or (body, content type), the field the 400/415 must name) sent alongside valid requests
BAD_IN_A_CROWD = [
    ({"prompt": "To be", "temperature": float("nan")}, "temperature"),
    ({"prompt": "To be", "temperature": float("inf")}, "temperature"),
    ({"prompt": "To be", "seed": 2**63}, "seed"),
    ({"prompt": "To be", "top_p": float("nan"), "temperature": 0.8}, "top_p"),
    (({"prompt": "To be"}, "text/plain"), "Content-Type"),
]


def _send_at_once(url: str, bodies: list[tuple[dict, str]]) -> list[tuple[int, dict]]:
    """POST every (body, content type) to /generate from its own thread, released together."""
    answers: list = [None] * len(bodies)
    start = threading.Barrier(len(bodies))

    def client(i: int) -> None:
        start.wait(timeout=10)
        answers[i] = _request(f"{url}/generate", bodies[i][0], content_type=bodies[i][1], timeout=30)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=40)
    return answers


def test_a_bad_request_fails_alone_among_concurrent_good_ones(server):
    """7 valid requests (greedy, sampled, seeded) + 1 bad one sent at once, for each kind of bad
    field: every valid one gets 200, the bad one a 4xx naming its field."""
    url = server["url"]
    before = _request(f"{url}/info", method="GET")[1]["stats"]
    valid = [
        {"prompt": f"Whether 'tis {i}", "max_tokens": 4, "temperature": [0, 0.8, 1.0][i % 3]}
        | ({"seed": i} if i % 3 == 2 else {})
        for i in range(7)
    ]
    for bad, field in BAD_IN_A_CROWD:
        bad = bad if isinstance(bad, tuple) else (bad, "application/json")
        answers = _send_at_once(url, [(body, "application/json") for body in valid] + [bad])
        assert [a[0] for a in answers[:-1]] == [200] * 7, (field, answers)
        assert all(len(a[1]["tokens"]) <= 4 and a[1]["finish_reason"] in ("stop", "length") for a in answers[:-1])
        status, out = answers[-1]
        assert status in (400, 415) and out["error"].startswith(field), (field, answers[-1])
    stats = _request(f"{url}/info", method="GET")[1]["stats"]
    assert stats["rejected"] - before["rejected"] == len(BAD_IN_A_CROWD)
    assert stats["requests"] - before["requests"] == 7 * len(BAD_IN_A_CROWD) and stats["failed"] == 0


def test_a_request_failing_inside_a_shared_generate_call_fails_alone(tmp_path):
    """A checkpoint whose "~" embedding is NaN (a diverged run): a sampled request with "~" in its
    prompt breaks the sub-batch's shared sampling call; the replica retries each request alone, so
    only that one gets a 500 and the others in its batch are answered. In-process replica object, no
    Serve: the same ``_run`` the batch handler calls."""
    import asyncio

    from orchestration.deploy.serve import _deployment_class, parse_request

    ckpt = write_checkpoint(tmp_path, block_size=BLOCK_SIZE, tie_embeddings=False, nan_token_ids=(ord("~"),))
    replica = _deployment_class().func_or_class(ckpt, 8, 0.01, MAX_TOKENS_CAP, None, "cpu", 1)

    def req(prompt: str, **fields) -> dict:
        body = json.dumps({"prompt": prompt, "max_tokens": 6, "temperature": 0.8, **fields}).encode()
        return parse_request(
            body,
            content_type="application/json",
            encode=replica._encode,
            max_prompt_tokens=BLOCK_SIZE - 1,
            max_tokens_cap=MAX_TOKENS_CAP,
        )

    reqs = [req("To be"), req("or not ~ to be"), req("Whether 'tis"), req("nobler", temperature=0)]
    assert len(plan_sub_batches(reqs, BLOCK_SIZE)) == 2  # the three sampled ones share one generate call
    answers = asyncio.run(replica._run(reqs))
    assert [a.status if isinstance(a, Exception) else 200 for a in answers] == [200, 500, 200, 200]
    assert "probability tensor contains" in str(answers[1])
    assert all(len(answers[i]["tokens"]) <= 6 and answers[i]["finish_reason"] in ("stop", "length") for i in (0, 2, 3))
    assert replica.stats["failed"] == 1


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
