"""Activation checkpointing and per-block compile change how a step runs, never what it computes:
same loss and gradients as the plain eager model (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from model.config import ModelConfig, checkpointed_blocks
from model.gpt import GPT

VARIANTS = {
    "gpt2": {},
    "llama": dict(pos_encoding="rope", n_kv_head=2, mlp="swiglu", norm="rmsnorm", bias=False),
    "dropout": dict(dropout=0.2),  # recomputation must replay the same dropout masks
}


def tiny(**overrides) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=64, block_size=32, n_layer=4, n_head=4, n_embd=32), **overrides})


def loss_and_grads(model: GPT, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the dropout masks
    loss = model(x, y)[1]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_checkpointed_blocks_by_mode():
    assert checkpointed_blocks(6, "none") == ()
    assert checkpointed_blocks(6, "full") == (0, 1, 2, 3, 4, 5)
    assert checkpointed_blocks(6, "selective") == (1, 3, 5)
    assert checkpointed_blocks(6, "selective", every=3) == (2, 5)
    assert checkpointed_blocks(6, "selective", every=1) == checkpointed_blocks(6, "full")
    with pytest.raises(ValueError, match="allowed"):
        checkpointed_blocks(6, "some")
    with pytest.raises(ValueError, match="every"):
        checkpointed_blocks(6, "selective", every=0)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_checkpointing_gives_the_same_loss_and_gradients(variant, mode):
    torch.manual_seed(0)
    model = GPT(tiny(**VARIANTS[variant])).train()
    x, y = torch.randint(0, 64, (2, 2, 32))
    ref_loss, ref_grads = loss_and_grads(model, x, y)
    assert model.set_activation_checkpointing(mode) == checkpointed_blocks(4, mode)
    loss, grads = loss_and_grads(model, x, y)
    # fp32, same kernels in the same order: equal to float rounding
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_checkpointing_recomputes_only_the_chosen_blocks():
    torch.manual_seed(0)
    model = GPT(tiny())
    calls = [0] * 4
    for i, block in enumerate(model.transformer.h):
        # on the block's first layer, as the checkpoint is inside the block's forward; a pre-hook, as
        # recomputation stops early, once the saved tensors are rebuilt, so post-hooks could miss it
        block.ln_1.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    x = torch.randint(0, 64, (2, 32))
    model.set_activation_checkpointing("selective", every=2)
    model(x, x)[1].backward()
    assert calls == [1, 2, 1, 2]  # blocks 1 and 3 ran again in backward
    calls[:] = [0] * 4
    with torch.no_grad():  # nothing to recompute without a backward
        model(x, x)
    assert calls == [1, 1, 1, 1]
    model.set_activation_checkpointing("none")
    model(x, x)[1].backward()
    assert calls == [2, 2, 2, 2]


@pytest.mark.slow
def test_compiled_blocks_give_the_same_loss_and_gradients():
    torch.manual_seed(0)
    cfg = tiny(n_layer=2, **VARIANTS["llama"])
    eager = GPT(cfg)
    compiled = GPT(cfg)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_blocks()
    compiled.set_activation_checkpointing("selective")  # the recomputation compiled inside the block
    assert list(compiled.state_dict()) == list(eager.state_dict())  # names unchanged for checkpoints
    x, y = torch.randint(0, 64, (2, 2, 32))
    for _ in range(2):  # the second call reuses the compiled graphs
        ref_loss, ref_grads = loss_and_grads(eager, x, y)
        loss, grads = loss_and_grads(compiled, x, y)
        # inductor fuses and reorders fp32 ops: equal to a few ulps of the loss
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5)
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_a_compiled_block_compiles_its_checkpoint_inside():
    """torchtitan's order: the recomputation is part of the block's compiled graph (Dynamo's
    tag_activation_checkpoint), not a checkpoint wrapped around an opaque compiled call."""
    graphs = []

    def capture(graph_module, example_inputs):
        graphs.append([str(node.target) for node in graph_module.graph.nodes if node.op == "call_function"])
        return graph_module.forward

    torch.manual_seed(0)
    model = GPT(tiny(n_layer=2))
    model.set_activation_checkpointing("selective")  # block 1 only
    model.compile_blocks(backend=capture)
    x, y = torch.randint(0, 64, (2, 2, 32))
    model(x, y)[1].backward()
    assert len(graphs) == 2  # one per kind of block, no graph breaks
    assert sum("tag_activation_checkpoint" in ops for ops in graphs) == 1
    assert list(model.state_dict()) == list(GPT(tiny(n_layer=2)).state_dict())
