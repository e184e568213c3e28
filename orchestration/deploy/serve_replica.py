"""One `raylm serve` replica: the model (quantized at load if asked), the tokenizer, and the answer
to a /generate request, whole or streamed, from the steps of the serve batch it joined.

``serve.py`` puts this class behind Serve's FastAPI ingress and ``@serve.batch``; tests build it
in-process (``serve._deployment_class().func_or_class``).
"""

from __future__ import annotations

import asyncio
import codecs
import json
import time
import weakref
from dataclasses import asdict
from typing import AsyncIterator, Optional

from orchestration.deploy.serve_batch import BatchDecoder, Step
from orchestration.deploy.serve_metrics import CLIENT_GONE, ServeMetrics
from orchestration.deploy.serve_request import GenerateRequest, Job, RequestError, check_content_type, to_job

QUANTIZE_GROUP_SIZE = 32  # int4 columns per scale for --quantize, as `raylm quantize` defaults


class GenerateServer:
    """One replica: the model, the tokenizer, the batching counters its /info reports and its metrics.

    Built by Serve in a replica process (``serve.py`` adds the routes and the batch method), or in-process
    by tests.
    """

    def __init__(
        self,
        checkpoint_uri: str,
        max_batch_size: int,
        batch_wait_timeout_s: float,
        max_tokens_cap: int,
        endpoint_url: Optional[str],
        device: str,
        torch_threads: int,
        quantize: Optional[str] = None,
    ):
        import torch

        from data_pipeline.tokenizer import EOT
        from model.flops import count_params
        from orchestration.evaluate.load import load_checkpoint_model

        torch.set_num_threads(torch_threads)
        self.model, self.cfg, self.enc, meta = load_checkpoint_model(
            checkpoint_uri, endpoint_url=endpoint_url, device=device
        )
        quantization = meta.get("quantization")  # a `raylm quantize` checkpoint: {"scheme", "group_size"}
        if quantize is not None:
            self.model = quantize_at_load(self.model, self.cfg, meta, quantize).to(device).eval()
            quantization = {"scheme": quantize, "group_size": QUANTIZE_GROUP_SIZE if quantize == "int4" else None}
        self.eot = self.enc.encode_single_token(EOT)
        self.max_tokens_cap = max_tokens_cap
        self._generate_batch.set_max_batch_size(max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.info = {
            "checkpoint": meta["checkpoint_uri"],
            "step": meta.get("step"),
            "model": asdict(self.cfg),
            "params": count_params(self.cfg),
            "model_bytes": weight_bytes(self.model),
            "tokenizer": {"name": self.enc.name, "n_vocab": self.enc.n_vocab},
            "limits": {
                "max_prompt_tokens": self.cfg.block_size - 1,
                "max_tokens_cap": max_tokens_cap,
                "max_batch_size": max_batch_size,
                "batch_wait_timeout_s": batch_wait_timeout_s,
            },
            "device": device,
            # None for full-precision weights; quantized_at_load: by --quantize, not `raylm quantize`
            "quantization": None if quantization is None else {**quantization, "quantized_at_load": bool(quantize)},
        }
        self.stats = {
            "requests": 0,
            "streamed": 0,
            "rejected": 0,
            "failed": 0,
            "abandoned": 0,
            "batches": 0,
            "generate_calls": 0,
            "max_batch_size_seen": 0,
            "batch_sizes": {},
        }
        self.metrics = ServeMetrics()

    def _encode(self, prompt: str) -> list[int]:
        # Special tokens in the text are honoured (as `raylm generate`); empty starts a new document
        return self.enc.encode(prompt, allowed_special="all") or [self.eot]

    def refused(self, error: RequestError, stream: bool = False):
        """The {"error"} response of a /generate request refused before it joined a batch, counted."""
        from starlette.responses import JSONResponse

        self.stats["rejected"] += 1
        self.metrics.refused(error.status, stream)
        return JSONResponse({"error": str(error)}, status_code=error.status)

    async def answer(self, body: GenerateRequest, content_type: str):
        """POST /generate: validate against the model, join a batch, answer whole or as a stream."""
        from starlette.responses import JSONResponse, StreamingResponse

        t0 = time.perf_counter()
        try:
            check_content_type(content_type)  # FastAPI parses any JSON-ish type; the contract is JSON
            job = to_job(
                body,
                encode=self._encode,
                max_prompt_tokens=self.cfg.block_size - 1,
                max_tokens_cap=self.max_tokens_cap,
            )
        except RequestError as e:
            return self.refused(e, body.stream)
        request = _Admitted(self.metrics, job, body.stream, t0)
        steps = self._generate_batch(job)
        try:
            first = await _next(steps)
            if first.error is not None:  # failed before its first token: a plain error status
                request.end(first.error.status)
                return JSONResponse({"error": str(first.error)}, status_code=first.error.status)
            request.first_token(first)
            if body.stream:
                self.stats["streamed"] += 1
                events = self._events(request, first, steps)
                # A stream dropped before its first event never runs its own cleanup: end it then
                weakref.finalize(events, request.end, CLIENT_GONE).atexit = False
                return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            tokens, step = list(first.tokens), first
            while step.finish_reason is None:
                step = await _next(steps)
                tokens += step.tokens
                request.tokens += len(step.tokens)
        except asyncio.CancelledError:  # the client went away (Serve cancels its request)
            request.end(CLIENT_GONE)
            raise
        if step.error is not None:
            request.end(step.error.status)
            return JSONResponse({"error": str(step.error)}, status_code=step.error.status)
        request.end(200)
        return {
            "text": self.enc.decode(tokens),
            "tokens": tokens,
            "finish_reason": step.finish_reason,
            "prompt_tokens": len(job.ids),
            "completion_tokens": len(tokens),
            "batch_size": step.batch_size,
            "generate_batch_size": step.generate_batch_size,
        }

    async def _events(self, request: _Admitted, step: Step, steps: AsyncIterator[Step]):
        """The text/event-stream of one request, from its first step on; ends ``request`` when it
        ends, or when the client goes away mid-stream (then the batch stops decoding for it)."""
        from fastapi.sse import format_sse_event

        def event(payload: dict) -> bytes:
            return format_sse_event(data_str=json.dumps(payload))

        # Tokens are byte sequences: a character split across tokens is sent once it is whole
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        status = CLIENT_GONE  # until the last step is in
        try:
            while True:
                text = utf8.decode(b"".join(self.enc.decode_single_token_bytes(t) for t in step.tokens))
                if step.finish_reason is not None:
                    break
                if text:
                    yield event({"text": text})
                step = await _next(steps)
                request.tokens += len(step.tokens)
            last = {"text": text + utf8.decode(b"", final=True), "finish_reason": step.finish_reason}
            status = 200
            if step.error is not None:
                status, last = step.error.status, {"error": str(step.error), "finish_reason": "error"}
            yield event({**last, "prompt_tokens": len(request.job.ids), "completion_tokens": request.tokens})
            yield format_sse_event(data_str="[DONE]")
        finally:
            request.end(status)

    async def run_batch(self, jobs: list[Job]) -> AsyncIterator[list[Optional[Step]]]:
        """Decode one serve batch: per step, each request's Step (None once it has finished). Each step
        runs off the event loop, so requests keep arriving and streams keep flowing meanwhile."""
        n = len(jobs)
        self.stats["requests"] += n
        self.stats["batches"] += 1
        self.stats["max_batch_size_seen"] = max(self.stats["max_batch_size_seen"], n)
        self.stats["batch_sizes"][str(n)] = self.stats["batch_sizes"].get(str(n), 0) + 1
        self.metrics.batched(n)
        decoder = BatchDecoder(jobs, self._start_steps, block_size=self.cfg.block_size, eot=self.eot, stats=self.stats)
        while not decoder.done:
            yield await asyncio.to_thread(decoder.step)

    def _start_steps(self, prompts: list[list[int]], max_new_tokens: int, job: Job):
        from model.generate import generate_steps

        return generate_steps(
            self.model,
            prompts,
            max_new_tokens,
            temperature=job.temperature,
            top_k=job.top_k,
            top_p=job.top_p,
            eos_id=self.eot,
            seed=job.seed,
        )


class _Admitted:
    """One admitted /generate request until it ends: its timings and tokens for the metrics, and its
    ``Job.stop``, set when it ends so the batch decodes nothing more for it. ``end`` counts once,
    whichever path gets there first (answered, failed, or the client went away)."""

    def __init__(self, metrics: ServeMetrics, job: Job, stream: bool, t0: float):
        self.metrics, self.job, self.stream, self.t0 = metrics, job, stream, t0
        self.tokens = 0
        self.queued = True  # no first token yet
        self.ended = False
        metrics.admitted()

    def first_token(self, step: Step) -> None:
        self.tokens += len(step.tokens)
        self.queued = False
        self.metrics.first_token(time.perf_counter() - self.t0, self.stream)

    def end(self, status: int) -> None:
        if self.ended:
            return
        self.ended = True
        self.job.stop.set()
        self.metrics.finished(status, time.perf_counter() - self.t0, self.tokens, self.stream, queued=self.queued)


async def _next(steps: AsyncIterator[Step]) -> Step:
    """A request's next Step; a batch that broke as a whole (not one request's generation) gives an error."""
    try:
        return await anext(steps)
    except Exception as err:
        return Step([], "error", RequestError(500, f"generation failed: {type(err).__name__}: {err}"))


def quantize_at_load(model, cfg, meta: dict, scheme: str):
    """``model`` (fp32, as loaded) with weight-only ``scheme`` weights, as `raylm quantize` would write
    them; CheckpointError for a checkpoint that is already quantized or not a GPT."""
    from model.quantize import build_quantized_model, quantize_weights
    from orchestration.checkpoint_format import CheckpointError

    if meta.get("quantization"):
        raise CheckpointError(
            f"{meta['checkpoint_uri']} is already quantized ({meta['quantization'].get('scheme')}): "
            "serve it without --quantize"
        )
    if cfg.arch != "gpt":
        raise CheckpointError(f"{meta['checkpoint_uri']}: --quantize needs a GPT checkpoint, this one is {cfg.arch!r}")
    tensors, spec = quantize_weights(model, scheme, QUANTIZE_GROUP_SIZE)
    return build_quantized_model(cfg, tensors, spec)


def weight_bytes(model) -> int:
    """Bytes of the model's stored tensors (parameters and persistent buffers; a tied one once)."""
    seen: dict[int, int] = {}
    for t in model.state_dict().values():
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())
