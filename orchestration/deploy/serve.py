"""`raylm serve`: a checkpoint behind an HTTP generate endpoint, on Ray Serve with request batching.

Routes (JSON in, JSON out; errors are {"error": message} with a 4xx/5xx status):
  POST /generate  {"prompt", "max_tokens"?, "temperature"?, "top_k"?, "top_p"?, "seed"?}
                  with Content-Type: application/json (else 415)
                  -> {"text", "tokens", "finish_reason", "prompt_tokens", "completion_tokens", "batch_size"}
  GET  /info      model config, parameter count, limits and batching counters of the replica answering
  GET  /health    {"status": "ok"}

Batching: ``@serve.batch`` gathers up to max_batch_size requests (waiting at most batch_wait_timeout_s).
``model.generate.generate`` takes one set of sampling settings per call, so a batch is split into
sub-batches that can share a call: all greedy requests together; unseeded sampled requests with equal
(temperature, top_k, top_p); each seeded request alone, so a seed gives the same text as
`raylm generate --seed` whatever else is in flight. A sub-batch is also split when its longest prompt
would leave a shorter one less room than it asked for (left padding shares one context window).

A request fails alone: every field is checked (type, range, finite) before it joins a batch, so a bad
one is a 400 naming the field; and if a shared ``generate`` call still fails (a checkpoint with
non-finite weights, say), each of its requests is retried by itself, so only the ones that fail on
their own get a 500 while the rest of the batch is answered.

Network: the HTTP proxy binds --host (127.0.0.1 by default). A Ray that `raylm serve` starts itself
has 127.0.0.1 as its node address (``orchestration.runtime``), so Ray's own servers and Serve's
controller, proxy and replicas listen on loopback only. The one exception Ray 2.60 has no setting for
is each replica's inter-deployment gRPC server, hard-coded to [::]:0 (every interface) in
``ray/serve/_private/replica.py``: ``keep_replica_grpc_on_node_address`` binds it to the node address
when that is loopback. On a cluster it keeps Serve's binding (the other nodes reach it), accepts only
calls carrying the cluster's auth token (Ray's token authentication, on by default in 2.60) and uses
TLS when RAY_USE_TLS=1: the cluster files let only the cluster's own nodes reach it.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import math
import signal
import time
from dataclasses import asdict
from typing import Optional

MAX_BODY_BYTES = 1 << 20
DEFAULTS = {
    "max_tokens": 64,  # capped at the server's max_tokens_cap
    "temperature": 0.8,
    "top_k": 50,
    "top_p": None,
    "seed": None,
}
FIELDS = ("prompt",) + tuple(DEFAULTS)
# Below this, logits / temperature overflow float32 (NaN probabilities); above it sampling is uniform
# noise. 0 means greedy.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 100.0
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit integer
JSON_TYPE = "application/json"
logger = logging.getLogger("ray.serve")


class RequestError(ValueError):
    """A request the server refuses, with the HTTP status and a message saying what to send instead."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _number(body: dict, key: str, kind: type, default, *, nullable: bool = False):
    """body[key] (or default) as ``kind``; a 400 naming the key unless it is one, finite (or null if allowed)."""
    value = body.get(key, default)
    if value is None and nullable:
        return None
    ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    if not ok or (isinstance(value, float) and not math.isfinite(value)):
        raise RequestError(
            400,
            f"{key} must be {'a finite number' if kind is float else 'an integer'}"
            f"{' or null' if nullable else ''}, got {value!r}",
        )
    return kind(value)


def parse_request(raw: bytes, *, content_type: str, encode, max_prompt_tokens: int, max_tokens_cap: int) -> dict:
    """Validate a /generate body -> {"ids", "max_tokens", "temperature", "top_k", "top_p", "seed"}.

    ``content_type`` is the request's header; ``encode`` turns the prompt into token ids. Raises
    RequestError (400/413/415) naming the field.
    """
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type != JSON_TYPE:
        raise RequestError(
            415,
            f"Content-Type must be {JSON_TYPE}, got {content_type or 'none'!r}: "
            f"send the JSON body with -H 'Content-Type: {JSON_TYPE}'",
        )
    if len(raw) > MAX_BODY_BYTES:
        raise RequestError(413, f"request body of {len(raw)} bytes is over the {MAX_BODY_BYTES}-byte limit")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(
            400, f'body must be JSON like {{"prompt": "Once upon a time", "max_tokens": 32}}: {e}'
        ) from None  # noqa: E501
    if not isinstance(body, dict):
        raise RequestError(400, f"body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise RequestError(400, f"unknown field(s) {unknown}; allowed: {list(FIELDS)}")
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise RequestError(400, f"prompt must be a string (empty starts a new document), got {prompt!r}")
    max_tokens = _number(body, "max_tokens", int, min(DEFAULTS["max_tokens"], max_tokens_cap))
    temperature = _number(body, "temperature", float, DEFAULTS["temperature"])
    top_k = _number(body, "top_k", int, DEFAULTS["top_k"], nullable=True)
    top_p = _number(body, "top_p", float, DEFAULTS["top_p"], nullable=True)
    seed = _number(body, "seed", int, DEFAULTS["seed"], nullable=True)
    if not 1 <= max_tokens <= max_tokens_cap:
        raise RequestError(400, f"max_tokens must be in [1, {max_tokens_cap}], got {max_tokens}")
    if temperature != 0 and not MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE:
        raise RequestError(
            400, f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE:g}], got {temperature}"
        )
    if top_k is not None and top_k < 1:
        raise RequestError(400, f"top_k must be >= 1 or null, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise RequestError(400, f"top_p must be in (0, 1] or null, got {top_p}")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise RequestError(400, f"seed must be in [0, 2**63 - 1] or null, got {seed}")
    ids = encode(prompt)
    if len(ids) > max_prompt_tokens:
        raise RequestError(
            400,
            f"prompt is {len(ids)} tokens; the model's context allows at most "
            f"{max_prompt_tokens} (block_size - 1): shorten it",
        )
    return {
        "ids": ids,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "seed": seed,
    }


def plan_sub_batches(reqs: list[dict], block_size: int) -> list[list[int]]:
    """Indices of ``reqs`` grouped into calls of ``generate`` (see the module docstring for the rules)."""
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(reqs):
        if r["temperature"] == 0:
            key: tuple = ("greedy",)
        elif r["seed"] is not None:
            key = ("seeded", i)
        else:
            key = ("sampled", r["temperature"], r["top_k"], r["top_p"])
        groups.setdefault(key, []).append(i)
    plan = []
    for members in groups.values():
        # generate gives every row block_size + 1 - (longest prompt) steps at most
        rest = sorted(members, key=lambda i: len(reqs[i]["ids"]), reverse=True)
        while rest:
            room = block_size + 1 - len(reqs[rest[0]]["ids"])
            batch = [i for i in rest if _wanted(reqs[i], block_size) <= room]
            plan.append(batch)
            rest = [i for i in rest if i not in batch]
    return plan


def _wanted(req: dict, block_size: int) -> int:
    """Tokens this request can get alone: its max_tokens, cut where the context window ends."""
    return min(req["max_tokens"], block_size + 1 - len(req["ids"]))


def _finish(new: list[int], req: dict, eot: int) -> tuple[list[int], str]:
    """(tokens without end-of-text, finish reason: stop | length | context)."""
    if eot in new:
        return new[: new.index(eot)], "stop"
    return new, "length" if len(new) >= req["max_tokens"] else "context"


class GenerateServer:
    """One replica: the model, the tokenizer and the batching counters its /info reports."""

    def __init__(
        self,
        checkpoint_uri: str,
        max_batch_size: int,
        batch_wait_timeout_s: float,
        max_tokens_cap: int,
        endpoint_url: Optional[str],
        device: str,
        torch_threads: int,
    ):
        import torch

        from data_pipeline.tokenizer import EOT
        from model.flops import count_params
        from orchestration.evaluate.load import load_checkpoint_model

        torch.set_num_threads(torch_threads)
        self.model, self.cfg, self.enc, meta = load_checkpoint_model(
            checkpoint_uri, endpoint_url=endpoint_url, device=device
        )
        self.eot = self.enc.encode_single_token(EOT)
        self.max_tokens_cap = max_tokens_cap
        self._generate_batch.set_max_batch_size(max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.info = {
            "checkpoint": meta["checkpoint_uri"],
            "step": meta.get("step"),
            "model": asdict(self.cfg),
            "params": count_params(self.cfg),
            "tokenizer": {"name": self.enc.name, "n_vocab": self.enc.n_vocab},
            "limits": {
                "max_prompt_tokens": self.cfg.block_size - 1,
                "max_tokens_cap": max_tokens_cap,
                "max_batch_size": max_batch_size,
                "batch_wait_timeout_s": batch_wait_timeout_s,
            },
            "device": device,
            # a `raylm quantize` checkpoint: {"scheme", "group_size"}; None for full-precision weights
            "quantization": meta.get("quantization"),
        }
        self.stats = {
            "requests": 0,
            "rejected": 0,
            "failed": 0,
            "batches": 0,
            "generate_calls": 0,
            "max_batch_size_seen": 0,
            "batch_sizes": {},
        }

    async def __call__(self, request):
        from starlette.responses import JSONResponse

        path, method = request.url.path.rstrip("/") or "/", request.method
        routes = {"/generate": "POST", "/info": "GET", "/": "GET", "/health": "GET"}
        if path not in routes:
            return JSONResponse({"error": f"no route {path}; routes: {sorted(routes)}"}, status_code=404)
        if method != routes[path]:
            return JSONResponse({"error": f"{path} takes {routes[path]}, not {method}"}, status_code=405)
        if path == "/health":
            return JSONResponse({"status": "ok"})
        if path in ("/", "/info"):
            return JSONResponse({**self.info, "stats": self.stats})
        try:
            req = parse_request(
                await request.body(),
                content_type=request.headers.get("content-type", ""),
                encode=self._encode,
                max_prompt_tokens=self.cfg.block_size - 1,
                max_tokens_cap=self.max_tokens_cap,
            )
        except RequestError as e:
            self.stats["rejected"] += 1
            return JSONResponse({"error": str(e)}, status_code=e.status)
        result = await self._generate_batch(req)
        if isinstance(result, RequestError):
            return JSONResponse({"error": str(result)}, status_code=result.status)
        return JSONResponse(result)

    def _encode(self, prompt: str) -> list[int]:
        # Special tokens in the text are honoured (as `raylm generate`); empty starts a new document
        return self.enc.encode(prompt, allowed_special="all") or [self.eot]

    async def _run(self, reqs: list[dict]) -> list[dict | RequestError]:
        """Answer one serve batch: generate per sub-batch off the event loop, so requests keep queueing.

        Each answer is a result dict, or a RequestError (500) for a request that failed by itself.
        """
        n = len(reqs)
        self.stats["requests"] += n
        self.stats["batches"] += 1
        self.stats["max_batch_size_seen"] = max(self.stats["max_batch_size_seen"], n)
        self.stats["batch_sizes"][str(n)] = self.stats["batch_sizes"].get(str(n), 0) + 1
        results: list[dict | RequestError | None] = [None] * n
        for sub in plan_sub_batches(reqs, self.cfg.block_size):
            outs = await asyncio.to_thread(self._generate_isolated, [reqs[i] for i in sub])
            for i, out in zip(sub, outs):
                results[i] = (
                    out if isinstance(out, RequestError) else {**out, "batch_size": n, "generate_batch_size": len(sub)}
                )
        return results

    def _generate_isolated(self, reqs: list[dict]) -> list[dict | RequestError]:
        """``_generate`` for a sub-batch; when the shared call fails, each request runs alone, so only
        a request that fails by itself gets an error (logged with its traceback, answered as a 500)."""
        try:
            self.stats["generate_calls"] += 1
            return self._generate(reqs)
        except Exception as err:
            if len(reqs) > 1:
                logger.warning("generate failed for a sub-batch of %d (%s); retrying each alone", len(reqs), err)
                return [out for r in reqs for out in self._generate_isolated([r])]
            logger.exception("generate failed for a request (prompt of %d tokens)", len(reqs[0]["ids"]))
            self.stats["failed"] += 1
            return [RequestError(500, f"generation failed for this request: {type(err).__name__}: {err}")]

    def _generate(self, reqs: list[dict]) -> list[dict]:
        from model.generate import generate

        first = reqs[0]  # a sub-batch shares its sampling settings
        new = generate(
            self.model,
            [r["ids"] for r in reqs],
            max(_wanted(r, self.cfg.block_size) for r in reqs),
            temperature=first["temperature"],
            top_k=first["top_k"],
            top_p=first["top_p"],
            eos_id=self.eot,
            seed=first["seed"],
        )
        out = []
        for r, tokens in zip(reqs, new):
            tokens, reason = _finish(tokens[: r["max_tokens"]], r, self.eot)
            out.append(
                {
                    "text": self.enc.decode(tokens),
                    "tokens": tokens,
                    "finish_reason": reason,
                    "prompt_tokens": len(r["ids"]),
                    "completion_tokens": len(tokens),
                }
            )
        return out


def keep_replica_grpc_on_node_address() -> None:
    """In a Serve replica on a loopback node (a Ray `raylm serve` started itself): bind the replica's
    inter-deployment gRPC server to 127.0.0.1 instead of Ray 2.60's hard-coded [::]:0.

    Serve binds it through ``replica.add_port_to_grpc_server`` after the user's class is built and has
    no setting for the host, so that module-level name is wrapped here, before. A cluster node (a
    routable address) keeps Serve's binding.
    """
    import ray
    from ray.serve._private import replica

    host = ray.util.get_node_ip_address()
    bind = getattr(replica, "add_port_to_grpc_server", None)
    if not ipaddress.ip_address(host).is_loopback or getattr(bind, "raylm_node_address", False):
        return
    if bind is None:
        logger.warning("this Ray's Serve replica has no add_port_to_grpc_server: its gRPC server stays on [::]")
        return
    node = f"[{host}]" if ":" in host else host

    def bind_to_node(server, address: str) -> int:
        return bind(server, node + address[len("[::]") :] if address.startswith("[::]:") else address)

    bind_to_node.raylm_node_address = True
    replica.add_port_to_grpc_server = bind_to_node


def _deployment_class():
    """GenerateServer with the batched method bound; built lazily so importing this module needs no Serve."""
    from ray import serve

    class RaylmGenerator(GenerateServer):
        def __init__(self, *args):
            keep_replica_grpc_on_node_address()  # before Serve starts the replica's gRPC server
            super().__init__(*args)

        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
        async def _generate_batch(self, reqs: list[dict]) -> list[dict]:
            return await self._run(reqs)

    return serve.deployment(name="raylm-generate")(RaylmGenerator)


def build_app(
    checkpoint_uri: str,
    *,
    max_batch_size: int = 8,
    batch_wait_timeout_s: float = 0.01,
    max_tokens_cap: int = 512,
    endpoint_url: Optional[str] = None,
    num_replicas: int = 1,
    num_cpus_per_replica: float = 1.0,
    device: str = "cpu",
):
    """A Ray Serve application (pass it to ``serve.run``) answering the routes in the module docstring."""
    if max_batch_size < 1 or batch_wait_timeout_s < 0 or max_tokens_cap < 1 or num_replicas < 1:
        raise ValueError(
            f"need max_batch_size >= 1 (got {max_batch_size}), batch_wait_timeout_s >= 0 "
            f"(got {batch_wait_timeout_s}), max_tokens_cap >= 1 (got {max_tokens_cap}), "
            f"num_replicas >= 1 (got {num_replicas})"
        )
    actor_options = {"num_cpus": num_cpus_per_replica}
    if device.startswith("cuda"):
        actor_options["num_gpus"] = 1
    # Room for a full batch waiting while the previous one generates (Serve's default admits only 5)
    deployment = _deployment_class().options(
        num_replicas=num_replicas, max_ongoing_requests=2 * max_batch_size, ray_actor_options=actor_options
    )
    return deployment.bind(
        checkpoint_uri,
        max_batch_size,
        batch_wait_timeout_s,
        max_tokens_cap,
        endpoint_url,
        device,
        max(1, int(num_cpus_per_replica)),
    )


def run_server(
    checkpoint_uri: str,
    *,
    port: int = 8000,
    host: str = "127.0.0.1",
    max_batch_size: int = 8,
    batch_wait_timeout_s: float = 0.01,
    max_tokens_cap: int = 512,
    num_replicas: int = 1,
    endpoint_url: Optional[str] = None,
    device: str = "cpu",
    address: Optional[str] = None,
) -> None:
    """Start Ray (or join ``address``), serve the checkpoint on http://host:port and block until Ctrl-C."""
    from ray import serve

    from orchestration.runtime import init_ray

    init_ray(address)
    app = build_app(
        checkpoint_uri,
        max_batch_size=max_batch_size,
        batch_wait_timeout_s=batch_wait_timeout_s,
        max_tokens_cap=max_tokens_cap,
        endpoint_url=endpoint_url,
        num_replicas=num_replicas,
        device=device,
    )
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name="raylm", route_prefix="/")
    url = f"http://{host}:{port}"
    print(f"serving {checkpoint_uri} at {url} ({num_replicas} replica(s), batches of up to {max_batch_size})")
    print(
        f"  curl -s {url}/generate -H 'Content-Type: application/json' "
        '-d \'{"prompt": "Once upon a time", "max_tokens": 32, "temperature": 0.8}\''
    )
    print(f"  curl -s {url}/info")
    print("Ctrl-C to stop")
    signal.signal(signal.SIGTERM, _raise_interrupt)  # `kill` / a container stop shut Serve down cleanly too
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("stopping")
    finally:
        serve.shutdown()


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def cmd_serve(args: argparse.Namespace) -> int:
    run_server(
        args.checkpoint,
        port=args.port,
        host=args.host,
        max_batch_size=args.max_batch_size,
        batch_wait_timeout_s=args.batch_wait_timeout_s,
        max_tokens_cap=args.max_tokens_cap,
        num_replicas=args.num_replicas,
        endpoint_url=args.endpoint_url,
        device=args.device,
    )
    return 0


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Add `serve` to the CLI's subparsers (handler: ``cmd_serve``)."""
    p = subparsers.add_parser(
        "serve",
        help="serve a checkpoint over HTTP with Ray Serve (batched generation)",
        description="HTTP generate endpoint for a checkpoint on Ray Serve: POST /generate, "
        "GET /info, GET /health. Blocks until Ctrl-C.",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a checkpoint directory/URI (checkpoint_NNNNNN), a run directory or a raylm export",
    )
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 exposes it)")
    p.add_argument("--max-batch-size", type=int, default=8, help="requests batched into one step at most (default 8)")
    p.add_argument(
        "--batch-wait-timeout-s",
        type=float,
        default=0.01,
        help="how long a batch waits to fill before it runs (default 0.01)",
    )
    p.add_argument("--max-tokens-cap", type=int, default=512, help="largest max_tokens a request may ask (default 512)")
    p.add_argument("--num-replicas", type=int, default=1, help="model replicas behind the endpoint (default 1)")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint for s3:// URIs (MinIO, R2)")
    p.add_argument("--device", default="cpu", help="torch device per replica, e.g. cpu, cuda (default cpu)")
    p.set_defaults(func=cmd_serve)
    return p
