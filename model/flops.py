"""What a config costs, computed from its shape alone: parameters, training FLOPs, memory per GPU.

No model is built, so these answer for any size instantly (the ``raylm model-info`` table, MFU,
scaling fits) and the tests pin them against real modules.
"""

from __future__ import annotations

from typing import Literal

from model.config import ModelConfig

Precision = Literal["fp32", "bf16", "fp16"]


def count_params(cfg: ModelConfig, non_embedding: bool = False) -> int:
    """Number of trainable parameters of ``GPT(cfg)``; equals ``sum(p.numel())`` of the built model.

    non_embedding follows Kaplan et al. (2020): leave out every vocabulary- or position-sized matrix
    (wte, learned wpe, and an untied lm_head), so N counts the transformer body only and does not
    change with the tokenizer or with weight tying. Chinchilla's N is the full count.
    """
    if cfg.arch == "lstm":
        return _lstm_params(cfg, non_embedding)
    d, hd = cfg.n_embd, cfg.head_dim

    def linear(n_in: int, n_out: int) -> int:
        return n_in * n_out + (n_out if cfg.bias else 0)

    norm = 2 * d if cfg.norm == "layernorm" and cfg.bias else d
    attn = linear(d, (cfg.n_head + 2 * cfg.kv_heads) * hd) + linear(cfg.n_head * hd, d)
    fc_out = 2 * cfg.hidden_dim if cfg.mlp == "swiglu" else cfg.hidden_dim
    mlp = linear(d, fc_out) + linear(cfg.hidden_dim, d)
    body = cfg.n_layer * (2 * norm + attn + mlp) + norm  # + ln_f
    if non_embedding:
        return body
    wte = cfg.vocab_size * d
    wpe = cfg.block_size * d if cfg.pos_encoding == "learned" else 0
    lm_head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    return body + wte + wpe + lm_head


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token at sequence length seq_len.

    6 * N + 12 * n_layer * seq_len * n_embd, the PaLM / nanoGPT MFU convention: each parameter
    that multiplies an activation costs 2 FLOPs forward and 4 backward. N is the non-embedding count
    plus the lm_head matrix (a matmul whether tied or not; embedding lookups are free). Attention's
    QK^T and AV are 2 * 2 * seq_len * n_embd per layer forward, counted without the causal half
    discount, times 3 for forward + backward.
    """
    n_matmul = count_params(cfg, non_embedding=True) + cfg.vocab_size * cfg.n_embd
    if cfg.arch == "lstm":
        return 6.0 * n_matmul  # no attention term: an LSTM's cost per token does not grow with seq_len
    return 6.0 * n_matmul + 12.0 * cfg.n_layer * seq_len * cfg.n_embd


def _lstm_params(cfg: ModelConfig, non_embedding: bool) -> int:
    """``model.lstm.LSTMLM``: per layer 4 gates x (input + recurrent matrix), plus PyTorch's two
    bias vectors (b_ih, b_hh) per gate when cfg.bias. Embedding and untied head are the embedding part.

    Training FLOPs/token follow the same 6 * N rule: 6 * (n_layer * 4 * (d_in * h + h * h) + h * V),
    each gate matrix being one multiply-accumulate per weight per token forward."""
    h = cfg.n_embd
    body = cfg.n_layer * (4 * h * (h + h) + (8 * h if cfg.bias else 0))
    if non_embedding:
        return body
    return body + cfg.vocab_size * h * (1 if cfg.tie_embeddings else 2)


def activation_bytes(
    cfg: ModelConfig,
    *,
    micro_batch_size: int,
    seq_len: int,
    precision: Precision,
    activation_checkpointing: bool = False,
) -> int:
    """Activations kept for backward in one micro-batch, after Korthikanti et al. (2022).

    Per layer and token, in 16-bit: attention 10h bytes, two norm inputs 4h, MLP input 2h, the MLP's
    hidden tensors (GELU: fc out and gelu out; SwiGLU: fused fc out, silu, product) and 1 byte per
    dropout mask. SDPA's fused kernels never materialise the (T x T) scores, so the paper's
    5 * n_head * seq_len term is dropped. Plus the logits, kept once more in fp32 by the loss.
    Checkpointing keeps only each block's input and recomputes one block at a time.
    """
    width = 4 if precision == "fp32" else 2
    tokens = micro_batch_size * seq_len
    h = cfg.n_embd
    mlp_values = (4 if cfg.mlp == "swiglu" else 2) * cfg.hidden_dim
    masks = 2 * h if cfg.dropout > 0 else 0
    per_layer = tokens * ((8 * h + mlp_values) * width + masks)
    head = tokens * (2 * h * width + cfg.vocab_size * (width + 4))  # embedding out, ln_f in, logits
    if activation_checkpointing:
        return cfg.n_layer * tokens * h * width + per_layer + head
    return cfg.n_layer * per_layer + head


def estimate_training_memory(
    cfg: ModelConfig,
    *,
    micro_batch_size: int,
    seq_len: int,
    num_workers: int,
    precision: Precision,
    zero_stage: int,
    offload_optimizer: bool = False,
    offload_params: bool = False,
    activation_checkpointing: bool = False,
) -> dict[str, int]:
    """Bytes per worker for data-parallel AdamW training under DeepSpeed ZeRO.

    Mixed precision (bf16/fp16) holds 16-bit params and grads and 12 bytes/param of optimizer state
    (fp32 master copy, m, v); fp32 holds 4 + 4 + 8. ZeRO-1 shards the optimizer state over
    num_workers, ZeRO-2 the grads too, ZeRO-3 the params too. Offloading moves the optimizer state
    (and, at stage 3, the params) to CPU memory, reported as cpu_bytes per worker.
    Returns params_bytes, grads_bytes, optimizer_bytes, activations_bytes, total_bytes (all GPU)
    and cpu_bytes. Ignores temporary buffers, communication buckets and allocator fragmentation.
    """
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
    if offload_optimizer and zero_stage == 0:
        raise ValueError("offload_optimizer needs ZeRO stage 1, 2 or 3 (DeepSpeed cannot offload at 0)")
    if offload_params and zero_stage != 3:
        raise ValueError("offload_params needs ZeRO stage 3 (only stage 3 partitions the params)")
    n = count_params(cfg)
    if precision == "fp32":
        params, grads, optimizer = 4 * n, 4 * n, 8 * n
    else:
        params, grads, optimizer = 2 * n, 2 * n, 12 * n
    if zero_stage >= 1:
        optimizer //= num_workers
    if zero_stage >= 2:
        grads //= num_workers
    if zero_stage >= 3:
        params //= num_workers
    cpu = 0
    if offload_optimizer:
        cpu, optimizer = cpu + optimizer, 0
    if offload_params:
        cpu, params = cpu + params, 0
    activations = activation_bytes(
        cfg,
        micro_batch_size=micro_batch_size,
        seq_len=seq_len,
        precision=precision,
        activation_checkpointing=activation_checkpointing,
    )
    return dict(
        params_bytes=params,
        grads_bytes=grads,
        optimizer_bytes=optimizer,
        activations_bytes=activations,
        total_bytes=params + grads + optimizer + activations,
        cpu_bytes=cpu,
    )


def model_info_text(
    cfg: ModelConfig,
    *,
    micro_batch_size: int,
    seq_len: int,
    num_workers: int,
    precision: Precision,
    offload_optimizer: bool = False,
) -> str:
    """A readable summary: parameter counts, training FLOPs per token, and per-GPU memory for each
    ZeRO stage at the given batch shape (stage 0 cannot offload, so its row never does)."""
    n, n_body = count_params(cfg), count_params(cfg, non_embedding=True)
    gib = 2**30
    lines = [
        f"model           {cfg.preset or 'custom'}: {cfg.n_layer} layers, {cfg.n_head} heads "
        f"({cfg.kv_heads} kv), n_embd {cfg.n_embd}, {cfg.mlp}, {cfg.norm}, {cfg.pos_encoding}, "
        f"vocab {cfg.vocab_size}, block_size {cfg.block_size}",
        f"params          {n:,} ({n / 1e6:.1f}M)",
        f"non-embedding   {n_body:,} ({n_body / 1e6:.1f}M; excludes wte, wpe, untied lm_head)",
        f"FLOPs/token     {flops_per_token(cfg, seq_len):.4g} (training, seq_len {seq_len})",
        f"memory per GPU  micro_batch_size {micro_batch_size}, seq_len {seq_len}, {precision}, "
        f"{num_workers} workers, offload_optimizer {offload_optimizer}",
        f"{'ZeRO':>6}{'params':>10}{'grads':>10}{'optim':>10}{'activ':>10}{'GPU total':>11}{'CPU':>9}  (GiB)",
    ]
    for stage in range(4):
        m = estimate_training_memory(
            cfg,
            micro_batch_size=micro_batch_size,
            seq_len=seq_len,
            num_workers=num_workers,
            precision=precision,
            zero_stage=stage,
            offload_optimizer=offload_optimizer and stage > 0,
        )
        lines.append(
            f"{stage:>6}{m['params_bytes'] / gib:>10.2f}{m['grads_bytes'] / gib:>10.2f}"
            f"{m['optimizer_bytes'] / gib:>10.2f}{m['activations_bytes'] / gib:>10.2f}"
            f"{m['total_bytes'] / gib:>11.2f}{m['cpu_bytes'] / gib:>9.2f}"
        )
    return "\n".join(lines)
