"""μP (model.mup): the AdamW groups and their LR scales, the init, the forward multipliers, and that the
schedule's LR reaches each group scaled. Training under μP on DDP and ZeRO 1-3 is the session's reference
runs (tests/train/test_train_ray.py); the coordinate check is tests/sweeps/test_mup_check.py."""

from __future__ import annotations

import math

import pytest
import torch

from model.config import ModelConfig
from model.gpt import GPT
from model.mup import HIDDEN_MATRICES, is_hidden_matrix
from orchestration.train.engine import param_groups


def _cfg(n_embd: int, **kw) -> ModelConfig:
    shape = dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=n_embd, bias=True)
    return ModelConfig(**{**shape, "parametrization": "mup", "mup_base_width": 16, **kw})


def test_mup_groups_scale_hidden_matrices_lr_by_base_over_width():
    model = GPT(_cfg(64))  # width_mult 4
    groups = param_groups(model, 0.1)
    by_param = {id(p): g for g in groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert len(by_param) == len(names)  # each parameter in one group (the tied head is the embedding)
    for name, p in names.items():
        group = by_param[id(p)]
        assert group["lr_scale"] == (0.25 if is_hidden_matrix(name) else 1.0), name
        assert group["weight_decay"] == (0.1 if p.dim() >= 2 else 0.0), name
    hidden = [n for n in names if is_hidden_matrix(n)]
    assert len(hidden) == 2 * len(HIDDEN_MATRICES)  # 4 matrices in each of 2 blocks
    assert groups[0]["lr_scale"] == 1.0 and groups[0]["weight_decay"] == 0.1  # the embedding's group first
    # sp: every group at the schedule's LR, the two groups as before
    sp = param_groups(GPT(_cfg(64, parametrization="sp")), 0.1)
    assert [(g["weight_decay"], g["lr_scale"]) for g in sp] == [(0.1, 1.0), (0.0, 1.0)]


def test_mup_init_shrinks_hidden_matrices_only():
    torch.manual_seed(0)
    model = GPT(_cfg(256, n_layer=1))  # width_mult 16: hidden std 0.02 / 4
    std = {n: p.std().item() for n, p in model.named_parameters() if p.dim() >= 2}
    assert std["transformer.wte.weight"] == pytest.approx(0.02, rel=0.05)
    assert std["transformer.h.0.attn.c_attn.weight"] == pytest.approx(0.005, rel=0.05)
    assert std["transformer.h.0.mlp.c_fc.weight"] == pytest.approx(0.005, rel=0.05)
    # c_proj keeps GPT-2's depth scaling on top: 0.005 / sqrt(2 * n_layer)
    assert std["transformer.h.0.mlp.c_proj.weight"] == pytest.approx(0.005 / math.sqrt(2), rel=0.05)


def test_mup_forward_multiplies_logits_and_scales_attention_by_one_over_head_dim():
    torch.manual_seed(0)
    mup_model = GPT(_cfg(64, n_layer=1)).eval()
    sp_model = GPT(_cfg(64, n_layer=1, parametrization="sp")).eval()
    sp_model.load_state_dict(mup_model.state_dict())
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        # with q scaled by 1/sqrt(head_dim), sp's 1/sqrt(head_dim) attention is μP's 1/head_dim
        q_rows = slice(0, 64)
        sp_model.transformer.h[0].attn.c_attn.weight[q_rows] /= math.sqrt(32)
        sp_model.transformer.h[0].attn.c_attn.bias[q_rows] /= math.sqrt(32)
        torch.testing.assert_close(mup_model(ids)[0], sp_model(ids)[0] / 4, atol=1e-6, rtol=1e-5)
        # the loss path (chunked head) multiplies the same way
        targets = torch.randint(0, 64, (2, 16))
        sp_model.lm_head.output_mult = 0.25
        torch.testing.assert_close(mup_model(ids, targets)[1], sp_model(ids, targets)[1])
        # the explicit attention (raylm interpret) computes what SDPA does
        mup_model.set_explicit_attention(True)
        torch.testing.assert_close(mup_model(ids)[0], sp_model(ids)[0], atol=1e-6, rtol=1e-5)


def test_mup_at_base_width_differs_from_sp_only_in_attention():
    cfg = _cfg(16)
    assert cfg.width_mult == 1.0
    groups = param_groups(GPT(cfg), 0.1)
    assert {g["lr_scale"] for g in groups} == {1.0}


def test_mup_needs_a_base_width_and_a_transformer():
    with pytest.raises(ValueError, match="mup_base_width"):
        ModelConfig(parametrization="mup")
    with pytest.raises(ValueError, match="arch 'lstm'"):
        ModelConfig(parametrization="mup", mup_base_width=32, arch="lstm")


def test_schedule_lr_reaches_each_group_times_its_scale():
    """loop.optimizer_step sets every group's LR to the schedule's times its lr_scale (the DDP engine here;
    DeepSpeed's keeps our groups: the reference runs train μP at ZeRO 1-3 to DDP's losses)."""
    from orchestration.config import load_config
    from orchestration.train.engine import wrap_model
    from orchestration.train.loop import Window, optimizer_step
    from orchestration.train.task import Task

    def forward(engine, batch, device):
        _, loss = engine(batch[:, :-1], batch[:, 1:])
        return loss, None, None

    cpu = torch.device("cpu")
    task = Task("lm", None, forward, train_batches=None, val_batches=None, flops_per_token=0.0)
    train = load_config(None, ["train.zero_stage=0", "train.num_workers=1", "train.grad_accum_steps=1"]).train
    engine = wrap_model(GPT(_cfg(64)), train, cpu)
    lr = optimizer_step(engine, train, 3, 10, iter([torch.randint(0, 64, (2, 17))]), Window(cpu), task, cpu)
    assert sorted(round(g["lr"] / lr, 6) for g in engine.optimizer.param_groups) == [0.25, 1.0, 1.0]
