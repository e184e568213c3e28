"""Autoregressive sampling with a KV cache, for batches of prompts of different lengths.

Prompts are left-padded to a common length; the cache keeps each row's pad length so padded keys
are masked out and every row's positions start at 0, which makes a batched row produce the same
tokens as that prompt run alone.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from model.config import ModelConfig
from model.gpt import GPT


class KVCache:
    """Keys and values of every layer, preallocated for ``max_len`` positions of a batch.

    ``pos`` counts the positions filled so far (pads included); ``pad[b]`` is row b's left padding.
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

    def positions_and_mask(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For T new tokens: their positions (B, T) and the attention mask (B, 1, T, pos + T)."""
        if self.pos + T > self.max_len:
            raise ValueError(f"KV cache full: {self.pos} + {T} tokens > {self.max_len} positions")
        device = self.pad.device
        query = torch.arange(self.pos, self.pos + T, device=device)  # absolute slot of each query
        key = torch.arange(self.pos + T, device=device)
        positions = (query[None, :] - self.pad[:, None]).clamp(min=0)
        causal = key[None, :] <= query[:, None]  # (T, S)
        real_key = key[None, :] >= self.pad[:, None]  # (B, S)
        # A pad query sees only itself: some SDPA kernels turn a fully masked row into NaNs, which
        # would then sit in the cache (and 0 * NaN is NaN even where a later query masks them)
        itself = key[None, :] == query[:, None]
        mask = causal & (real_key[:, None, :] | itself)
        return positions, mask[:, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this layer's new k, v (B, KV, T, D); return all keys and values so far."""
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, T: int) -> None:
        """Called by the model once every layer has stored its T new positions."""
        self.pos += T


def sample_next_token(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
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
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(model: GPT, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
             seed: int | None = None) -> list[list[int]]:
    """Continue each prompt; return only the new tokens of each.

    A row stops after it emits ``eos_id`` (the eos token is included, as the last token of that
    row) and generation stops once every row has. The whole sequence must fit the context: a prompt
    longer than block_size keeps its last block_size tokens, and max_new_tokens is cut so the longest
    row ends at block_size + 1 tokens (the last sampled token is never fed back). No sliding window:
    past the context the cache would hold positions the model never saw in training.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and every prompt at least one token")
    if temperature < 0 or (top_k is not None and top_k < 1) or (top_p is not None and not 0 < top_p <= 1):
        raise ValueError(f"bad sampling settings: temperature={temperature} (>= 0), "
                         f"top_k={top_k} (>= 1), top_p={top_p} (in (0, 1])")
    cfg = model.cfg
    param = next(model.parameters())
    prompts = [p[-cfg.block_size:] for p in prompts]
    prompt_len = max(len(p) for p in prompts)
    steps = min(max_new_tokens, cfg.block_size + 1 - prompt_len)
    out: list[list[int]] = [[] for _ in prompts]
    if steps <= 0:
        return out

    pads = [prompt_len - len(p) for p in prompts]
    idx = torch.tensor([[0] * n + p for n, p in zip(pads, prompts)], device=param.device)
    cache = KVCache(cfg, torch.tensor(pads, device=param.device), prompt_len + steps - 1, param.dtype)
    generator = None if seed is None else torch.Generator(device=param.device).manual_seed(seed)
    was_training = model.training
    model.eval()  # no dropout while sampling
    try:
        logits, _ = model(idx, kv_cache=cache)
        done = [False] * len(prompts)
        for step in range(steps):
            token = sample_next_token(logits[:, -1], temperature=temperature, top_k=top_k,
                                      top_p=top_p, generator=generator)
            for row, t in enumerate(token.tolist()):
                if not done[row]:
                    out[row].append(t)
                    done[row] = t == eos_id
            if all(done) or step == steps - 1:
                break
            logits, _ = model(token[:, None], kv_cache=cache)
    finally:
        model.train(was_training)
    return out
