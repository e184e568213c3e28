"""`raylm serve` on the command line: its options, how many replicas (a fixed count or Serve's
autoscaler), and the process that starts Ray, deploys ``serve.build_app`` and blocks until Ctrl-C."""

from __future__ import annotations

import argparse
import math
import signal
import sys
import time
from typing import Optional

from orchestration.arg_types import non_negative_int, positive_int

AUTOSCALING_FLAGS = "--min-replicas/--max-replicas/--target-ongoing-requests"


class ServeOptionError(ValueError):
    """Options of `raylm serve` that contradict each other; the message says which and what to do."""


def autoscaling_config(
    *,
    min_replicas: Optional[int],
    max_replicas: Optional[int],
    target_ongoing_requests: Optional[float],
    num_replicas_given: bool,
    max_batch_size: int,
) -> Optional[dict]:
    """Serve's autoscaling_config for the flags, or None when none was given (a fixed --num-replicas).

    A replica counts as busy when it holds a full batch, so the target number of ongoing requests per
    replica defaults to ``max_batch_size``; Serve's own delays (30 s up, 600 s down) apply.
    """
    if min_replicas is None and max_replicas is None and target_ongoing_requests is None:
        return None
    if num_replicas_given:
        raise ServeOptionError(
            f"--num-replicas fixes the number of replicas and {AUTOSCALING_FLAGS} let Serve scale it: "
            "give one or the other"
        )
    if max_replicas is None:
        raise ServeOptionError(f"autoscaling ({AUTOSCALING_FLAGS}) needs --max-replicas, the most replicas to run")
    min_replicas = 1 if min_replicas is None else min_replicas
    if min_replicas > max_replicas:
        raise ServeOptionError(f"--min-replicas {min_replicas} is more than --max-replicas {max_replicas}")
    target = float(max_batch_size) if target_ongoing_requests is None else target_ongoing_requests
    return {"min_replicas": min_replicas, "max_replicas": max_replicas, "target_ongoing_requests": target}


def run_server(
    checkpoint_uri: str,
    *,
    port: int = 8000,
    host: str = "127.0.0.1",
    max_batch_size: int = 8,
    batch_wait_timeout_s: float = 0.01,
    max_tokens_cap: int = 512,
    num_replicas: int = 1,
    autoscaling: Optional[dict] = None,
    endpoint_url: Optional[str] = None,
    device: str = "cpu",
    quantize: Optional[str] = None,
    address: Optional[str] = None,
) -> None:
    """Start Ray (or join ``address``), serve the checkpoint on http://host:port and block until Ctrl-C."""
    from ray import serve

    from orchestration.deploy.serve import build_app
    from orchestration.runtime import init_ray

    if quantize is not None:
        refuse_quantized(checkpoint_uri, endpoint_url)  # before Ray starts, not in a replica's log
    init_ray(address)
    app = build_app(
        checkpoint_uri,
        max_batch_size=max_batch_size,
        batch_wait_timeout_s=batch_wait_timeout_s,
        max_tokens_cap=max_tokens_cap,
        endpoint_url=endpoint_url,
        num_replicas=num_replicas,
        autoscaling_config=autoscaling,
        device=device,
        quantize=quantize,
    )
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name="raylm", route_prefix="/")
    url = f"http://{host}:{port}"
    replicas = (
        f"{autoscaling['min_replicas']}-{autoscaling['max_replicas']} replicas, autoscaled to "
        f"{autoscaling['target_ongoing_requests']:g} ongoing requests each"
        if autoscaling
        else f"{num_replicas} replica(s)"
    )
    weights = f", weights quantized to {quantize} at load" if quantize else ""
    print(f"serving {checkpoint_uri} at {url} ({replicas}, batches of up to {max_batch_size}{weights})")
    print(
        f"  curl -s {url}/generate -H 'Content-Type: application/json' "
        '-d \'{"prompt": "Once upon a time", "max_tokens": 32, "temperature": 0.8}\''
    )
    print(f'  add "stream": true for text/event-stream (curl -N); {url}/info; API docs at {url}/docs')
    print("Ctrl-C to stop")
    signal.signal(signal.SIGTERM, _raise_interrupt)  # `kill` / a container stop shut Serve down cleanly too
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("stopping")
    finally:
        serve.shutdown()


def refuse_quantized(checkpoint_uri: str, endpoint_url: Optional[str]) -> None:
    """CheckpointError when ``checkpoint_uri`` already holds quantized weights (--quantize needs fp32)."""
    from orchestration.artifacts import RunDir
    from orchestration.checkpoint_format import CheckpointError, checkpoint_meta, is_quantized

    meta = checkpoint_meta(RunDir.at(checkpoint_uri, endpoint_url))
    if is_quantized(meta):
        scheme = meta.get("quantization", {}).get("scheme", "quantized")
        raise CheckpointError(
            f"{checkpoint_uri} already holds {scheme} weights (`raylm quantize`): serve it without --quantize, "
            f"or quantize its fp32 source {meta.get('checkpoint', '')} at load".rstrip()
        )


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        autoscaling = autoscaling_config(
            min_replicas=args.min_replicas,
            max_replicas=args.max_replicas,
            target_ongoing_requests=args.target_ongoing_requests,
            num_replicas_given=args.num_replicas_given,
            max_batch_size=args.max_batch_size,
        )
    except ServeOptionError as err:
        print(f"raylm serve: error: {err}", file=sys.stderr)
        return 2
    run_server(
        args.checkpoint,
        port=args.port,
        host=args.host,
        max_batch_size=args.max_batch_size,
        batch_wait_timeout_s=args.batch_wait_timeout_s,
        max_tokens_cap=args.max_tokens_cap,
        num_replicas=args.num_replicas,
        autoscaling=autoscaling,
        endpoint_url=args.endpoint_url,
        device=args.device,
        quantize=args.quantize,
    )
    return 0


class _Given(argparse.Action):
    """Stores the value and records that the option was given (its default cannot tell)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        setattr(namespace, f"{self.dest}_given", True)


def _positive_number(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Add `serve` to the CLI's subparsers (handler: ``cmd_serve``)."""
    p = subparsers.add_parser(
        "serve",
        help="serve a checkpoint over HTTP with Ray Serve (batched, streamed, autoscaled generation)",
        description='HTTP generate endpoint for a checkpoint on Ray Serve: POST /generate ("stream": true '
        "for server-sent events), GET /info, GET /health, API docs at /docs. Blocks until Ctrl-C.",
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a checkpoint directory/URI (checkpoint_NNNNNN), a run directory, a raylm export or a "
        "`raylm quantize` output",
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
    p.add_argument(
        "--num-replicas", type=int, default=1, action=_Given, help="a fixed number of model replicas (default 1)"
    )
    p.add_argument(
        "--min-replicas",
        type=non_negative_int,
        default=None,
        help="autoscaling: fewest replicas (default 1; 0 lets Serve scale to zero)",
    )
    p.add_argument("--max-replicas", type=positive_int, default=None, help="autoscaling: most replicas (required)")
    p.add_argument(
        "--target-ongoing-requests",
        type=_positive_number,
        default=None,
        help="autoscaling: requests per replica Serve scales to keep (default: --max-batch-size)",
    )
    p.add_argument(
        "--quantize",
        choices=["int8", "int4"],
        default=None,
        help="quantize an fp32 checkpoint's weights as it loads (int4: groups of 32 columns); "
        "a `raylm quantize` checkpoint is served as it is",
    )
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint for s3:// URIs (MinIO, R2)")
    p.add_argument("--device", default="cpu", help="torch device per replica, e.g. cpu, cuda (default cpu)")
    p.set_defaults(func=cmd_serve, num_replicas_given=False)
    return p
