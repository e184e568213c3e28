"""`raylm serve`: a real Ray Serve app (FastAPI ingress) on 127.0.0.1 answering generate requests whole
and streamed, refusing bad ones with 4xx naming the field while concurrent good ones succeed, batching
concurrent requests (bounded load test), exporting its metrics to Prometheus, and scaling from 1
replica to 2 and back under load."""

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

from orchestration.deploy.serve_batch import BatchDecoder, plan_sub_batches
from orchestration.deploy.serve_request import GenerateRequest, Job, to_job

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


# Autoscaled between 1 and 2 replicas (1 CPU each: the session's Ray has 2) with short delays. Every
# test but the last keeps far fewer than TARGET_ONGOING requests in flight, so one replica answers
# them all (and its /info counters see every request); the last one loads it past that.
TARGET_ONGOING = 12
AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": 2,
    "target_ongoing_requests": TARGET_ONGOING,
    "upscale_delay_s": 0,
    "downscale_delay_s": 1,
    "metrics_interval_s": 0.2,
    "look_back_period_s": 1,
}


@pytest.fixture(scope="module")
def server(ray_session, tmp_path_factory):
    from ray import serve

    from orchestration.deploy.serve import build_app

    ckpt = write_checkpoint(tmp_path_factory.mktemp("serve_ckpt"), block_size=BLOCK_SIZE)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app(
        ckpt, max_batch_size=8, batch_wait_timeout_s=0.02, max_tokens_cap=MAX_TOKENS_CAP, autoscaling_config=AUTOSCALING
    )
    serve.run(app, name="raylm-test", route_prefix="/")
    yield {"url": f"http://127.0.0.1:{port}", "checkpoint": ckpt}
    serve.shutdown()


def test_sub_batches_share_settings_and_context_room():
    def req(n_prompt, temperature=0.8, seed=None, max_tokens=8):
        return Job([1] * n_prompt, max_tokens, temperature, top_k=50, top_p=None, seed=seed)

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
        ({"prompt": "hi", "stream": "yes"}, 400, "stream must be true or false, got 'yes'"),
        ({"prompt": "hi", "stream": 1}, 400, "stream must be true or false"),
        (b"", 400, "body must be a JSON object"),
        (b'{"prompt": "' + b"a" * (1 << 20) + b'"}', 413, "request body is over the 1048576-byte limit"),
    ],
)
def test_invalid_requests_get_clear_4xx(server, body, status, message):
    got_status, out = _request(f"{server['url']}/generate", body)
    assert got_status == status and message in out["error"] and list(out) == ["error"], out


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


def test_a_chunked_body_over_the_limit_is_413(server):
    """No Content-Length (chunked): the body is counted as it arrives."""
    import http.client
    from urllib.parse import urlparse

    address = urlparse(server["url"])
    conn = http.client.HTTPConnection(address.hostname, address.port, timeout=20)
    chunks = [b'{"prompt": "'] + [b"a" * (1 << 16)] * 17 + [b'"}']
    try:
        conn.request("POST", "/generate", body=iter(chunks), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        status, out = resp.status, json.loads(resp.read())
    finally:
        conn.close()
    assert status == 413 and out == {"error": "request body is over the 1048576-byte limit"}, out


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
    seeded = [i for i, body in enumerate(valid) if "seed" in body]
    seeded_tokens = []
    for bad, field in BAD_IN_A_CROWD:
        bad = bad if isinstance(bad, tuple) else (bad, "application/json")
        answers = _send_at_once(url, [(body, "application/json") for body in valid] + [bad])
        assert [a[0] for a in answers[:-1]] == [200] * 7, (field, answers)
        assert all(len(a[1]["tokens"]) <= 4 and a[1]["finish_reason"] in ("stop", "length") for a in answers[:-1])
        status, out = answers[-1]
        assert status in (400, 415) and out["error"].startswith(field), (field, answers[-1])
        seeded_tokens.append([answers[i][1]["tokens"] for i in seeded])
    # a seed gives the same tokens whatever shared the batch (each round batches differently)
    assert all(tokens == seeded_tokens[0] for tokens in seeded_tokens), seeded_tokens
    stats = _request(f"{url}/info", method="GET")[1]["stats"]
    assert stats["rejected"] - before["rejected"] == len(BAD_IN_A_CROWD)
    assert stats["requests"] - before["requests"] == 7 * len(BAD_IN_A_CROWD) and stats["failed"] == 0


def test_a_request_failing_inside_a_shared_generate_call_fails_alone(tmp_path):
    """A checkpoint whose "~" embedding is NaN (a diverged run): a sampled request with "~" in its
    prompt breaks the sub-batch's shared sampling step; each request of that sub-batch goes on alone,
    so only that one fails (a 500) and the others in its batch are answered. In-process replica
    object, no Serve: the same ``run_batch`` the batch handler iterates."""
    import asyncio

    from orchestration.deploy.serve import _deployment_class

    ckpt = write_checkpoint(tmp_path, block_size=BLOCK_SIZE, tie_embeddings=False, nan_token_ids=(ord("~"),))
    replica = _deployment_class().func_or_class(ckpt, 8, 0.01, MAX_TOKENS_CAP, None, "cpu", 1)

    def req(prompt: str, temperature: float = 0.8) -> Job:
        body = GenerateRequest(prompt=prompt, max_tokens=6, temperature=temperature)
        return to_job(body, encode=replica._encode, max_prompt_tokens=BLOCK_SIZE - 1, max_tokens_cap=MAX_TOKENS_CAP)

    reqs = [req("To be"), req("or not ~ to be"), req("Whether 'tis"), req("nobler", temperature=0)]
    assert len(plan_sub_batches(reqs, BLOCK_SIZE)) == 2  # the three sampled ones share one generate call

    async def decode() -> list[dict]:
        answers = [{"tokens": [], "steps": 0} for _ in reqs]
        async for steps in replica.run_batch(reqs):
            for answer, step in zip(answers, steps):
                if step is not None:
                    answer.update(tokens=answer["tokens"] + step.tokens, steps=answer["steps"] + 1, last=step)
        return answers

    answers = asyncio.run(decode())
    assert [500 if a["last"].error else 200 for a in answers] == [200, 500, 200, 200]
    assert "probability tensor contains" in str(answers[1]["last"].error) and answers[1]["tokens"] == []
    for i in (0, 2, 3):  # one Step per token, the last one saying why it ended
        assert len(answers[i]["tokens"]) <= 6 and answers[i]["last"].finish_reason in ("stop", "length")
        assert answers[i]["steps"] in (len(answers[i]["tokens"]), len(answers[i]["tokens"]) + 1)
    assert replica.stats["failed"] == 1
    assert replica.stats["generate_calls"] == 2 + 3  # the two sub-batches, then the three sampled ones alone


def test_a_request_nobody_reads_is_dropped_from_its_batch():
    """Two greedy requests share a sub-batch, a third runs alone: once a request's ``stop`` is set
    (its client went away) it gets nothing more; its shared sub-batch goes on for the other one, its
    own sub-batch is closed, and the batch ends when nobody is left."""
    started: list[list[int]] = []

    def start_steps(prompts, max_new_tokens, job):
        started.append(list(range(len(prompts))))
        return iter([[5] * len(prompts)] * max_new_tokens)  # never the end-of-text token (0)

    jobs = [
        Job([1, 2], 8, 0.0, None, None, None),
        Job([3], 8, 0.0, None, None, None),
        Job([4], 8, 1.0, None, None, 7),
    ]
    stats = {"generate_calls": 0, "failed": 0, "abandoned": 0}
    decoder = BatchDecoder(jobs, start_steps, block_size=BLOCK_SIZE, eot=0, stats=stats)
    assert len(decoder.groups) == 2 and all(s.tokens == [5] for s in decoder.step())
    jobs[0].stop.set()
    jobs[2].stop.set()
    steps = decoder.step()
    assert steps[0] is None and steps[2] is None and steps[1].tokens == [5]
    assert stats["abandoned"] == 2 and len(decoder.groups) == 1  # the seeded one's own sub-batch is closed
    jobs[1].stop.set()
    assert decoder.step() == [None] * 3 and decoder.done and decoder.groups == []
    assert stats["abandoned"] == 3


def _batched_by_hand(replica):
    """``@serve.batch`` for one request at a time outside Serve (it needs a replica context): the
    batch runs in a task of its own, ahead of the request reading it, as Serve runs it."""
    import asyncio

    batches = []

    def generate_batch(job: Job):
        queue: asyncio.Queue = asyncio.Queue()

        async def run() -> None:
            async for steps in replica.run_batch([job]):
                await queue.put(steps[0])
            await queue.put(None)

        batches.append(asyncio.create_task(run()))

        async def read():
            while (step := await queue.get()) is not None:
                yield step

        return read()

    replica._generate_batch = generate_batch
    return batches


def test_a_stream_whose_client_leaves_stops_decoding_and_a_failing_one_ends_with_an_error_event(server):
    """In-process replica: a stream closed after its first event (Starlette closes it when the client
    goes away) stops its batch within a step or two, not at max_tokens, and leaves the gauges at 0; a
    request failing mid-stream gets a well-formed error event, then [DONE]; mid-answer, a 500."""
    import asyncio

    from orchestration.deploy.serve import _deployment_class

    replica = _deployment_class().func_or_class(server["checkpoint"], 8, 0.01, MAX_TOKENS_CAP, None, "cpu", 1)
    batches = _batched_by_hand(replica)
    decoded, fail_after = [], [None]
    start_steps = replica._start_steps

    def counted(prompts, max_new_tokens, job):
        for i, step in enumerate(start_steps(prompts, max_new_tokens, job)):
            if i == fail_after[0]:
                raise RuntimeError("device lost")
            decoded.append(step)
            yield step

    replica._start_steps = counted
    body = {"prompt": "To be, or not", "max_tokens": MAX_TOKENS_CAP, "temperature": 0}

    async def left_after_the_first_event() -> bytes:
        response = await replica.answer(GenerateRequest(**body, stream=True), "application/json")
        first = await anext(response.body_iterator)
        await response.body_iterator.aclose()
        await asyncio.wait_for(batches[-1], timeout=30)
        return first

    async def failing(stream: bool):
        response = await replica.answer(GenerateRequest(**body, stream=stream), "application/json")
        if not stream:
            return response
        return [chunk async for chunk in response.body_iterator]

    whole = asyncio.run(replica.answer(GenerateRequest(**body), "application/json"))
    assert whole["completion_tokens"] >= 8, whole
    decoded.clear()
    first = asyncio.run(left_after_the_first_event())
    assert first.startswith(b"data: {") and len(decoded) < whole["completion_tokens"], len(decoded)
    assert replica.stats["abandoned"] == 1
    assert (replica.metrics.ongoing, replica.metrics.queued) == (0, 0)

    fail_after[0] = 3
    events = [chunk.decode() for chunk in asyncio.run(failing(stream=True))]
    assert all(e.startswith("data: ") and e.endswith("\n\n") for e in events) and events[-1] == "data: [DONE]\n\n"
    last = json.loads(events[-2][len("data: ") :])
    assert last["finish_reason"] == "error" and "device lost" in last["error"] and last["completion_tokens"] == 3
    assert whole["text"].startswith("".join(json.loads(e[len("data: ") :])["text"] for e in events[:-2]))
    answer = asyncio.run(failing(stream=False))
    assert answer.status_code == 500 and "device lost" in json.loads(answer.body)["error"]
    assert replica.stats["failed"] == 2 and (replica.metrics.ongoing, replica.metrics.queued) == (0, 0)


def test_wrong_route_and_method(server):
    assert _request(f"{server['url']}/generate", method="GET") == (405, {"error": "/generate takes POST, not GET"})
    status, out = _request(f"{server['url']}/completions", {"prompt": "hi"})
    assert status == 404 and list(out) == ["error"] and "/generate" in out["error"] and "/docs" in out["error"]


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


def _stream(url: str, body: dict, timeout: float = 30.0) -> dict:
    """POST a streamed /generate and read its server-sent events as they come: {"status", "type",
    "t0" (request sent), "events": [(arrival time, data)], "end" (connection done)} on time.perf_counter."""
    import http.client
    from urllib.parse import urlparse

    address = urlparse(url)
    conn = http.client.HTTPConnection(address.hostname, address.port, timeout=timeout)
    try:
        t0 = time.perf_counter()
        conn.request("POST", address.path, body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        events = []
        while line := resp.readline():
            if line.startswith(b"data: "):
                events.append((time.perf_counter(), line[len(b"data: ") :].decode().rstrip("\n")))
        return {
            "status": resp.status,
            "type": resp.getheader("content-type"),
            "t0": t0,
            "events": events,
            "end": time.perf_counter(),
        }
    finally:
        conn.close()


def test_streamed_tokens_arrive_as_generated_and_equal_the_whole_text(server):
    """Greedy: the streamed text is the whole response's text, one event per token, and the events
    arrive spread over the response, not all at its end (a buffered answer would bunch them)."""
    from orchestration.evaluate.sample import generate_text

    url = server["url"]
    body = {"prompt": "To be, or not", "max_tokens": MAX_TOKENS_CAP, "temperature": 0}
    status, whole = _request(f"{url}/generate", body)
    assert status == 200 and whole["completion_tokens"] >= 8, whole
    assert whole["text"] == generate_text(server["checkpoint"], "To be, or not", MAX_TOKENS_CAP, temperature=0)
    got = _stream(f"{url}/generate", {**body, "stream": True})
    assert got["status"] == 200 and got["type"].startswith("text/event-stream"), got
    *events, (done_at, done) = got["events"]
    assert done == "[DONE]"
    *texts, last = [json.loads(data) for _, data in events]
    assert all(list(e) == ["text"] and e["text"] for e in texts)
    assert "".join(e["text"] for e in texts) + last["text"] == whole["text"]
    assert last["finish_reason"] == whole["finish_reason"] and last["completion_tokens"] == whole["completion_tokens"]
    assert last["prompt_tokens"] == whole["prompt_tokens"]
    # every token sent on its own (a token ending inside a UTF-8 character would join the next one)
    assert len(texts) + bool(last["text"]) >= whole["completion_tokens"] - 1
    first_at = events[0][0]
    print(
        f"\nstream of {whole['completion_tokens']} tokens: first event {1000 * (first_at - got['t0']):.1f} ms, "
        f"last {1000 * (done_at - got['t0']):.1f} ms after the request"
    )
    # the first token came well before the last: the stream was sent as it was generated (a buffered
    # answer delivers every event within one read, a fraction of a millisecond apart)
    assert done_at - first_at > 0.1 * (done_at - got["t0"]), got["events"]


def test_legal_edge_values_among_concurrent_good_requests_are_answered(server):
    """A top_p too small for float32 (1e-300, the smallest double) keeps the most likely token: greedy's
    tokens, never an empty distribution (a 500); with the other extremes, sent among 6 good requests."""
    url = server["url"]
    greedy = _request(f"{url}/generate", {"prompt": "To be", "max_tokens": 8, "temperature": 0})[1]["tokens"]
    edges = [
        {"prompt": "To be", "max_tokens": 8, "temperature": 1.0, "top_p": 1e-300},
        {"prompt": "To be", "max_tokens": 8, "temperature": 100.0, "top_p": 5e-324, "top_k": None},
        {"prompt": "To be", "max_tokens": 8, "temperature": 0.001, "top_k": 1, "seed": 2**63 - 1},
        {"prompt": "To be", "max_tokens": MAX_TOKENS_CAP, "temperature": 1.0, "top_p": 1e-300, "stream": True},
    ]
    valid = [{"prompt": f"Whether 'tis {i}", "max_tokens": 4, "temperature": [0, 0.8][i % 2]} for i in range(6)]
    answers = _send_at_once(url, [(b, "application/json") for b in valid + edges[:3]])
    assert [a[0] for a in answers] == [200] * 9, answers
    assert [a[1]["tokens"] for a in answers[6:]] == [greedy] * 3
    streamed = _stream(f"{url}/generate", edges[3])
    assert streamed["status"] == 200 and streamed["events"][-1][1] == "[DONE]", streamed


def test_openapi_docs_describe_the_request(server):
    status, schema = _request(f"{server['url']}/openapi.json", method="GET")
    assert status == 200
    body = schema["paths"]["/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    model = schema["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]
    assert set(model["properties"]) == set(GenerateRequest.model_fields) and model["required"] == ["prompt"]
    with urllib.request.urlopen(f"{server['url']}/docs", timeout=20) as resp:
        assert resp.status == 200 and b"swagger" in resp.read().lower()


def _refuse_to_start_ray(monkeypatch) -> None:
    """A refusal must come before Ray starts: starting it fails the test (and cannot block on serving)."""

    def init_ray(address=None):
        raise AssertionError("raylm serve started Ray before refusing its options")

    monkeypatch.setattr("orchestration.runtime.init_ray", init_ray)


@pytest.mark.parametrize(
    "flags, said",
    [
        (["--num-replicas", "2", "--max-replicas", "3"], "give one or the other"),
        (["--num-replicas", "1", "--min-replicas", "1", "--max-replicas", "3"], "give one or the other"),
        (["--min-replicas", "3", "--max-replicas", "2"], "--min-replicas 3 is more than --max-replicas 2"),
        (["--target-ongoing-requests", "4"], "needs --max-replicas"),
        (["--target-ongoing-requests", "0", "--max-replicas", "2"], "must be a finite number > 0"),
    ],
)
def test_serve_refuses_conflicting_replica_options_before_starting(server, flags, said, capsys, monkeypatch):
    from orchestration.cli import main

    _refuse_to_start_ray(monkeypatch)
    try:
        assert main(["serve", "--checkpoint", server["checkpoint"], *flags]) == 2
    except SystemExit as exit_info:  # argparse's own refusal of a bad value
        assert exit_info.code == 2
    assert said in capsys.readouterr().err


def test_autoscaling_flags_become_serves_autoscaling_config():
    from orchestration.deploy.serve_cli import autoscaling_config

    fixed = dict(min_replicas=None, max_replicas=None, target_ongoing_requests=None, num_replicas_given=True)
    assert autoscaling_config(**fixed, max_batch_size=8) is None
    scaled = dict(min_replicas=None, max_replicas=3, target_ongoing_requests=None, num_replicas_given=False)
    assert autoscaling_config(**scaled, max_batch_size=8) == {
        "min_replicas": 1,
        "max_replicas": 3,
        "target_ongoing_requests": 8.0,  # a replica is busy once its batch is full
    }


@pytest.mark.parametrize("scheme, max_fraction", [("int8", 0.4), ("int4", 0.3)])
def test_quantize_at_load_serves_quantized_weights(server, tmp_path, capsys, monkeypatch, scheme, max_fraction):
    """--quantize: the replica holds int8/int4 weights (smaller, /info says so) and answers; a
    `raylm quantize` checkpoint with --quantize is refused before Ray starts."""
    import asyncio

    from model.quantize import QuantizedLinear
    from orchestration.cli import main
    from orchestration.deploy.quantize import quantize_checkpoint
    from orchestration.deploy.serve import _deployment_class

    replica_class = _deployment_class().func_or_class
    fp32 = replica_class(server["checkpoint"], 4, 0.01, 8, None, "cpu", 1)
    replica = replica_class(server["checkpoint"], 4, 0.01, 8, None, "cpu", 1, scheme)
    assert any(isinstance(m, QuantizedLinear) for m in replica.model.modules())
    assert replica.info["quantization"]["scheme"] == scheme and replica.info["quantization"]["quantized_at_load"]
    assert fp32.info["quantization"] is None
    assert replica.info["model_bytes"] < max_fraction * fp32.info["model_bytes"]
    job = to_job(
        GenerateRequest(prompt="To be", max_tokens=4, temperature=0),
        encode=replica._encode,
        max_prompt_tokens=BLOCK_SIZE - 1,
        max_tokens_cap=8,
    )

    async def decode() -> list:
        return [steps[0] async for steps in replica.run_batch([job])]

    steps = asyncio.run(decode())
    assert steps[-1].finish_reason in ("stop", "length") and sum(len(s.tokens) for s in steps) >= 1

    quantized = str(tmp_path / "q")
    quantize_checkpoint(server["checkpoint"], quantized, scheme=scheme, evaluate=False)
    _refuse_to_start_ray(monkeypatch)
    assert main(["serve", "--checkpoint", quantized, "--quantize", scheme]) == 2
    assert "serve it without --quantize" in capsys.readouterr().err


def test_serve_metrics_reach_prometheus(server, ray_session):
    """After the requests above: raylm's serve metrics are on the node's metrics endpoint under the
    names dashboards/raylm_serve.json queries, tagged by Serve with the application."""
    import re

    from orchestration.deploy.serve_metrics import EXPORTED_NAMES

    node = next(n for n in ray_session.nodes() if n["Alive"])
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"

    def scrape() -> dict[str, list[str]]:
        series: dict[str, list[str]] = {}
        for line in urllib.request.urlopen(url, timeout=10).read().decode().splitlines():
            if line.startswith("ray_raylm_serve_") and 'application="raylm-test"' in line:
                series.setdefault(line.split("{", 1)[0], []).append(line)
        return series

    def total(series: dict[str, list[str]], name: str, **tags) -> float:
        lines = [ln for ln in series.get(name, []) if all(f'{k}="{v}"' in ln for k, v in tags.items())]
        return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines)

    def counted(series: dict[str, list[str]]) -> bool:
        """What the tests above did, as the counters must show it."""
        return (
            total(series, "ray_raylm_serve_requests_total", status="200", stream="true") >= 2
            and total(series, "ray_raylm_serve_requests_total", status="400") >= 1
            and total(series, "ray_raylm_serve_requests_total", status="415") >= 1
            and total(series, "ray_raylm_serve_time_to_first_token_s_count", stream="true") >= 2
            and total(series, "ray_raylm_serve_generated_tokens_total") > 0
        )

    # Ray exports a replica's records every few seconds: the last tests' requests may not be in yet
    deadline = time.monotonic() + 30
    while not ((series := scrape()).keys() >= EXPORTED_NAMES and counted(series)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert EXPORTED_NAMES <= series.keys(), f"missing {sorted(EXPORTED_NAMES - series.keys())}"
    assert set(series) <= EXPORTED_NAMES
    assert counted(series), series["ray_raylm_serve_requests_total"]
    assert re.search(r'deployment="raylm-generate"', series["ray_raylm_serve_batch_size_count"][0])


@pytest.mark.slow
def test_load_scales_replicas_from_one_to_two_and_back(server):
    """The fixture's app (1-2 replicas, target TARGET_ONGOING requests each, short delays): 20 streaming
    clients, more than one replica's target, bring up a second replica; when they stop it goes away.
    Last in the module: other tests' counters assume one replica."""
    from ray import serve

    def replicas() -> int:
        deployment = serve.status().applications["raylm-test"].deployments["raylm-generate"]
        return deployment.replica_states.get("RUNNING", 0)

    clients = 20
    assert clients > TARGET_ONGOING
    stop, answers = threading.Event(), []
    body = {"prompt": "To be", "max_tokens": MAX_TOKENS_CAP, "temperature": 0.8, "stream": True}

    def client() -> None:
        while not stop.is_set():
            got = _stream(f"{server['url']}/generate", body)
            answers.append((got["status"], got["events"][-1][1] if got["events"] else None))

    seen, t0 = [replicas()], time.monotonic()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    try:
        for t in threads:
            t.start()
        while seen[-1] < 2 and time.monotonic() - t0 < 40:
            time.sleep(0.1)
            seen.append(replicas())
        up_s = time.monotonic() - t0
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    t1 = time.monotonic()
    while seen[-1] > 1 and time.monotonic() - t1 < 40:
        time.sleep(0.1)
        seen.append(replicas())
    down_s = time.monotonic() - t1
    print(
        f"\nautoscaling: replicas {seen[0]} -> 2 in {up_s:.1f} s under load, back to 1 in {down_s:.1f} s idle; "
        f"{len(answers)} streamed requests"
    )
    assert seen[0] == 1 and 2 in seen and seen[-1] == 1, seen
    assert max(seen) == 2  # never past max_replicas
    assert answers and all(a == (200, "[DONE]") for a in answers), answers[:5]
