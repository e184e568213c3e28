"""What a config costs, computed from its shape alone: parameters, training FLOPs, memory per GPU.

No model is built, so these answer for any size instantly (the ``raylm model-info`` table, MFU,
scaling fits) and the tests pin them against real modules.
"""

from __future__ import annotations

from typing import Literal

from model.config import PRESETS, RECURRENT_ARCHS, ModelConfig, checkpointed_blocks, model_config_from_preset
from model.loss import loss_chunk_rows

Precision = Literal["fp32", "bf16", "fp16"]
RECURRENT_GATES = {"rnn": 1, "gru": 3, "lstm": 4}  # weight matrices per layer of model.lstm.RecurrentLM's cells


def count_params(cfg: ModelConfig, non_embedding: bool = False) -> int:
    """Number of trainable parameters of ``GPT(cfg)``; equals ``sum(p.numel())`` of the built model.

    non_embedding follows Kaplan et al. (2020): leave out every vocabulary- or position-sized matrix
    (wte, learned wpe, and an untied lm_head), so N counts the transformer body only and does not
    change with the tokenizer or with weight tying. Chinchilla's N is the full count.
    """
    if cfg.arch in RECURRENT_ARCHS:
        return _recurrent_params(cfg, non_embedding)
    d, hd = cfg.n_embd, cfg.head_dim

    def linear(n_in: int, n_out: int) -> int:
        return n_in * n_out + (n_out if cfg.bias else 0)

    norm = 2 * d if cfg.norm == "layernorm" and cfg.bias else d
    attn = linear(d, (cfg.n_head + 2 * cfg.kv_heads) * hd) + linear(cfg.attn_dim, d)
    fc_out = 2 * cfg.hidden_dim if cfg.mlp == "swiglu" else cfg.hidden_dim
    mlp = linear(d, fc_out) + linear(cfg.hidden_dim, d)
    body = cfg.n_layer * (2 * norm + attn + mlp) + norm  # + ln_f
    if non_embedding:
        return body
    wte = cfg.padded_vocab_size * d  # padding rows are parameters too (and matmul work)
    wpe = cfg.block_size * d if cfg.pos_encoding == "learned" else 0
    lm_head = 0 if cfg.tie_embeddings else cfg.padded_vocab_size * d
    return body + wte + wpe + lm_head


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token at sequence length seq_len.

    6 * N + 12 * n_layer * seq_len * n_embd, the PaLM / nanoGPT MFU convention: each parameter
    that multiplies an activation costs 2 FLOPs forward and 4 backward. N is the non-embedding count
    plus the lm_head matrix (a matmul whether tied or not; embedding lookups are free). Attention's
    QK^T and AV are 2 * 2 * seq_len * n_head * head_dim per layer forward (n_embd unless heads were
    pruned), counted without the causal half discount, times 3 for forward + backward.
    """
    n_matmul = count_params(cfg, non_embedding=True) + cfg.padded_vocab_size * cfg.n_embd
    if cfg.arch in RECURRENT_ARCHS:
        return 6.0 * n_matmul  # no attention term: a recurrent model's cost per token does not grow with seq_len
    return 6.0 * n_matmul + 12.0 * cfg.n_layer * seq_len * cfg.attn_dim


def _recurrent_params(cfg: ModelConfig, non_embedding: bool) -> int:
    """``model.lstm.RecurrentLM``: per layer g gates (rnn 1, gru 3, lstm 4) x (input + recurrent
    matrix), plus PyTorch's two bias vectors (b_ih, b_hh) per gate when cfg.bias. Embedding and untied
    head are the embedding part.

    Training FLOPs/token follow the same 6 * N rule: 6 * (n_layer * g * (d_in * h + h * h) + h * V),
    each gate matrix being one multiply-accumulate per weight per token forward (the GRU's and LSTM's
    elementwise gate products are left out, as norms and activations are for the GPT)."""
    h, gates = cfg.n_embd, RECURRENT_GATES[cfg.arch]
    body = cfg.n_layer * (gates * h * (h + h) + (2 * gates * h if cfg.bias else 0))
    if non_embedding:
        return body
    return body + cfg.vocab_size * h * (1 if cfg.tie_embeddings else 2)


def activation_bytes(
    cfg: ModelConfig,
    *,
    micro_batch_size: int,
    seq_len: int,
    precision: Precision,
    activation_checkpointing: str = "none",
    checkpoint_every: int = 2,
) -> int:
    """Peak bytes of activations in one micro-batch's forward + backward: what autograd keeps for
    backward, plus the loss's transient at the start of backward. Counted tensor by tensor from what
    ``model.layers`` saves (checked against measured peak RSS in tests/model/test_memory.py), not
    from Korthikanti et al.'s Megatron layout, which saves different tensors.

    Per block and token, in values: the two norms' inputs and outputs (4h); the fused qkv output
    (q + 2 kv, q = n_head * head_dim: h unless heads were pruned); with RoPE the rotated q and k
    (q + kv); with GQA the repeated k and v (2q); SDPA's output and its contiguous copy for c_proj
    (2q); the MLP's hidden tensors (GELU: fc out and gelu out, 2H; SwiGLU: fused fc out, silu,
    product, 4H); 1 byte per dropout mask. SDPA's fused kernels
    never materialise the (T x T) scores. Head and loss (``model.loss``, which makes its gradients in
    the forward pass): ln_f's input and output (2h); the hidden states' gradient (h) and the head
    weight's fp32 gradient (V x h) it fills; one chunk's fp32 logits (``loss_chunk_rows`` rows) and a
    V x h product at a time; at backward's start those gradients and their scaled copies. A
    checkpointed block keeps only its input (h) and is recomputed one at a time in backward, after the
    loss's transient is gone; its backward then briefly adds the incoming gradient (h) and the first
    MLP-wide gradient (H; SwiGLU 2H) before its saved tensors are freed.
    """
    width = 4 if precision == "fp32" else 2
    tokens = micro_batch_size * seq_len
    if cfg.arch in RECURRENT_ARCHS:
        raise ValueError(f"activation_bytes models the GPT's blocks; arch {cfg.arch!r} has no estimate")
    h, q, kv = cfg.n_embd, cfg.attn_dim, cfg.kv_heads * cfg.head_dim  # q = h unless heads were pruned
    attn = 4 * h + (q + 2 * kv) + 2 * q
    if cfg.pos_encoding == "rope":
        attn += q + kv
    if cfg.kv_heads != cfg.n_head:
        attn += 2 * q
    mlp = (4 if cfg.mlp == "swiglu" else 2) * cfg.hidden_dim
    masks = 2 * h if cfg.dropout > 0 else 0
    per_layer = tokens * ((attn + mlp) * width + masks)
    n_ckpt = len(checkpointed_blocks(cfg.n_layer, activation_checkpointing, checkpoint_every))
    kept = n_ckpt * tokens * h * width + (cfg.n_layer - n_ckpt) * per_layer
    vocab = cfg.padded_vocab_size
    loss_grads = tokens * h * width + vocab * h * 4
    chunk = min(tokens, loss_chunk_rows(vocab)) * vocab * (4 + (width if width < 4 else 0))  # + a bf16 matmul's output
    loss_forward = tokens * 2 * h * width + loss_grads + vocab * h * width + chunk
    loss_peak = max(loss_forward, tokens * h * width + 2 * loss_grads)
    mlp_grad = (2 if cfg.mlp == "swiglu" else 1) * cfg.hidden_dim
    recompute_peak = per_layer + tokens * (h + mlp_grad) * width if n_ckpt else 0
    return kept + max(loss_peak, recompute_peak)


ZERO_MIN_ELEMENTS = 10**7  # 40 MB of fp32: below it each collective or optimizer call costs more than it saves


def zero_buckets(stage: int, hidden_size: int) -> dict:
    """Bucket and ZeRO-3 working-set sizes (elements) from the model's width, where DeepSpeed's defaults
    are sized for billions of parameters. As Hugging Face's DeepSpeed integration sizes its "auto"
    values: reduce buckets of hidden² (the default 5e8 is a 2 GB fp32 buffer per rank), at ZeRO-3 a
    prefetch of 0.9·hidden² and parameters below 10·hidden (biases, norms) kept whole. Beyond that, at
    ZeRO-3, in units of one transformer block's parameters (12·hidden²): at most two blocks' gathered
    weights stay live or are kept for reuse (the defaults, 1e9, keep a whole sub-billion model
    gathered from the second step on), and the optimizer steps one block-sized sub-group of the
    rank's partition at a time (the default 1e9 puts the whole partition in one group, and the step's
    fp64 gradient norm and Adam's square-root temporaries then each copy all of it). Measured on
    GPT-2 medium, 2 CPU ranks: per-rank live tensors 4.7 -> 3.6 GB at the forward, the step's
    transient 1.9 GB -> 0.1 GB. No size goes below ZERO_MIN_ELEMENTS: a small model's hidden² buckets
    meant hundreds of latency-bound collectives a step (the suite's 2-rank CPU runs: +18 s)."""
    floor = lambda n: max(int(n), ZERO_MIN_ELEMENTS)  # noqa: E731
    buckets = {"reduce_bucket_size": floor(hidden_size**2)}
    if stage < 3:
        buckets["allgather_bucket_size"] = floor(hidden_size**2)
        return buckets
    block = 12 * hidden_size**2
    buckets.update(
        stage3_prefetch_bucket_size=floor(0.9 * hidden_size**2),
        stage3_param_persistence_threshold=10 * hidden_size,
        stage3_max_live_parameters=floor(2 * block),
        stage3_max_reuse_distance=floor(2 * block),
        sub_group_size=floor(block),
    )
    return buckets


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
    activation_checkpointing: str = "none",
    checkpoint_every: int = 2,
) -> dict[str, int]:
    """Bytes per worker for data-parallel AdamW training: DDP at ZeRO stage 0, DeepSpeed ZeRO at 1-3.

    fp32 holds 4 + 4 + 8 bytes/param (params, grads, Adam m and v). Mixed precision under DeepSpeed
    (stages 1-3) holds 16-bit params and grads and 12 bytes/param of optimizer state (fp32 master
    copy, m, v); under DDP (stage 0) the params stay fp32 masters with fp32 grads, and autocast keeps
    a 16-bit copy of each weight for the backward (4 + 2, 4, 8). ZeRO-1 shards the optimizer state over
    num_workers, ZeRO-2 the grads too, ZeRO-3 the params too. Offloading moves the optimizer state
    (and, at stage 3, the params) to CPU memory, reported as cpu_bytes per worker.
    Returns params_bytes, grads_bytes, optimizer_bytes, activations_bytes, total_bytes (all GPU)
    and cpu_bytes, and buffers_bytes: DeepSpeed's working set as raylm sizes it (``zero_buckets``):
    its gradient reduce buckets (two with more than one worker, as overlap_comm double-buffers), at
    ZeRO-3 the gathered weights it keeps live and the optimizer step's per-sub-group temporaries
    (an fp64 gradient copy for the norm, Adam's square root). Ignores allocator fragmentation.
    Under DeepSpeed, fp32 training keeps a separate fp32 master copy too (12 bytes/param of state).
    init_bytes: the peak while the model is built (``_init_bytes``), before any of the above.
    """
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
    if offload_optimizer and zero_stage == 0:
        raise ValueError("offload_optimizer needs ZeRO stage 1, 2 or 3 (DeepSpeed cannot offload at 0)")
    if offload_params and zero_stage != 3:
        raise ValueError("offload_params needs ZeRO stage 3 (only stage 3 partitions the params)")
    n = count_params(cfg)
    if precision == "fp32":
        params, grads, optimizer = 4 * n, 4 * n, (8 if zero_stage == 0 else 12) * n
    elif zero_stage == 0:
        params, grads, optimizer = 6 * n, 4 * n, 8 * n
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
        checkpoint_every=checkpoint_every,
    )
    buffers = 0
    if zero_stage >= 1 and cfg.arch not in RECURRENT_ARCHS:
        sizes = zero_buckets(zero_stage, cfg.n_embd)
        buffers = 4 * sizes["reduce_bucket_size"] * (2 if num_workers > 1 and zero_stage < 3 else 1)
        if zero_stage == 3:
            buffers += (4 if precision == "fp32" else 2) * sizes["stage3_max_live_parameters"]
            buffers += (8 + 4) * sizes["sub_group_size"]
    return dict(
        params_bytes=params,
        grads_bytes=grads,
        optimizer_bytes=optimizer,
        activations_bytes=activations,
        buffers_bytes=buffers,
        total_bytes=params + grads + optimizer + activations + buffers,
        cpu_bytes=cpu,
        init_bytes=_init_bytes(cfg, num_workers, precision, zero_stage, offload_params),
    )


def _init_bytes(cfg: ModelConfig, num_workers: int, precision: Precision, zero_stage: int, offload_params: bool) -> int:
    """Peak bytes per worker while the model is built, before the engine (``init_bytes``): the whole
    fp32 model at stages 0-2 (materialized on the device, cast later), at ZeRO-3 (a GPT, built under
    zero.Init by ``orchestration.train.rank_model``) its share in the engine's dtype (none on the GPU
    with offload_params) plus the one parameter gathered whole for its seeded draw (drawn in fp32)."""
    n = count_params(cfg)
    if zero_stage < 3 or cfg.arch != "gpt":
        return 4 * n
    width = 4 if precision == "fp32" else 2
    share = 0 if offload_params else width * n // num_workers
    return share + (width + (0 if width == 4 else 4)) * _largest_param_numel(cfg)


def _largest_param_numel(cfg: ModelConfig) -> int:
    """Elements of the largest parameter: the embedding or head, or an MLP matrix."""
    return max(cfg.padded_vocab_size * cfg.n_embd, cfg.n_embd * cfg.hidden_dim * (2 if cfg.mlp == "swiglu" else 1))


def estimate_cpu_step_memory(
    cfg: ModelConfig,
    *,
    micro_batch_size: int,
    seq_len: int,
    activation_checkpointing: str = "none",
    checkpoint_every: int = 2,
) -> dict[str, int]:
    """Peak bytes of one single-process fp32 training step with torch AdamW (the bare loop, or one
    CPU worker): params 4 B/param and Adam's m and v 8 B/param live throughout; gradients (4 B/param,
    set to None between steps) grow during backward as activations are freed, so the peak is the
    larger of the activation peak (``activation_bytes``) and the optimizer step's gradients plus the
    two temporaries torch's per-tensor AdamW makes of its largest parameter (sqrt, then divide).
    Returns params_bytes, grads_bytes, optimizer_bytes,
    activations_bytes and peak_bytes.

    Live tensors only: glibc's malloc can keep freed blocks mapped (its mmap threshold adapts
    upward), so a process's peak RSS runs above this unless MALLOC_MMAP_THRESHOLD_ is fixed or a
    caching allocator (jemalloc, tcmalloc) returns memory; tests/model/test_memory.py measures both.
    """
    n = count_params(cfg)
    params, grads, optimizer = 4 * n, 4 * n, 8 * n
    largest = 4 * _largest_param_numel(cfg)
    activations = activation_bytes(
        cfg,
        micro_batch_size=micro_batch_size,
        seq_len=seq_len,
        precision="fp32",
        activation_checkpointing=activation_checkpointing,
        checkpoint_every=checkpoint_every,
    )
    return dict(
        params_bytes=params,
        grads_bytes=grads,
        optimizer_bytes=optimizer,
        activations_bytes=activations,
        peak_bytes=params + optimizer + max(activations, grads + 2 * largest),
    )


def model_info_text(
    cfg: ModelConfig,
    *,
    micro_batch_size: int,
    seq_len: int,
    num_workers: int,
    precision: Precision,
    offload_optimizer: bool = False,
    activation_checkpointing: str = "none",
    checkpoint_every: int = 2,
) -> str:
    """A readable summary: parameter counts, training FLOPs per token, the peak of a one-process
    fp32 CPU step (without and with full activation checkpointing), and per-GPU memory for each
    ZeRO stage at the given batch shape and checkpointing (stage 0 cannot offload, so its row never
    does). Memory is modelled for the GPT only: a recurrent config gets counts and FLOPs."""
    n, n_body = count_params(cfg), count_params(cfg, non_embedding=True)
    gib = 2**30
    lines = [
        f"model           {cfg.preset or 'custom'}: {cfg.n_layer} layers, {cfg.n_head} heads "
        f"({cfg.kv_heads} kv{f', head_size {cfg.head_size}' if cfg.head_size else ''}), n_embd {cfg.n_embd}, "
        f"{cfg.mlp}, {cfg.norm}, {cfg.pos_encoding}, "
        f"vocab {cfg.vocab_size}"
        + (f" (padded to {cfg.padded_vocab_size} rows)" if cfg.padded_vocab_size != cfg.vocab_size else "")
        + f", block_size {cfg.block_size}",
        f"params          {n:,} ({n / 1e6:.1f}M)",
        f"non-embedding   {n_body:,} ({n_body / 1e6:.1f}M; excludes wte, wpe, untied lm_head)",
        f"FLOPs/token     {flops_per_token(cfg, seq_len):.4g} (training, seq_len {seq_len})",
    ]
    if cfg.arch in RECURRENT_ARCHS:
        return "\n".join([*lines, f"memory          not modelled for arch {cfg.arch}"])
    cpu = [
        estimate_cpu_step_memory(cfg, micro_batch_size=micro_batch_size, seq_len=seq_len, activation_checkpointing=m)
        for m in ("none", "full")
    ]
    lines += [
        f"CPU fp32 step   one process, micro_batch_size {micro_batch_size}: peak {cpu[0]['peak_bytes'] / gib:.2f} GiB, "
        f"{cpu[1]['peak_bytes'] / gib:.2f} GiB with full activation checkpointing (live tensors)",
        f"memory per GPU  micro_batch_size {micro_batch_size}, seq_len {seq_len}, {precision}, "
        f"{num_workers} workers, offload_optimizer {offload_optimizer}, "
        f"activation checkpointing {activation_checkpointing}",
        f"{'ZeRO':>6}{'params':>10}{'grads':>10}{'optim':>10}{'activ':>10}{'buffers':>10}{'GPU total':>11}{'CPU':>9}"
        f"{'init':>9}  (GiB; init: the peak while the model is built)",
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
            activation_checkpointing=activation_checkpointing,
            checkpoint_every=checkpoint_every,
        )
        lines.append(
            f"{stage:>6}{m['params_bytes'] / gib:>10.2f}{m['grads_bytes'] / gib:>10.2f}"
            f"{m['optimizer_bytes'] / gib:>10.2f}{m['activations_bytes'] / gib:>10.2f}{m['buffers_bytes'] / gib:>10.2f}"
            f"{m['total_bytes'] / gib:>11.2f}{m['cpu_bytes'] / gib:>9.2f}{m['init_bytes'] / gib:>9.2f}"
        )
    return "\n".join(lines)


def preset_size_table() -> list[dict]:
    """One row per named preset (``raylm model-info --list``): name, n_layer, n_embd, n_head,
    n_kv_head, mlp, vocab_size, block_size, params and non_embedding_params, from the shape alone."""
    rows = []
    for name in PRESETS:
        cfg = model_config_from_preset(name)
        rows.append(
            dict(
                name=name,
                n_layer=cfg.n_layer,
                n_embd=cfg.n_embd,
                n_head=cfg.n_head,
                n_kv_head=cfg.kv_heads,
                mlp=cfg.mlp,
                vocab_size=cfg.vocab_size,
                block_size=cfg.block_size,
                params=count_params(cfg),
                non_embedding_params=count_params(cfg, non_embedding=True),
            )
        )
    return rows


def preset_size_table_text() -> str:
    """``preset_size_table`` as aligned text, parameter counts in millions."""
    head = f"{'preset':<13}{'layers':>7}{'n_embd':>7}{'heads':>6}{'kv':>4}{'mlp':>7}{'vocab':>7}{'block':>6}"
    lines = [f"{head}{'params':>10}{'non-emb':>10}"]
    for r in preset_size_table():
        lines.append(
            f"{r['name']:<13}{r['n_layer']:>7}{r['n_embd']:>7}{r['n_head']:>6}{r['n_kv_head']:>4}{r['mlp']:>7}"
            f"{r['vocab_size']:>7}{r['block_size']:>6}"
            f"{r['params'] / 1e6:>9.2f}M{r['non_embedding_params'] / 1e6:>9.2f}M"
        )
    return "\n".join(lines)
