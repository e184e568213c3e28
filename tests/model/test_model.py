"""The model package: attention and positions, KV-cache generation, sampling, parameter/FLOP/memory
arithmetic, and that a tiny GPT actually learns. CPU-only, tiny configs, seconds in all."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_cached_decoding_matches_full

from model.config import PRESETS, ModelConfig, model_config_from_preset
from model.flops import (
    activation_bytes,
    count_params,
    estimate_training_memory,
    flops_per_token,
    model_info_text,
    zero_buckets,
)
from model.generate import KVCache, generate, sample_next_token
from model.gpt import GPT
from model.layers import CausalSelfAttention, apply_rope, rope_tables

VARIANTS = {
    "learned": {},
    "sinusoidal": dict(pos_encoding="sinusoidal"),
    "rope": dict(pos_encoding="rope"),
    "gqa-rope-swiglu-rmsnorm": dict(pos_encoding="rope", n_kv_head=2, mlp="swiglu", norm="rmsnorm", bias=False),
}


def tiny(**overrides) -> ModelConfig:
    # init_std 0.1 spreads the logits so greedy picks are decisive, not float-noise ties
    base = dict(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=32, init_std=0.1)
    return ModelConfig(**{**base, **overrides})


def build(cfg: ModelConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(cfg).eval()


def greedy_by_recompute(model: GPT, prompt: list[int], n: int) -> list[int]:
    """Reference decoding: rerun the full sequence for every token, no cache."""
    seq = list(prompt)
    for _ in range(n):
        logits, _ = model(torch.tensor([seq]))
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt) :]


@pytest.mark.parametrize("variant", VARIANTS)
def test_later_tokens_never_change_earlier_logits(variant):
    model = build(tiny(**VARIANTS[variant]))
    idx = torch.randint(0, 64, (2, 16))
    changed = idx.clone()
    changed[:, 9] = (changed[:, 9] + 1) % 64
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, :9], b[:, :9], rtol=0, atol=1e-6)
    assert (a[:, 9:] - b[:, 9:]).abs().amax() > 1e-3  # and the changed token is actually seen


@pytest.mark.parametrize("variant", VARIANTS)
def test_kv_cache_decoding_equals_full_recomputation(variant):
    model = build(tiny(**VARIANTS[variant]))
    prompt = [3, 17, 5, 42, 8]
    assert generate(model, [prompt], 12, temperature=0) == [greedy_by_recompute(model, prompt, 12)]

    # cached logits, fed a prefill then one token at a time, match the full forward at each position
    assert_cached_decoding_matches_full(model, torch.randint(0, 64, (2, 20)), prefill=6, chunk=(8, 14))


@pytest.mark.parametrize("variant", VARIANTS)
def test_batched_prompts_of_different_lengths_match_single_runs(variant):
    model = build(tiny(**VARIANTS[variant]))
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5, 4, 3], [30], [11, 12, 13, 14, 15]]
    batched = generate(model, prompts, 10, temperature=0)
    alone = [generate(model, [p], 10, temperature=0)[0] for p in prompts]
    assert batched == alone
    assert all(len(out) == 10 for out in batched)
    # every query, pad positions included, sees at least one key: no fully masked softmax rows
    cache = KVCache(model.cfg, torch.tensor([2, 0, 6]), 8, torch.float32)
    _, mask = cache.positions_and_mask(torch.zeros(3, 7, dtype=torch.long))
    assert mask.any(dim=-1).all()


def test_sampling_controls():
    model = build(tiny())
    prompts = [[1, 2, 3], [4, 5]]
    greedy = generate(model, prompts, 8, temperature=0)
    assert generate(model, prompts, 8, temperature=1.0, top_k=1, seed=1) == greedy
    assert generate(model, prompts, 8, temperature=1.0, top_p=1e-6, seed=1) == greedy
    sampled = generate(model, prompts, 8, temperature=2.0, seed=123)
    assert generate(model, prompts, 8, temperature=2.0, seed=123) == sampled
    assert generate(model, prompts, 8, temperature=2.0, seed=124) != sampled
    model.train()
    generate(model, prompts, 2, temperature=0)
    assert model.training


def test_eos_stops_a_row_and_is_included():
    model = build(tiny())
    prompts = [[1, 2, 3], [4, 5]]
    greedy = generate(model, prompts, 8, temperature=0)
    eos = greedy[0][2]
    out = generate(model, prompts, 8, temperature=0, eos_id=eos)
    assert out[0] == greedy[0][: greedy[0].index(eos) + 1]
    expected_1 = greedy[1][: greedy[1].index(eos) + 1] if eos in greedy[1] else greedy[1]
    assert out[1] == expected_1


def test_sample_next_token_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    gen = torch.Generator().manual_seed(0)
    top2 = sample_next_token(logits, top_k=2, generator=gen)
    assert set(top2.tolist()) == {0, 1}
    # top_p=0.7: 0.5 alone is short of it, 0.5 + 0.3 reaches it, so exactly tokens {0, 1} survive
    nucleus = sample_next_token(logits, top_p=0.7, generator=gen)
    assert set(nucleus.tolist()) == {0, 1}
    free = sample_next_token(logits, generator=gen)
    assert set(free.tolist()) == {0, 1, 2, 3}
    assert sample_next_token(logits[:1], temperature=0).item() == 0
    # a top_p below float32's smallest positive number still keeps the most likely token
    assert sample_next_token(logits[:3], top_p=1e-300, generator=gen).tolist() == [0, 0, 0]


def test_context_limits():
    model = build(tiny(block_size=16))
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 17, dtype=torch.long))
    # a 12-token prompt leaves room for 16 + 1 - 12 = 5 new tokens, and they match recomputation
    prompt = list(range(12))
    out = generate(model, [prompt], 50, temperature=0)
    assert out == [greedy_by_recompute(model, prompt, 4) + out[0][4:]] and len(out[0]) == 5
    assert len(generate(model, [list(range(40))], 5, temperature=0)[0]) == 1  # cropped to the context


GPT2_PARAMS = {  # Hugging Face's counts, at GPT-2's 50,257 rows (pad_vocab_to=1)
    "gpt2-small": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_count_params_matches_built_model_for_every_preset(name):
    cfg = model_config_from_preset(name)
    with torch.device("meta"):
        model = GPT(cfg)
    assert count_params(cfg) == sum(p.numel() for p in model.parameters())
    if name in GPT2_PARAMS:  # the presets pad the vocabulary to 50,304 rows, as nanoGPT does
        assert cfg.padded_vocab_size == 50_304
        assert count_params(dataclasses.replace(cfg, pad_vocab_to=1)) == GPT2_PARAMS[name]
        assert count_params(cfg) == GPT2_PARAMS[name] + (50_304 - 50_257) * cfg.n_embd


@pytest.mark.parametrize(
    "overrides",
    [
        dict(tie_embeddings=False),
        dict(bias=False),
        dict(n_kv_head=1),
        dict(n_kv_head=2, bias=False),
        dict(mlp="swiglu"),
        dict(mlp="swiglu", mlp_hidden=100),
        dict(norm="rmsnorm"),
        dict(norm="layernorm", bias=False),
        dict(pos_encoding="sinusoidal"),
        dict(pos_encoding="rope"),
    ],
    ids=repr,
)
def test_count_params_and_non_embedding_match_built_variants(overrides):
    cfg = tiny(**overrides)
    model = GPT(cfg)
    named = dict(model.named_parameters())
    assert count_params(cfg) == sum(p.numel() for p in named.values())
    embedding = sum(
        p.numel()
        for n, p in named.items()
        if n in ("transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight")
    )
    assert count_params(cfg, non_embedding=True) == count_params(cfg) - embedding


def test_flops_per_token_by_hand():
    cfg = model_config_from_preset("tiny")  # vocab 512, d 64, 2 layers, gelu 256, biases, learned
    per_layer = 2 * 128 + (64 * 192 + 192 + 64 * 64 + 64) + (64 * 256 + 256 + 256 * 64 + 64)
    n_body = 2 * per_layer + 128
    assert count_params(cfg, non_embedding=True) == n_body == 100_096
    assert flops_per_token(cfg, 128) == 6 * (n_body + 512 * 64) + 12 * 2 * 128 * 64 == 993_792
    gpt2 = model_config_from_preset("gpt2-small")
    # nanoGPT's estimate_mfu for GPT-2 124M (its 50,304 rows) at T=1024: 6 * (params - wpe) + 12 * L * T * d
    assert flops_per_token(gpt2, 1024) == 6 * (124_475_904 - 1024 * 768) + 12 * 12 * 1024 * 768
    assert 6 * count_params(gpt2) / flops_per_token(gpt2, 1024) > 0.85  # 6N dominates


def test_memory_estimate_orders_zero_stages_and_offload():
    cfg = model_config_from_preset("gpt2-small")
    kw = dict(micro_batch_size=4, seq_len=1024, num_workers=4, precision="bf16")
    totals = [estimate_training_memory(cfg, zero_stage=s, **kw)["total_bytes"] for s in range(4)]
    assert totals[0] > totals[1] > totals[2] > totals[3]
    base = estimate_training_memory(cfg, zero_stage=0, **kw)
    n = count_params(cfg)
    # DDP + autocast: fp32 masters and grads, bf16 weight copies for the backward, fp32 Adam moments
    assert (base["params_bytes"], base["grads_bytes"], base["optimizer_bytes"]) == (6 * n, 4 * n, 8 * n)
    assert estimate_training_memory(cfg, zero_stage=1, **kw)["optimizer_bytes"] == 12 * n // 4
    for stage in (1, 2, 3):
        plain = estimate_training_memory(cfg, zero_stage=stage, **kw)
        offloaded = estimate_training_memory(cfg, zero_stage=stage, offload_optimizer=True, **kw)
        assert offloaded["total_bytes"] < plain["total_bytes"] and offloaded["cpu_bytes"] > 0 == plain["cpu_bytes"]
    both = estimate_training_memory(cfg, zero_stage=3, offload_optimizer=True, offload_params=True, **kw)
    assert both["params_bytes"] == 0 and both["cpu_bytes"] == (12 * n + 2 * n) // 4
    fp32 = estimate_training_memory(cfg, zero_stage=0, **{**kw, "precision": "fp32"})
    assert (fp32["params_bytes"], fp32["optimizer_bytes"]) == (4 * n, 8 * n)
    assert fp32["activations_bytes"] > base["activations_bytes"]
    # DeepSpeed keeps an fp32 master copy even when training in fp32
    assert estimate_training_memory(cfg, zero_stage=1, **{**kw, "precision": "fp32"})["optimizer_bytes"] == 12 * n // 4
    # DeepSpeed's working set as raylm sizes it: reduce buckets (double-buffered over several workers),
    # at ZeRO-3 two blocks of gathered weights and a sub-group's step temporaries
    sizes = zero_buckets(3, 768)
    z3 = estimate_training_memory(cfg, zero_stage=3, **kw)
    expected = 4 * sizes["reduce_bucket_size"] + 2 * sizes["stage3_max_live_parameters"] + 12 * sizes["sub_group_size"]
    assert z3["buffers_bytes"] == expected
    assert estimate_training_memory(cfg, zero_stage=1, **kw)["buffers_bytes"] == 2 * 4 * sizes["reduce_bucket_size"]
    assert base["buffers_bytes"] == 0
    ckpt = activation_bytes(cfg, micro_batch_size=4, seq_len=1024, precision="bf16", activation_checkpointing="full")
    assert ckpt < base["activations_bytes"]
    with pytest.raises(ValueError, match="stage"):
        estimate_training_memory(cfg, zero_stage=0, offload_optimizer=True, **kw)
    with pytest.raises(ValueError, match="stage 3"):
        estimate_training_memory(cfg, zero_stage=2, offload_params=True, **kw)


def test_model_info_text_lists_counts_and_every_stage():
    text = model_info_text(
        model_config_from_preset("gpt2-small"),
        micro_batch_size=8,
        seq_len=1024,
        num_workers=8,
        precision="bf16",
        offload_optimizer=True,
    )
    assert "124,475,904" in text and "85,056,000" in text
    assert [line.split()[0] for line in text.splitlines()[-4:]] == ["0", "1", "2", "3"]
    cpu_line = next(line for line in text.splitlines() if line.startswith("CPU fp32 step"))
    none_gib, full_gib = (float(g) for g in re.findall(r"([\d.]+) GiB", cpu_line))
    assert full_gib < none_gib  # full activation checkpointing lowers the estimated peak


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_embd=64)
    model = GPT(cfg)
    data = torch.randint(0, 64, (4, 33))
    x, y = data[:, :-1], data[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        _, loss = model(x, y)
        first = first if first is not None else loss.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert abs(first - math.log(64)) < 0.3  # starts near uniform
    assert loss.item() < 0.1 * first


def test_loss_ignores_minus_one_targets():
    model = build(tiny())
    x = torch.randint(0, 64, (2, 8))
    y = torch.randint(0, 64, (2, 8))
    masked = y.clone()
    masked[:, :5] = -1
    no_logits, loss = model(x, masked)
    logits = model(x)[0]
    assert no_logits is None  # with targets, the head's logits are never made whole (model.loss)
    expected = F.cross_entropy(logits[:, 5:].reshape(-1, 64), y[:, 5:].reshape(-1))
    torch.testing.assert_close(loss, expected)


def test_weight_tying_shares_storage():
    tied, untied = GPT(tiny()), GPT(tiny(tie_embeddings=False))
    assert tied.lm_head.weight.data_ptr() == tied.transformer.wte.weight.data_ptr()
    assert untied.lm_head.weight.data_ptr() != untied.transformer.wte.weight.data_ptr()


def test_gpt2_init_scales_residual_projections():
    cfg = tiny(n_layer=8, n_embd=256, n_head=4, init_std=0.02)
    model = GPT(cfg)
    blk = model.transformer.h[0]
    assert blk.attn.c_attn.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert blk.mlp.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert blk.attn.c_proj.bias.abs().sum() == 0 and blk.mlp.c_fc.bias.abs().sum() == 0


@pytest.mark.parametrize("overrides", [{}, dict(n_kv_head=1), dict(pos_encoding="rope", n_kv_head=2)], ids=repr)
def test_sdpa_attention_matches_naive_reference(overrides):
    cfg = tiny(**overrides)
    torch.manual_seed(0)
    attn = CausalSelfAttention(cfg, layer_idx=0).eval()
    B, T, H, KV, D = 2, 10, cfg.n_head, cfg.kv_heads, cfg.head_dim
    x = torch.randn(B, T, cfg.n_embd)
    rope = rope_tables(T, D, cfg.rope_theta) if cfg.pos_encoding == "rope" else None
    q, k, v = attn.c_attn(x).split([H * D, KV * D, KV * D], dim=-1)
    q, k, v = q.view(B, T, H, D), k.view(B, T, KV, D), v.view(B, T, KV, D)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    # head h reads kv head h // (H / KV)
    k = torch.stack([k[:, :, h * KV // H] for h in range(H)], dim=2)
    v = torch.stack([v[:, :, h * KV // H] for h in range(H)], dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v).reshape(B, T, H * D)
    torch.testing.assert_close(attn(x, rope), attn.c_proj(y), rtol=1e-5, atol=1e-5)


def test_rope_rotates_relative_positions():
    # RoPE's defining property: q.k depends only on the distance between positions
    cos, sin = rope_tables(32, 8, 10000.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def dot(i: int, j: int) -> float:
        return (
            (apply_rope(q, cos[i : i + 1], sin[i : i + 1]) * apply_rope(k, cos[j : j + 1], sin[j : j + 1])).sum().item()
        )

    assert dot(5, 2) == pytest.approx(dot(20, 17), abs=1e-5)
    assert dot(5, 2) != pytest.approx(dot(5, 3), abs=1e-3)


def test_dropout_only_in_training():
    model = build(tiny(dropout=0.2))
    idx = torch.randint(0, 64, (2, 8))
    model.train()
    assert not torch.equal(model(idx)[0], model(idx)[0])
    model.eval()
    assert torch.equal(model(idx)[0], model(idx)[0])


def test_training_forward_compiles_without_graph_breaks():
    # The eager backend traces with dynamo (catching graph breaks) without inductor's compile time
    model = build(tiny(**VARIANTS["gqa-rope-swiglu-rmsnorm"]))
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x, y = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    _, loss = compiled(x, y)
    torch.testing.assert_close(loss, model(x, y)[1])
    loss.backward()
    assert model.transformer.wte.weight.grad is not None
