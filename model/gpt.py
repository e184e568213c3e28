"""A decoder-only GPT: token embedding, positions, a stack of pre-norm blocks, final norm, lm head.

Parameter names follow GPT-2 (transformer.wte/wpe/h.N.ln_1/attn.c_attn/.../ln_f, lm_head) so an
exporter can map them onto HF's GPT2LMHeadModel.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import ModelConfig
from model.layers import Block, make_norm, rope_tables, sinusoidal_table


class GPT(nn.Module):
    """The language model. ``forward`` trains (with targets) or feeds generation (with a KV cache)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        layers = dict(wte=nn.Embedding(cfg.vocab_size, cfg.n_embd))
        if cfg.pos_encoding == "learned":
            layers["wpe"] = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.transformer = nn.ModuleDict(
            dict(
                **layers,
                drop=nn.Dropout(cfg.dropout),
                h=nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer)),
                ln_f=make_norm(cfg),
            )
        )
        # Fixed tables are buffers, not parameters, and are rebuilt rather than checkpointed
        if cfg.pos_encoding == "sinusoidal":
            self.register_buffer("pos_table", sinusoidal_table(cfg.block_size, cfg.n_embd), persistent=False)
        elif cfg.pos_encoding == "rope":
            cos, sin = rope_tables(cfg.block_size, cfg.head_dim, cfg.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            # One matrix reads and writes tokens: fewer parameters, and it helps small models
            # (Press & Wolf 2017); GPT-2 does the same.
            self.lm_head.weight = self.transformer.wte.weight
        self.apply(self._init_weights)
        # Each block adds two residual branches; scaling their output projections by
        # 1/sqrt(2 * n_layer) keeps the residual stream's variance flat with depth (GPT-2).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=cfg.init_std / math.sqrt(2 * cfg.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache=None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> (logits, loss).

        Training/eval (no cache): logits (B, T, vocab) for every position; loss is the mean
        cross-entropy against targets (B, T), positions with target -1 ignored.
        Generation (a ``model.generate.KVCache``): idx continues what the cache holds; only the
        last position's logits (B, 1, vocab) are computed, as that is all sampling needs.
        """
        x = self.hidden_states(idx, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(idx.size(1))
            return self.lm_head(x[:, -1:, :]), None
        logits = self.lm_head(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def hidden_states(self, idx: torch.Tensor, kv_cache=None) -> torch.Tensor:
        """idx (B, T) -> the final norm's output (B, T, n_embd): what the lm head (or a task head) reads."""
        T = idx.size(1)
        cfg = self.cfg
        if kv_cache is None:
            if T > cfg.block_size:
                raise ValueError(
                    f"sequence of {T} tokens is longer than block_size {cfg.block_size}; "
                    "crop inputs to the model's context length"
                )
            pos = torch.arange(T, device=idx.device)
            attn_mask = None  # plain causal attention: SDPA's fused is_causal path
        else:
            pos, attn_mask = kv_cache.positions_and_mask(T)

        x = self.transformer.wte(idx)
        if cfg.pos_encoding == "learned":
            x = x + self.transformer.wpe(pos)
        elif cfg.pos_encoding == "sinusoidal":
            x = x + self.pos_table[pos].to(x.dtype)
        rope = (self.rope_cos[pos], self.rope_sin[pos]) if cfg.pos_encoding == "rope" else None
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            x = block(x, rope, kv_cache, attn_mask)
        return self.transformer.ln_f(x)
