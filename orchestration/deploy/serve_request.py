"""`raylm serve`'s request contract: the pydantic model of a /generate body, the checks that need the
served model (prompt length, the max_tokens cap), and the handlers that turn every refusal into
``{"error": message}`` with a 4xx naming the field.

FastAPI validates the body against ``GenerateRequest`` before the route runs; its 422 (and its
``{"detail": [...]}`` body) becomes a 400 whose message starts with the field's name, a non-JSON
Content-Type a 415 and a body over ``MAX_BODY_BYTES`` a 413 (``BodyLimit``, while it is read).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

MAX_BODY_BYTES = 1 << 20
DEFAULT_MAX_TOKENS = 64  # capped at the server's max_tokens_cap
# Below this, logits / temperature overflow float32 (NaN probabilities); above it sampling is uniform
# noise. 0 means greedy.
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-3, 100.0
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit integer
JSON_TYPE = "application/json"
EXAMPLE_BODY = '{"prompt": "Once upon a time", "max_tokens": 32}'


class RequestError(ValueError):
    """A request the server refuses, with the HTTP status and a message saying what to send instead."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class GenerateRequest(BaseModel):
    """The body of POST /generate. Strict JSON types: "8" is not an integer, 8.0 not a max_tokens,
    true not a number, NaN and infinities not numbers; unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    prompt: str = Field(description="text to continue; empty starts a new document")
    max_tokens: Optional[int] = Field(
        None, description=f"tokens to generate, 1 to the server's max_tokens_cap (default {DEFAULT_MAX_TOKENS})"
    )
    temperature: float = Field(0.8, description=f"0 (greedy) or in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE:g}]")
    top_k: Optional[int] = Field(50, description=">= 1, or null for no top-k filter")
    top_p: Optional[float] = Field(None, description="nucleus mass in (0, 1], or null for none")
    seed: Optional[int] = Field(None, description="[0, 2**63 - 1]: the same text as `raylm generate --seed`")
    stream: bool = Field(False, description='true: text/event-stream of data: {"text": ...} events, then [DONE]')

    @field_validator("temperature")
    @classmethod
    def _temperature_in_range(cls, value: float) -> float:
        if value != 0 and not MIN_TEMPERATURE <= value <= MAX_TEMPERATURE:
            raise ValueError(
                f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE:g}], got {value}"
            )
        return value

    @field_validator("top_k")
    @classmethod
    def _top_k_positive(cls, value: Optional[int]) -> Optional[int]:
        if value is not None and value < 1:
            raise ValueError(f"top_k must be >= 1 or null, got {value}")
        return value

    @field_validator("top_p")
    @classmethod
    def _top_p_a_probability(cls, value: Optional[float]) -> Optional[float]:
        if value is not None and not 0 < value <= 1:
            raise ValueError(f"top_p must be in (0, 1] or null, got {value}")
        return value

    @field_validator("seed")
    @classmethod
    def _seed_in_range(cls, value: Optional[int]) -> Optional[int]:
        if value is not None and not 0 <= value <= MAX_SEED:
            raise ValueError(f"seed must be in [0, 2**63 - 1] or null, got {value}")
        return value


FIELDS = tuple(GenerateRequest.model_fields)
# What a field must be, for type errors (pydantic's own words name no field)
EXPECTED = {
    "prompt": "a string (empty starts a new document)",
    "max_tokens": "an integer",
    "temperature": "a finite number",
    "top_k": "an integer or null",
    "top_p": "a finite number or null",
    "seed": "an integer or null",
    "stream": "true or false",
}


@dataclass(frozen=True)
class Job:
    """A validated /generate request, tokenized: what a batch generates from.

    ``stop`` is set by the replica once nobody reads the request's tokens any more (it was answered,
    or its client went away); the batch decoding it then drops it at its next step. A threading.Event:
    it is set on the event loop and read in the thread that runs the batch's steps.
    """

    ids: list[int]
    max_tokens: int
    temperature: float
    top_k: Optional[int]
    top_p: Optional[float]
    seed: Optional[int]
    stop: threading.Event = field(default_factory=threading.Event, compare=False, repr=False)


def to_job(request: GenerateRequest, *, encode, max_prompt_tokens: int, max_tokens_cap: int) -> Job:
    """The checks that depend on the served model: ``encode`` (prompt -> token ids) and its limits.
    Raises RequestError(400) naming the field."""
    max_tokens = min(DEFAULT_MAX_TOKENS, max_tokens_cap) if request.max_tokens is None else request.max_tokens
    if not 1 <= max_tokens <= max_tokens_cap:
        raise RequestError(400, f"max_tokens must be in [1, {max_tokens_cap}], got {max_tokens}")
    ids = encode(request.prompt)
    if len(ids) > max_prompt_tokens:
        raise RequestError(
            400,
            f"prompt is {len(ids)} tokens; the model's context allows at most "
            f"{max_prompt_tokens} (block_size - 1): shorten it",
        )
    return Job(ids, max_tokens, request.temperature, request.top_k, request.top_p, request.seed)


def check_content_type(content_type: str) -> None:
    """RequestError(415) unless the request's Content-Type header says JSON."""
    if content_type.split(";", 1)[0].strip().lower() != JSON_TYPE:
        raise RequestError(
            415,
            f"Content-Type must be {JSON_TYPE}, got {content_type or 'none'!r}: "
            f"send the JSON body with -H 'Content-Type: {JSON_TYPE}'",
        )


def validation_message(errors: list[dict]) -> str:
    """One message for FastAPI's validation errors of a /generate body: the JSON itself, then unknown
    fields (all of them), then the first field in error, named first."""
    for e in errors:
        if e["type"] == "json_invalid":
            return f"body must be JSON like {EXAMPLE_BODY}: {e.get('ctx', {}).get('error', e['msg'])}"
    for e in errors:
        if len(e["loc"]) < 2:  # the body as a whole: absent, or not an object
            got = e.get("input")
            return f"body must be a JSON object like {EXAMPLE_BODY}, got {type(got).__name__ if got else 'nothing'}"
    unknown = sorted(str(e["loc"][1]) for e in errors if e["type"] == "extra_forbidden")
    if unknown:
        return f"unknown field(s) {unknown}; allowed: {list(FIELDS)}"
    e = errors[0]
    field = str(e["loc"][1])
    if e["type"] == "value_error":  # our validators' own message, which starts with the field
        return str(e["ctx"]["error"])
    got = e.get("input") if e["type"] != "missing" else None
    return f"{field} must be {EXPECTED.get(field, 'valid')}, got {got!r}"


class BodyLimit:
    """ASGI middleware: reading a request body of more than ``max_bytes`` (declared in Content-Length or
    counted as it arrives) raises HTTPException(413), which the app's handler answers like any refusal.

    FastAPI's own ``max_body_size`` answers a declared oversize with a plain-text 413 of Starlette's,
    past the app's exception handlers.
    """

    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = Headers(scope=scope).get("content-length", "")
        seen = 0

        async def limited_receive():
            nonlocal seen
            if declared.isdigit() and int(declared) > self.max_bytes:
                raise HTTPException(413)
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise HTTPException(413)
            return message

        await self.app(scope, limited_receive, send)
