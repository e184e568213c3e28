"""The pieces of a transformer block: norms, positional encodings, attention, MLP, the block.

Shapes: B batch, T query length, S key length (T plus what a KV cache already holds), C = n_embd,
H query heads, KV key/value heads, D head_dim (H * D = C unless heads were pruned: ``ModelConfig.head_size``).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from model.config import ModelConfig
from model.mup import attention_scale


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (torch's own cannot drop just the bias)."""

    def __init__(self, ndim: int, bias: bool, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """Scale-only norm (Llama): no mean subtraction, no bias."""

    def __init__(self, ndim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def make_norm(cfg: ModelConfig) -> nn.Module:
    """The norm the config asks for, over n_embd."""
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, cfg.norm_eps)
    return LayerNorm(cfg.n_embd, cfg.bias, cfg.norm_eps)


def sinusoidal_table(n_pos: int, dim: int) -> torch.Tensor:
    """(n_pos, dim) fixed encodings of "Attention Is All You Need": sin on even, cos on odd dims."""
    pos = torch.arange(n_pos, dtype=torch.float32)[:, None]
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(n_pos, dim)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq[: dim // 2])
    return table


def rope_tables(n_pos: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (n_pos, head_dim/2): the rotation angle of each position and frequency."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(n_pos, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + D/2) of x (B, T, heads, D) by per-position angles.

    cos/sin are (T, D/2), or (B, T, D/2) when rows sit at different positions (padded decoding).
    The half-split pairing is the Llama/GPT-NeoX layout, so weights map to HF Llama unchanged.
    """
    cos, sin = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)  # broadcast over heads
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class CausalSelfAttention(nn.Module):
    """Multi-head (or grouped-query) causal attention through torch's fused SDPA kernels."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx  # which slot of a KV cache this layer owns
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        # q, k and v in one matmul; GPT-2's c_attn layout when n_kv_head == n_head
        self.c_attn = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.kv_heads) * cfg.head_dim, bias=cfg.bias)
        # the heads' outputs side by side (n_head * head_dim: n_embd unless heads were pruned) -> n_embd
        self.c_proj = nn.Linear(cfg.attn_dim, cfg.n_embd, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.scale = attention_scale(cfg)  # on q·k: None is 1/sqrt(head_dim); μP's 1/head_dim
        # ``GPT.set_explicit_attention``: softmax(q k^T / sqrt(d)) @ v written out, its weights kept in
        # ``attention`` (B, heads, T, T) for inspection (``raylm interpret``); forwards without a KV cache only
        self.explicit = False
        self.attention: torch.Tensor | None = None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        kv_cache=None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C). Without a cache and mask, attention is plain causal.

        With a cache, k/v are appended to it and attention covers everything it holds. attn_mask
        (B, 1, T, S) bool, with a cache or with document masking, says which keys each query may see
        (True = attend).
        """
        B, T, _ = x.shape
        q_dim, kv_dim = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        q, k, v = self.c_attn(x).split([q_dim, kv_dim, kv_dim], dim=2)
        q = q.view(B, T, self.n_head, self.head_dim)
        k = k.view(B, T, self.n_kv_head, self.head_dim)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, heads, T, D)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)
        if self.n_kv_head != self.n_head:
            # repeat_interleave matches HF's repeat_kv: query head h reads kv head h // group
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        if self.explicit and kv_cache is None:
            scores = (q @ k.transpose(-2, -1)) * (self.scale or 1.0 / math.sqrt(self.head_dim))
            if attn_mask is None:
                attn_mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
            self.attention = torch.softmax(scores.masked_fill(~attn_mask, float("-inf")), dim=-1)
            y = F.dropout(self.attention, self.dropout, self.training) @ v
        else:
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=attn_mask,
                dropout_p=self.dropout if self.training else 0.0,
                is_causal=attn_mask is None and T == k.size(2),  # T == 1 on a cache: sees all of it
                scale=self.scale,
            )
        y = y.transpose(1, 2).contiguous().view(B, T, q_dim)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """Position-wise feed-forward: GELU (tanh approximation, as GPT-2) or SwiGLU."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        # SwiGLU's gate and up projections are fused into one matmul: c_fc outputs [gate | up]
        fc_out = 2 * cfg.hidden_dim if self.swiglu else cfg.hidden_dim
        self.c_fc = nn.Linear(cfg.n_embd, fc_out, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.hidden_dim, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)).

    ``recompute`` (set by ``GPT.set_activation_checkpointing``): a training forward keeps only the
    block's input and runs the block again in backward. The checkpoint sits inside ``forward``, so a
    compiled block (``GPT.compile_blocks``) compiles the recomputation with it, torchtitan's order
    (checkpoint inside, compile outside), instead of a checkpoint around an opaque compiled call.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg, layer_idx)
        self.ln_2 = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.recompute = False

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        kv_cache=None,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.recompute and kv_cache is None and torch.is_grad_enabled():
            # non-reentrant: works under DeepSpeed ZeRO, torch.compile and with frozen parameters; the
            # default preserve_rng_state replays dropout masks exactly
            return checkpoint(self._attn_and_mlp, x, rope, None, attn_mask, use_reentrant=False)
        return self._attn_and_mlp(x, rope, kv_cache, attn_mask)

    def _attn_and_mlp(self, x, rope, kv_cache, attn_mask) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, kv_cache, attn_mask)
        return x + self.mlp(self.ln_2(x))
