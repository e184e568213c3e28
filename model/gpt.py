"""A decoder-only GPT: token embedding, positions, a stack of pre-norm blocks, final norm, lm head.

Parameter names follow GPT-2 (transformer.wte/wpe/h.N.ln_1/attn.c_attn/.../ln_f, lm_head) so an
exporter can map them onto HF's GPT2LMHeadModel. Activation checkpointing and per-block compile are
switched on the built model (``set_activation_checkpointing``, ``compile_blocks``) and leave those
names unchanged, so checkpoints and exports do not care whether a run used them.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn

from model import mup
from model.config import ModelConfig, checkpointed_blocks
from model.documents import document_mask, document_starts
from model.layers import Block, LayerNorm, RMSNorm, make_norm, rope_tables, sinusoidal_table
from model.loss import LMHead

# How a model's init_weights sets one parameter: write(param, init) runs init (an in-place draw) on it.
ParamWriter = Callable[[nn.Parameter, Callable[[torch.Tensor], object]], None]


def write_in_place(param: nn.Parameter, init: Callable[[torch.Tensor], object]) -> None:
    """The default writer: the parameter is whole where it lives (ZeRO-3's writer is in rank_model)."""
    init(param)


class GPT(nn.Module):
    """The language model. ``forward`` trains (with targets) or feeds generation (with a KV cache)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.document_masking and cfg.eos_id is None:
            raise ValueError(
                "model.document_masking needs model.eos_id, the token that ends each document "
                "(`raylm train` sets it from the data's tokenizer)"
            )
        self.cfg = cfg
        layers = dict(wte=nn.Embedding(cfg.padded_vocab_size, cfg.n_embd))
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
        # Fixed tables are buffers, not parameters, and are rebuilt (init_weights) rather than checkpointed
        if cfg.pos_encoding == "sinusoidal":
            self.register_buffer("pos_table", torch.empty(cfg.block_size, cfg.n_embd), persistent=False)
        elif cfg.pos_encoding == "rope":
            self.register_buffer("rope_cos", torch.empty(cfg.block_size, cfg.head_dim // 2), persistent=False)
            self.register_buffer("rope_sin", torch.empty(cfg.block_size, cfg.head_dim // 2), persistent=False)
        self.lm_head = LMHead(
            cfg.n_embd, cfg.padded_vocab_size, vocab_size=cfg.vocab_size, output_mult=mup.output_mult(cfg)
        )
        # Per-sample gradients (Opacus, orchestration.train.dp) need every lookup to carry the batch
        # dimension: learned positions are then looked up as (B, T), not once as (T,) and broadcast.
        self.batched_positions = False
        self.init_weights()

    def init_weights(self, generator: torch.Generator | None = None, write: ParamWriter = write_in_place) -> None:
        """(Re)initialise every parameter and rebuild the fixed buffers, in place, where they live.

        The constructor calls it with the global RNG; ``model.build.materialize`` calls it with a
        seeded generator after moving a meta-device model to real memory (where parameters and
        buffers hold garbage and tied weights are untied). Linear and embedding weights
        ~ N(0, init_std), biases 0, norms 1; under μP hidden matrices' std is divided by sqrt(width_mult)
        (``model.mup``). Each parameter is set through ``write(param, init)``
        in a fixed order: ZeRO-3 gathers one partitioned parameter at a time there.
        """
        cfg = self.cfg
        if cfg.tie_embeddings:
            # One matrix reads and writes tokens: fewer parameters, and it helps small models
            # (Press & Wolf 2017); GPT-2 does the same.
            self.lm_head.weight = self.transformer.wte.weight

        def normal(std: float):
            return lambda p: nn.init.normal_(p, mean=0.0, std=std, generator=generator)

        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                write(module.weight, normal(cfg.init_std))
            if isinstance(module, nn.Linear) and module.bias is not None:
                write(module.bias, nn.init.zeros_)
            if isinstance(module, (LayerNorm, RMSNorm)):
                write(module.weight, nn.init.ones_)
                if getattr(module, "bias", None) is not None:
                    write(module.bias, nn.init.zeros_)
        # Each block adds two residual branches; scaling their output projections by
        # 1/sqrt(2 * n_layer) keeps the residual stream's variance flat with depth (GPT-2).
        for name, p in self.named_parameters():
            depth = math.sqrt(2 * cfg.n_layer) if name.endswith("c_proj.weight") else 1.0
            scale = mup.init_scale(cfg, name) / depth
            if scale != 1.0:
                write(p, normal(cfg.init_std * scale))
        with torch.no_grad():
            for name, table in self.fixed_tables().items():
                getattr(self, name).copy_(table)

    def fixed_tables(self) -> dict[str, torch.Tensor]:
        """The buffers computed from the config, not learned (sinusoidal positions, RoPE's cos/sin):
        what ``init_weights`` fills and a model built on the meta device must be handed."""
        cfg = self.cfg
        if cfg.pos_encoding == "sinusoidal":
            return {"pos_table": sinusoidal_table(cfg.block_size, cfg.n_embd)}
        if cfg.pos_encoding == "rope":
            cos, sin = rope_tables(cfg.block_size, cfg.head_dim, cfg.rope_theta)
            return {"rope_cos": cos, "rope_sin": sin}
        return {}

    def set_activation_checkpointing(self, mode: str, every: int = 2) -> tuple[int, ...]:
        """Recompute the activations of some blocks in backward instead of keeping them.

        mode "none" | "full" (every block) | "selective" (every ``every``-th block; see
        ``model.config.checkpointed_blocks``). A checkpointed block keeps only its input and runs its
        forward again during backward (``Block.recompute``). Applies to training forwards only: no-grad
        and KV-cache forwards run as usual. Returns the checkpointed block indices.
        """
        chosen = checkpointed_blocks(self.cfg.n_layer, mode, every)
        for i, block in enumerate(self.transformer.h):
            block.recompute = i in chosen
        return chosen

    def set_explicit_attention(self, on: bool) -> None:
        """Every layer computes attention written out (softmax(q k^T / sqrt(d)) @ v) instead of SDPA's
        fused kernel and keeps its weights in ``block.attn.attention``: slower, for inspection only."""
        for block in self.transformer.h:
            block.attn.explicit, block.attn.attention = on, None

    def compile_blocks(self, **compile_kwargs) -> None:
        """torch.compile each transformer block's forward on its own (torchtitan's per-block compile), in place.

        Each block's backward is then a separate compiled graph, so gradient hooks (DeepSpeed's or
        DDP's all-reduce/reduce-scatter buckets) fire block by block during backward and
        communication overlaps compute; compiling the whole model runs them only after the whole
        backward. The forward is compiled, not the module call: hooks on a block (DeepSpeed ZeRO-3's
        parameter gather and release, which are compile-disabled) run eagerly around its graph rather
        than breaking it, and activation checkpointing (inside ``Block.forward``) is compiled with it.
        Parameter names do not change, so state dicts and checkpoints are the same as eager's.
        compile_kwargs go to torch.compile (e.g. backend, mode, fullgraph).
        """
        for block in self.transformer.h:
            block.forward = torch.compile(block.forward, **compile_kwargs)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache=None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) token ids -> (logits, loss).

        With targets (B, T) (training, eval): (None, the mean cross-entropy in fp32), positions with
        target -1 ignored; the head's logits are made chunk by chunk inside the loss and never whole
        (``model.loss``). Without: (logits (B, T, vocab) for every position, None).
        Generation (a ``model.generate.KVCache``): idx continues what the cache holds; only the
        last position's logits (B, 1, vocab) are computed, as that is all sampling needs.
        """
        x = self.hidden_states(idx, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(idx.size(1))
            return self.lm_head(x[:, -1:, :]), None
        if targets is None:
            return self.lm_head(x), None
        return None, self.lm_head(x, targets)

    def residual_stream(self, idx: torch.Tensor, token_embeddings: torch.Tensor | None = None) -> list[torch.Tensor]:
        """A plain causal forward's residual stream, (B, T, C) each: the embeddings, then every block's
        output; ``transformer.ln_f`` of the last is ``hidden_states(idx)``. ``token_embeddings``
        (B, T, C) replace ``wte(idx)`` (attributions take gradients with respect to them)."""
        pos, attn_mask = self._positions_and_mask(idx)
        x = self._embed(idx, pos, token_embeddings)
        rope = (self.rope_cos[pos], self.rope_sin[pos]) if self.cfg.pos_encoding == "rope" else None
        stream = [x]
        for block in self.transformer.h:
            stream.append(block(stream[-1], rope, None, attn_mask))
        return stream

    def _positions_and_mask(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A forward without a cache: positions (T,) and no mask (SDPA's fused causal path), or with
        ``document_masking`` each token's position in its document (B, T) and the block-diagonal causal
        mask (B, 1, T, T) (``model.documents``)."""
        T = idx.size(1)
        slots = torch.arange(T, device=idx.device)
        if not self.cfg.document_masking:
            return slots, None
        starts = document_starts(idx, self.cfg.eos_id)
        return slots - starts, document_mask(starts, slots, T)

    def _embed(
        self, idx: torch.Tensor, pos: torch.Tensor, token_embeddings: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = self.transformer.wte(idx) if token_embeddings is None else token_embeddings
        if self.cfg.pos_encoding == "learned":
            x = x + self.transformer.wpe(pos.expand(idx.size(0), -1) if self.batched_positions else pos)
        elif self.cfg.pos_encoding == "sinusoidal":
            x = x + self.pos_table[pos].to(x.dtype)
        return self.transformer.drop(x)

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
            pos, attn_mask = self._positions_and_mask(idx)
        else:
            pos, attn_mask = kv_cache.positions_and_mask(idx)

        x = self._embed(idx, pos)
        rope = (self.rope_cos[pos], self.rope_sin[pos]) if cfg.pos_encoding == "rope" else None
        for block in self.transformer.h:
            x = block(x, rope, kv_cache, attn_mask)
        return self.transformer.ln_f(x)
