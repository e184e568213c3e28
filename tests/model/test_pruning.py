"""Structured pruning (model.prune): units that carry nothing score zero and go without changing the
logits; the smaller model is a real smaller shape (state dict, parameter and FLOP counts, KV-cache
generation, the quantized meta-device build, the checkpoint loader); the keep-one and GQA rules."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

from model.config import ModelConfig
from model.flops import count_params, flops_per_token
from model.gpt import GPT
from model.prune import PrunePlan, prune_model, pruned_config, select_units, unit_importance, units_removed

# (shape overrides, which kv groups and how many leading MLP units carry nothing, heads fraction)
SHAPES = {
    "gelu-mha-learned-bias": (dict(mlp="gelu", pos_encoding="learned", bias=True), 1, 0.25),
    "swiglu-gqa-rope-nobias": (dict(mlp="swiglu", pos_encoding="rope", bias=False, n_kv_head=2), 1, 0.5),
    "swiglu-gqa-sinusoidal-bias-untied": (
        dict(mlp="swiglu", pos_encoding="sinusoidal", bias=True, tie_embeddings=False, n_kv_head=2),
        0,
        0.5,
    ),
}


def _model_with_dead_units(overrides: dict, dead_group: int) -> tuple[GPT, int]:
    """A tiny random GPT (4 heads of 8) whose kv group ``dead_group`` (its query heads) and first 6 MLP
    hidden units feed nothing into the residual stream: their output-projection columns are zero."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32, **overrides)
    model = GPT(cfg).eval()
    group = cfg.n_head // cfg.kv_heads
    dead_q = slice(dead_group * group * cfg.head_dim, (dead_group + 1) * group * cfg.head_dim)
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_proj.weight[:, dead_q] = 0
            block.mlp.c_proj.weight[:, :6] = 0
    return model, group


@pytest.mark.parametrize("shape", SHAPES)
def test_zero_importance_units_go_and_the_logits_stay(shape):
    overrides, dead_group, heads = SHAPES[shape]
    model, group = _model_with_dead_units(overrides, dead_group)
    cfg = model.cfg
    batches = torch.randint(0, cfg.vocab_size, (3, 4, cfg.block_size + 1), generator=torch.Generator().manual_seed(1))
    imp = unit_importance(model, batches)
    dead_heads = list(range(dead_group * group, (dead_group + 1) * group))
    assert imp.sequences == 12 and imp.tokens == 12 * cfg.block_size
    assert (imp.heads[:, dead_heads] == 0).all() and (imp.heads.sum(dim=1) > 0).all()
    assert (imp.neurons[:, :6] == 0).all() and (imp.neurons[:, 6:] > 0).all()
    assert all(p.grad is None for p in model.parameters())  # scoring makes no parameter gradients

    plan = select_units(cfg, imp, heads, 6 / cfg.hidden_dim)
    assert all(set(h).isdisjoint(dead_heads) and len(h) == cfg.n_head - group for h in plan.heads)
    assert all(n == tuple(range(6, cfg.hidden_dim)) for n in plan.neurons)
    pruned = prune_model(model, plan)
    small = pruned.cfg
    assert (small.n_head, small.kv_heads, small.head_dim, small.hidden_dim, small.n_embd) == (
        cfg.n_head - group,
        cfg.kv_heads - 1,
        cfg.head_dim,
        cfg.hidden_dim - 6,
        cfg.n_embd,
    )
    assert small.preset is None and small == pruned_config(cfg, plan)

    idx = batches[0, :, :-1]
    with torch.no_grad():
        torch.testing.assert_close(pruned(idx)[0], model(idx)[0], atol=1e-5, rtol=0)
    from model.generate import generate  # through the KV cache, sized from the pruned config

    prompt = [[3, 1, 4, 1, 5]]
    assert generate(pruned, prompt, 8, temperature=0) == generate(model, prompt, 8, temperature=0)

    # the state dict is exactly a fresh model of the smaller config's; the counts are of that shape
    fresh = {k: v.shape for k, v in GPT(small).state_dict().items()}
    assert {k: v.shape for k, v in pruned.state_dict().items()} == fresh
    n_unique = sum(p.numel() for p in pruned.parameters())
    assert count_params(small) == n_unique < count_params(cfg) == sum(p.numel() for p in model.parameters())
    matmul = count_params(small, non_embedding=True) + small.padded_vocab_size * small.n_embd
    seq_len = 16
    attn = 12 * small.n_layer * seq_len * small.n_head * small.head_dim  # the heads' width, not n_embd
    assert flops_per_token(small, seq_len) == 6 * matmul + attn < flops_per_token(cfg, seq_len)


def test_a_kv_group_is_scored_as_one_unit_and_batching_does_not_weigh_sequences():
    """Under GQA a group's score is |the sum of its query heads' terms| per sequence: a group whose two
    heads cancel (the same output through opposite output projections) scores 0 and goes with the logits
    unchanged, though each of its heads outscores the other group's two together. And a sequence counts
    the same whatever batch it is scored in (a short last batch is not weighed up)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, pos_encoding="rope")
    model = GPT(cfg).eval()
    d = cfg.head_dim
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight[3 * d : 4 * d] = block.attn.c_attn.weight[2 * d : 3 * d]  # head 3 = head 2
            proj = block.attn.c_proj.weight
            proj[:, 2 * d : 3 * d] *= 10
            proj[:, 3 * d : 4 * d] = -proj[:, 2 * d : 3 * d]
    windows = torch.randint(0, 64, (12, cfg.block_size + 1), generator=torch.Generator().manual_seed(2))
    imp = unit_importance(model, windows.split(8))  # 8 + 4
    assert (imp.kv_groups[:, 1] == 0).all() and (imp.kv_groups[:, 0] > 0).all()
    assert (imp.heads[:, 2:].min(dim=1).values > imp.heads[:, :2].sum(dim=1)).all()  # heads' sum would keep it
    plan = select_units(cfg, imp, 0.5, 0.0)
    assert plan.kv_heads == ((0,), (0,)) and plan.heads == ((0, 1), (0, 1))
    idx = windows[:4, :-1]
    with torch.no_grad():
        torch.testing.assert_close(prune_model(model, plan)(idx)[0], model(idx)[0], atol=1e-5, rtol=0)

    again = unit_importance(model, windows.split(3))
    for got, want in ((again.heads, imp.heads), (again.kv_groups, imp.kv_groups), (again.neurons, imp.neurons)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)


def test_pruned_model_quantizes_through_the_meta_device_build():
    from model.quantize import build_quantized_model, quantize_weights

    model, _ = _model_with_dead_units(dict(pos_encoding="rope", bias=False), 1)
    imp = unit_importance(model, [torch.randint(0, 64, (2, 17))])
    pruned = prune_model(model, select_units(model.cfg, imp, 0.25, 0.25))
    tensors, spec = quantize_weights(pruned, "int8")
    quantized = build_quantized_model(pruned.cfg, tensors, spec)
    idx = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        ref, got = pruned(idx)[0], quantized(idx)[0]
    assert ((got - ref).norm() / ref.norm()).item() < 0.02


def test_keep_one_rule_fraction_bounds_and_gqa_groups():
    assert [units_removed(f, 4) for f in (0.0, 0.1, 0.25, 0.5, 0.9, 0.99)] == [0, 0, 1, 2, 3, 3]
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
            units_removed(bad, 4)
    cfg = ModelConfig(vocab_size=64, block_size=16, n_layer=3, n_head=4, n_embd=32)
    model = GPT(cfg)
    imp = unit_importance(model, [torch.randint(0, 64, (2, 17))])
    plan = select_units(cfg, imp, 0.99, 0.99)  # the most a fraction removes: one head, one unit stay
    assert all(len(h) == 1 for h in plan.heads) and all(len(n) == 1 for n in plan.neurons)
    for h, scores in zip(plan.heads, imp.heads):
        assert scores[h[0]] == scores.max()  # the one kept is the layer's most important
    assert pruned_config(cfg, plan).n_head == 1
    with pytest.raises(ValueError, match="heads fraction 0.1 removes none of the 4 heads"):
        select_units(cfg, imp, 0.1, 0.25)
    with pytest.raises(ValueError, match="neurons fraction 0.001 removes none of the 128 MLP hidden units"):
        select_units(cfg, imp, 0.25, 0.001)

    gqa = ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=6, n_kv_head=3, n_embd=48)
    heads, groups = torch.tensor([[5.0, 5.0, 0.1, 9.0, 1.0, 1.0]]), torch.tensor([[10.0, 9.1, 2.0]])
    imp = type(imp)(heads=heads, kv_groups=groups, neurons=torch.rand(1, gqa.hidden_dim), sequences=1, tokens=1)
    plan = select_units(gqa, imp, 0.34, 0.0)  # whole groups go: head 2 is the weakest, but its group is not
    assert plan == PrunePlan(heads=((0, 1, 2, 3),), kv_heads=((0, 1),), neurons=(tuple(range(gqa.hidden_dim)),))
    assert (pruned_config(gqa, plan).n_head, pruned_config(gqa, plan).n_kv_head) == (4, 2)
    with pytest.raises(ValueError, match="none of the 1 KV groups.*whole KV groups of 6 query heads"):
        select_units(ModelConfig(n_head=6, n_kv_head=1, n_embd=48), imp, 0.25, 0.0)


def test_head_size_config_validation_and_checkpoint_round_trip(tmp_path):
    from data_pipeline import tokenizer as tok
    from orchestration.evaluate.load import load_checkpoint_model
    from tests.helpers import write_inference_checkpoint

    with pytest.raises(ValueError, match=r"divisible by n_head \(3\), or head_size must be set"):
        ModelConfig(n_embd=128, n_head=3)
    with pytest.raises(ValueError, match="rope needs an even head_dim, got head_size = 7"):
        ModelConfig(n_embd=64, n_head=3, head_size=7, pos_encoding="rope")
    assert ModelConfig(n_embd=128, n_head=3, head_size=32).attn_dim == 96
    assert ModelConfig(n_embd=64, n_head=2).head_dim == 32  # unset: n_embd / n_head, as before

    spec = tok.train_bpe(["To be, or not to be, that is the question. " * 20], 300, "gpt4")
    model, _ = _model_with_dead_units(dict(pos_encoding="rope", mlp="swiglu", n_kv_head=2), 1)
    model = GPT(ModelConfig(**{**asdict(model.cfg), "vocab_size": tok.encoding(spec).n_vocab}))
    imp = unit_importance(model, [torch.randint(0, 64, (2, 17))])
    pruned = prune_model(model, select_units(model.cfg, imp, 0.5, 0.25)).eval()
    ckpt = write_inference_checkpoint(tmp_path / "run", pruned, spec, step=3)
    loaded, cfg, _, _ = load_checkpoint_model(str(tmp_path / "run"))
    assert cfg == pruned.cfg and cfg.head_size == 8 and cfg.n_head == 2 and cfg.kv_heads == 1
    idx = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        assert torch.equal(loaded(idx)[0], pruned(idx)[0])
    assert ckpt.endswith("checkpoint_00000003")
