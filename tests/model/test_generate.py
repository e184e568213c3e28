"""Step-wise generation (``generate_steps``): the tokens ``generate`` returns, one step at a time, for
the GPT (KV cache) and the LSTM (carried state); settings checked before the first step; a closed
iterator gives the model its mode back."""

from __future__ import annotations

import pytest
import torch

from model.config import ModelConfig
from model.generate import generate, generate_steps
from model.gpt import GPT
from model.lstm import RecurrentLM

PROMPTS = [[1, 2, 3, 4, 5], [6, 7], [8]]


def _model(arch: str):
    torch.manual_seed(0)
    if arch == "lstm":
        return RecurrentLM(ModelConfig(arch="lstm", vocab_size=64, block_size=32, n_layer=2, n_embd=32, init_std=0.3))
    return GPT(ModelConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32))


@pytest.mark.parametrize("arch", ["gpt", "lstm"])
@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 1.0, "top_k": 20, "top_p": 0.9, "seed": 3}])
def test_steps_collected_are_generate_and_stop_rows_at_eos(arch, sampling):
    model = _model(arch)
    whole = generate(model, PROMPTS, 12, **sampling)
    eos = whole[1][2]  # a token row 1 emits third: that row ends there, the others go on
    whole = generate(model, PROMPTS, 12, eos_id=eos, **sampling)
    steps = list(generate_steps(model, PROMPTS, 12, eos_id=eos, **sampling))
    assert all(len(step) == len(PROMPTS) for step in steps)
    collected = [[step[row] for step in steps if step[row] is not None] for row in range(len(PROMPTS))]
    assert collected == whole and whole[1][-1] == eos
    ended = whole[1].index(eos)  # after its eos a row yields None until the iterator ends
    assert all(step[1] is None for step in steps[ended + 1 :])
    assert len(steps) == max(len(row) for row in whole) <= 12


def test_settings_are_checked_before_the_first_step_and_closing_restores_the_mode():
    model = _model("gpt").train()
    with pytest.raises(ValueError, match="top_p"):
        generate_steps(model, PROMPTS, 4, top_p=0.0)  # raised at the call, not at the first next()
    with pytest.raises(ValueError, match="at least one token"):
        generate_steps(model, [[1], []], 4)
    steps = generate_steps(model, PROMPTS, 8, temperature=0.0)
    assert model.training  # nothing runs until the first step
    next(steps)
    assert not model.training  # sampling runs in eval mode (no dropout)
    steps.close()
    assert model.training
    # the context caps the steps: a 31-token prompt in a 32-token window has 2 left (the last is not fed back)
    assert len(list(generate_steps(model, [list(range(31))], 10, temperature=0.0))) == 2
