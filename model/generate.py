"""Autoregressive sampling for batches of prompts of different lengths, GPT or recurrent (RNN, GRU, LSTM).

GPT: prompts are left-padded to a common length; the KV cache keeps each row's pad length so padded
keys are masked out and every row's positions start at 0. Recurrent: prompts are packed (padding never
enters the recurrence) and each row's state (h, or the LSTM's (h, c)) is carried from step to step. Either way a
batched row produces the same tokens as that prompt run alone, and the prefix is never recomputed.

``generate_steps`` yields each step's new tokens as they are sampled (token streaming, e.g. `raylm
serve`'s ``"stream": true``); ``generate`` collects them, so both share one sampling loop.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from model.config import ModelConfig
from model.documents import document_mask, document_starts
from model.gpt import GPT
from model.lstm import RecurrentLM

# Prefill a batch of prompts -> (next-token logits (B, vocab), step: sampled tokens (B,) -> next logits)
Decoder = tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]


class KVCache:
    """Keys and values of every layer, preallocated for ``max_len`` positions of a batch.

    ``pos`` counts the positions filled so far (pads included); ``pad[b]`` is row b's left padding.
    With ``cfg.document_masking``, ``doc_start[b]`` is the slot where row b's open document starts: an
    end-of-text token in a prompt or fed back ends a document, and what follows sees only its own.
    """

    def __init__(self, cfg: ModelConfig, pad: torch.Tensor, max_len: int, dtype: torch.dtype):
        if max_len > cfg.block_size:
            raise ValueError(f"KV cache of {max_len} positions exceeds block_size {cfg.block_size}")
        shape = (cfg.n_layer, pad.numel(), cfg.kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=pad.device)
        self.v = torch.zeros(shape, dtype=dtype, device=pad.device)
        self.pad = pad
        self.max_len = max_len
        self.pos = 0
        self.eos_id = cfg.eos_id if cfg.document_masking else None
        self.doc_start = pad  # a row's first document starts after its padding
        self._next_doc_start = pad

    def positions_and_mask(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For the new tokens idx (B, T): their positions (B, T) and the attention mask (B, 1, T, pos + T)."""
        B, T = idx.shape
        if self.pos + T > self.max_len:
            raise ValueError(f"KV cache full: {self.pos} + {T} tokens > {self.max_len} positions")
        query = torch.arange(self.pos, self.pos + T, device=idx.device)  # absolute slot of each query
        if self.eos_id is None:
            starts = self.doc_start[:, None].expand(B, T)
        else:
            starts = document_starts(idx, self.eos_id, self.pos, self.doc_start)
            last = query[-1] + 1  # the slot after the last new token: a document opens there after an EOS
            self._next_doc_start = torch.where(idx[:, -1] == self.eos_id, last, starts[:, -1])
        # A pad query (left of its row's padding) sees only itself, at position 0: some SDPA kernels turn a
        # fully masked row into NaNs, which would then sit in the cache (and 0 * NaN is NaN even where a
        # later query masks them)
        starts = torch.minimum(starts, query)
        return query - starts, document_mask(starts, query, self.pos + T)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this layer's new k, v (B, KV, T, D); return all keys and values so far."""
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, T: int) -> None:
        """Called by the model once every layer has stored its T new positions."""
        self.pos += T
        self.doc_start = self._next_doc_start


def sample_next_token(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row from logits (B, vocab) -> (B,). temperature 0 is greedy (argmax)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # Nucleus: keep the most likely tokens until their mass reaches top_p (always at least one)
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        # the most likely token always stays: a top_p below float32's smallest (1e-300) compares as 0
        # against the leading 0.0 and would drop every token, leaving no distribution to sample
        drop[:, 0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def _gpt_decoder(model: GPT, prompts: list[list[int]], steps: int) -> Decoder:
    """Left-padded prompts prefilled into a KV cache sized for ``steps`` - 1 more tokens."""
    param = next(model.parameters())
    prompt_len = max(len(p) for p in prompts)
    pads = [prompt_len - len(p) for p in prompts]
    idx = torch.tensor([[0] * n + p for n, p in zip(pads, prompts)], device=param.device)
    cache = KVCache(model.cfg, torch.tensor(pads, device=param.device), prompt_len + steps - 1, param.dtype)
    logits, _ = model(idx, kv_cache=cache)
    return logits[:, -1], lambda token: model(token[:, None], kv_cache=cache)[0][:, -1]


def _recurrent_decoder(model: RecurrentLM, prompts: list[list[int]]) -> Decoder:
    """Right-padded prompts run packed from a zero state; each step feeds one token per row."""
    device = next(model.parameters()).device
    prompt_len = max(len(p) for p in prompts)
    idx = torch.tensor([p + [0] * (prompt_len - len(p)) for p in prompts], device=device)
    logits, state = model.decode(idx, lengths=torch.tensor([len(p) for p in prompts], device=device))

    def step(token: torch.Tensor) -> torch.Tensor:
        nonlocal state
        next_logits, state = model.decode(token[:, None], state)
        return next_logits

    return logits, step


def generate_steps(
    model: GPT | RecurrentLM,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    seed: int | None = None,
) -> Iterator[list[int | None]]:
    """Step-wise ``generate``: an iterator yielding, at each decoding step, one new token per row
    (``None`` for a row that already emitted ``eos_id``), so a caller can stream tokens as they come.

    Arguments, limits and sampling are ``generate``'s (which is this iterator collected): the same
    seed gives the same tokens either way. Settings are checked here, before the first step; the
    prompts are prefilled at the first ``next()``. The iterator ends after ``max_new_tokens`` steps (cut
    to the context), once every row has emitted ``eos_id``, or when the caller closes it (``close()``
    or dropping it frees the KV cache). Each step runs under ``torch.inference_mode`` in whatever
    thread calls ``next()``; the model is in eval mode while it runs and gets back the mode this
    iterator found at its first step (iterators interleaved on one model, as `raylm serve`'s sub-batches
    are, want it in eval mode already: the first to end would otherwise put it back in training mode).
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and every prompt at least one token")
    if temperature < 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
        raise ValueError(
            f"bad sampling settings: temperature={temperature} (>= 0), top_k={top_k} (>= 1), top_p={top_p} (in (0, 1])"
        )
    prompts = [p[-model.cfg.block_size :] for p in prompts]
    steps = min(max_new_tokens, model.cfg.block_size + 1 - max(len(p) for p in prompts))
    return _steps(model, prompts, steps, temperature, top_k, top_p, eos_id, seed)


@torch.inference_mode()
def _steps(
    model: GPT | RecurrentLM,
    prompts: list[list[int]],
    steps: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    eos_id: int | None,
    seed: int | None,
) -> Iterator[list[int | None]]:
    """``generate_steps``' loop, once its arguments are checked (a generator runs nothing until ``next``)."""
    if steps <= 0:
        return
    device = next(model.parameters()).device
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()  # no dropout while sampling
    try:
        logits, step_fn = (
            _recurrent_decoder(model, prompts)
            if isinstance(model, RecurrentLM)
            else _gpt_decoder(model, prompts, steps)
        )
        done = [False] * len(prompts)
        for step in range(steps):
            token = sample_next_token(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            new = [None if finished else t for finished, t in zip(done, token.tolist())]
            done = [finished or t == eos_id for finished, t in zip(done, new)]
            yield new
            if all(done) or step == steps - 1:
                break  # the last sampled token is never fed back
            logits = step_fn(token)
    finally:
        model.train(was_training)


def generate(
    model: GPT | RecurrentLM,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    seed: int | None = None,
) -> list[list[int]]:
    """Continue each prompt with a ``GPT`` (KV cache) or a ``RecurrentLM`` (its carried state);
    return only the new tokens of each (``generate_steps``, collected).

    A row stops after it emits ``eos_id`` (the eos token is included, as the last token of that
    row) and generation stops once every row has. The whole sequence must fit the context: a prompt
    longer than block_size keeps its last block_size tokens, and max_new_tokens is cut so the longest
    row ends at block_size + 1 tokens (the last sampled token is never fed back). No sliding window:
    past the context the cache would hold positions the model never saw in training, and a recurrent model
    was trained on block_size-token windows from a zero state, so it keeps the same limit.
    """
    out: list[list[int]] = [[] for _ in prompts]
    for tokens in generate_steps(
        model, prompts, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id, seed=seed
    ):
        for row, t in zip(out, tokens):
            if t is not None:
                row.append(t)
    return out
