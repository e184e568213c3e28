"""Meta-device construction: a model built on ``meta`` holds no memory, and ``materialize`` gives it
the model's own initialisation on a real device, seeded, with tied weights tied."""

from __future__ import annotations

import math

import pytest
import torch

from model.build import build_model, materialize
from model.config import ModelConfig
from model.flops import count_params

VARIANTS = {
    "gpt2": {},
    "llama": dict(pos_encoding="rope", n_kv_head=2, mlp="swiglu", norm="rmsnorm", bias=False),
    "sinusoidal-untied": dict(pos_encoding="sinusoidal", tie_embeddings=False),
    "lstm": dict(arch="lstm"),
}


def cfg_of(variant: str) -> ModelConfig:
    base = dict(vocab_size=512, block_size=64, n_layer=4, n_head=4, n_embd=128)
    return ModelConfig(**{**base, **VARIANTS[variant]})


def init_group(name: str) -> str:
    """Which distribution a parameter starts from."""
    if name.endswith("c_proj.weight"):
        return "residual_proj"
    if "ln_" in name or ".bias" in name or name.startswith("lstm.bias"):
        return name.rsplit(".", 1)[-1] + "_const"
    return "lstm_weight" if name.startswith("lstm.") else "normal"


def group_stats(model: torch.nn.Module) -> dict[str, tuple[float, float]]:
    groups: dict[str, list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        groups.setdefault(init_group(name), []).append(p.detach().flatten())
    return {g: (torch.cat(ps).mean().item(), torch.cat(ps).std().item()) for g, ps in groups.items()}


@pytest.mark.parametrize("variant", VARIANTS)
def test_meta_build_then_materialize_matches_the_eager_model(variant):
    cfg = cfg_of(variant)
    meta = build_model(cfg, device="meta")
    assert all(t.is_meta for t in [*meta.parameters(), *meta.buffers()])  # nothing allocated yet
    torch.manual_seed(0)
    eager = build_model(cfg)
    assert [(n, p.shape) for n, p in meta.named_parameters()] == [(n, p.shape) for n, p in eager.named_parameters()]
    assert sum(p.numel() for p in meta.parameters()) == count_params(cfg)

    model = materialize(meta, "cpu", seed=1234)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    if cfg.tie_embeddings:
        wte = model.wte if cfg.arch == "lstm" else model.transformer.wte
        assert model.lm_head.weight is wte.weight
    assert sum(p.numel() for p in model.parameters()) == count_params(cfg)  # tied counted once
    for name, buf in eager.named_buffers():  # fixed tables (RoPE, sinusoidal) rebuilt exactly
        torch.testing.assert_close(dict(model.named_buffers())[name], buf, rtol=0, atol=0)

    # the same distributions as the constructor's init, per group (std to 5%, on >= 16k values)
    ours, ref = group_stats(model), group_stats(eager)
    assert ours.keys() == ref.keys()
    for group, (mean, std) in ref.items():
        if group.endswith("_const"):
            assert ours[group] == (mean, std), group  # norms 1, biases 0 (LSTM forget gate 0.5)
        else:
            assert abs(ours[group][1] - std) < 0.05 * std and abs(ours[group][0]) < 0.1 * std, group
    if cfg.arch == "gpt":
        assert math.isclose(ref["normal"][1], cfg.init_std, rel_tol=0.05)
        assert math.isclose(ref["residual_proj"][1], cfg.init_std / math.sqrt(2 * cfg.n_layer), rel_tol=0.05)

    # and it runs: with the eager model's weights loaded, the same logits
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    model.load_state_dict(eager.state_dict())
    torch.testing.assert_close(model(x)[0], eager(x)[0], rtol=0, atol=0)


def test_materialize_is_seeded_and_equals_init_weights_with_that_seed():
    cfg = cfg_of("llama")
    a = materialize(build_model(cfg, device="meta"), "cpu", seed=7)
    b = materialize(build_model(cfg, device="meta"), "cpu", seed=7)
    c = materialize(build_model(cfg, device="meta"), "cpu", seed=8)
    eager = build_model(cfg)
    eager.init_weights(torch.Generator().manual_seed(7))
    for name, p in a.state_dict().items():
        assert torch.equal(p, b.state_dict()[name]), name  # every rank with seed 7 agrees
        assert torch.equal(p, eager.state_dict()[name]), name
    assert not torch.equal(a.transformer.wte.weight, c.transformer.wte.weight)


def test_materialize_needs_init_weights():
    with pytest.raises(TypeError, match="init_weights"):
        materialize(torch.nn.Linear(2, 2, device="meta"), "cpu", seed=0)
