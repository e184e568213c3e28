"""`raylm serve`: a checkpoint behind an HTTP generate endpoint, on Ray Serve's FastAPI ingress.

Routes (errors are {"error": message} with a 4xx/5xx status; OpenAPI docs at /docs, /openapi.json):
  POST /generate  ``serve_request.GenerateRequest``: {"prompt", "max_tokens"?, "temperature"?, "top_k"?,
                  "top_p"?, "seed"?, "stream"?} with Content-Type: application/json (else 415)
                  -> {"text", "tokens", "finish_reason", "prompt_tokens", "completion_tokens", "batch_size",
                  "generate_batch_size"}; with "stream": true, text/event-stream: one
                  ``data: {"text": ...}`` event per generated token (a token that ends inside a UTF-8
                  character waits for the next), a last event with "finish_reason" (stop | length |
                  context), "prompt_tokens" and "completion_tokens" (or "error"), then ``data: [DONE]``
  GET  /info      model config, parameter count, weight bytes and quantization, limits and the batching
                  counters of the replica answering (also GET /)
  GET  /health    {"status": "ok"}

Batching and streaming: every /generate request, streamed or not, goes through one ``@serve.batch``
async generator (Serve's batching of generators): a batch is decoded one token per step for all of
its requests (``serve_batch.BatchDecoder``) and each step is handed to each request as it comes; a
streamed request sends it on, a whole one collects it. So streamed requests share batches (and their
throughput) with whole ones, a stream's first token comes after the batch wait and one prefill,
and there is one sampling path. Serving streams one request at a time would give up batching for
exactly the clients that keep connections open longest. What it costs: a request arriving while a
batch decodes waits for that batch to end (``max_concurrent_batches=1``: two batches at once would
fight for the same cores; continuous batching, joining a running batch, is not done here). A client
that goes away mid-answer (Serve cancels its request) is dropped from its batch at the next step, so
the batch ends when nobody is left to read it instead of decoding to max_tokens for no one; /info's
"abandoned" counts them and the request counter tags them status 499.

Replicas: ``--num-replicas`` fixes the count; ``--min-replicas``/``--max-replicas``/
``--target-ongoing-requests`` hand it to Serve's autoscaler instead (not both).
``--quantize int8|int4`` quantizes an fp32 checkpoint as it loads; a `raylm quantize` checkpoint is
served as it is. Metrics: ``serve_metrics`` (Prometheus, through Ray), shown by
dashboards/raylm_serve.json.

Network: the HTTP proxy binds --host (127.0.0.1 by default). A Ray that `raylm serve` starts itself
has 127.0.0.1 as its node address (``orchestration.runtime``), so Ray's own servers and Serve's
controller, proxy and replicas listen on loopback only. The one exception Ray 2.60 has no setting for
is each replica's inter-deployment gRPC server, hard-coded to [::]:0 (every interface) in
``ray/serve/_private/replica.py``: ``keep_replica_grpc_on_node_address`` binds it to the node address
when that is loopback. On a cluster it keeps Serve's binding (the other nodes reach it), accepts only
calls carrying the cluster's auth token (Ray's token authentication, on by default in 2.60) and uses
TLS when RAY_USE_TLS=1: the cluster files let only the cluster's own nodes reach it.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the route methods' annotations
# (GenerateRequest, Request) as objects, and they are imported inside ``_app_and_replica_class``.
import ipaddress
import logging
from typing import Optional

from orchestration.deploy.serve_cli import add_serve_parser, cmd_serve  # noqa: F401  (cli.py's entry points)

logger = logging.getLogger("ray.serve")


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


def _app_and_replica_class():
    """(the FastAPI app, the replica class whose methods are its routes); built lazily so importing
    this module needs neither Serve nor FastAPI."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from ray import serve
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse

    from orchestration.deploy.serve_replica import GenerateServer
    from orchestration.deploy.serve_request import (
        MAX_BODY_BYTES,
        BodyLimit,
        GenerateRequest,
        Job,
        RequestError,
        check_content_type,
        validation_message,
    )

    app = FastAPI(title="raylm serve", description="Text generation from a raylm checkpoint (Ray Serve).")
    app.add_middleware(BodyLimit)  # a 413 while the body is read, before it is parsed

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError):
        """FastAPI's 422 -> a 415 for a body that is not JSON, else a 400 naming the field."""
        replica = serve.get_replica_context().servable_object
        try:
            check_content_type(request.headers.get("content-type", ""))
        except RequestError as e:
            return replica.refused(e)
        return replica.refused(RequestError(400, validation_message(exc.errors())))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        """Starlette's own refusals (no route, wrong method, body too large) as {"error": message}."""
        path, method = request.url.path, request.method
        if exc.status_code == 404:
            message = f"no route {path}; routes: {sorted(request.app.openapi()['paths'])} (API docs: /docs)"
        elif exc.status_code == 405:
            message = f"{path} takes {(exc.headers or {}).get('Allow', 'another method')}, not {method}"
        elif exc.status_code == 413:
            error = RequestError(413, f"request body is over the {MAX_BODY_BYTES}-byte limit")
            return serve.get_replica_context().servable_object.refused(error)
        else:
            message = str(exc.detail)
        return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)

    class RaylmGenerator(GenerateServer):
        def __init__(self, *args):
            keep_replica_grpc_on_node_address()  # before Serve starts the replica's gRPC server
            super().__init__(*args)

        @app.post(
            "/generate",
            responses={200: {"content": {"text/event-stream": {}}, "description": "the text, or its stream"}},
        )
        async def generate(self, body: GenerateRequest, request: Request):
            """Continue the prompt; "stream": true answers text/event-stream (see the module docstring)."""
            return await self.answer(body, request.headers.get("content-type", ""))

        @app.get("/info")
        async def get_info(self) -> dict:
            """Model, limits, weights and the batching counters of the replica answering."""
            return {**self.info, "stats": self.stats}

        @app.get("/", include_in_schema=False)
        async def root(self) -> dict:
            return {**self.info, "stats": self.stats}

        @app.get("/health")
        async def health(self) -> dict:
            return {"status": "ok"}

        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
        async def _generate_batch(self, jobs: list[Job]):
            async for steps in self.run_batch(jobs):
                # Serve's end-of-stream marker for a request that has finished
                yield [StopIteration if step is None else step for step in steps]

    return app, RaylmGenerator


def _deployment_class():
    """The replica class as a Serve deployment without its HTTP ingress: tests build it in-process
    (``.func_or_class(*args)``; the ingress wrapper's ``__init__`` is async). ``build_app`` serves the
    same class behind ``serve.ingress``."""
    from ray import serve

    return serve.deployment(name="raylm-generate")(_app_and_replica_class()[1])


def build_app(
    checkpoint_uri: str,
    *,
    max_batch_size: int = 8,
    batch_wait_timeout_s: float = 0.01,
    max_tokens_cap: int = 512,
    endpoint_url: Optional[str] = None,
    num_replicas: int = 1,
    autoscaling_config: Optional[dict] = None,
    num_cpus_per_replica: float = 1.0,
    device: str = "cpu",
    quantize: Optional[str] = None,
):
    """A Ray Serve application (pass it to ``serve.run``) answering the routes in the module docstring.

    ``autoscaling_config`` (Serve's AutoscalingConfig fields, as ``serve_cli.autoscaling_config`` makes
    them from the CLI flags) replaces the fixed ``num_replicas``; ``quantize`` ("int8" | "int4")
    quantizes an fp32 checkpoint's weights as each replica loads them.
    """
    from ray import serve

    if max_batch_size < 1 or batch_wait_timeout_s < 0 or max_tokens_cap < 1 or num_replicas < 1:
        raise ValueError(
            f"need max_batch_size >= 1 (got {max_batch_size}), batch_wait_timeout_s >= 0 "
            f"(got {batch_wait_timeout_s}), max_tokens_cap >= 1 (got {max_tokens_cap}), "
            f"num_replicas >= 1 (got {num_replicas})"
        )
    if quantize not in (None, "int8", "int4"):
        raise ValueError(f"quantize must be int8, int4 or None, got {quantize!r}")
    actor_options = {"num_cpus": num_cpus_per_replica}
    if device.startswith("cuda"):
        actor_options["num_gpus"] = 1
    app, replica_class = _app_and_replica_class()
    replicas = {"autoscaling_config": autoscaling_config} if autoscaling_config else {"num_replicas": num_replicas}
    # Room for a full batch waiting while the previous one generates (Serve's default admits only 5)
    deployment = serve.deployment(name="raylm-generate")(serve.ingress(app)(replica_class))
    deployment = deployment.options(
        max_ongoing_requests=2 * max_batch_size, ray_actor_options=actor_options, **replicas
    )
    return deployment.bind(
        checkpoint_uri,
        max_batch_size,
        batch_wait_timeout_s,
        max_tokens_cap,
        endpoint_url,
        device,
        max(1, int(num_cpus_per_replica)),
        quantize,
    )
