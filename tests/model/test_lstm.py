"""Recurrent generation: the state (h, or the LSTM's (h, c)) carried step to step, behind `generate`."""

from __future__ import annotations

import pytest
import torch

from model.config import ModelConfig
from model.generate import generate
from model.lstm import RecurrentLM

torch.set_num_threads(1)  # tiny models: threads only add contention on a loaded machine


def lstm(seed: int = 0, **overrides) -> RecurrentLM:
    # init_std 0.3 spreads the logits so greedy picks are decisive, not float-noise ties
    cfg = ModelConfig(
        **{**dict(arch="lstm", vocab_size=64, block_size=32, n_layer=2, n_embd=32, init_std=0.3), **overrides}
    )
    torch.manual_seed(seed)
    return RecurrentLM(cfg).eval()


def greedy_by_recompute(model: RecurrentLM, prompt: list[int], n: int) -> list[int]:
    """Reference decoding: rerun the full sequence from a zero state for every token."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([seq]))
            seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt) :]


def test_carried_state_decoding_equals_full_recomputation():
    model = lstm()
    prompt = [3, 17, 5, 42, 8]
    out = generate(model, [prompt], 20, temperature=0)
    assert out == [greedy_by_recompute(model, prompt, 20)]
    assert len(set(out[0])) > 1  # a real continuation, not one token repeated

    # decode's logits, fed a prefix then one token at a time, match the full forward at each position
    seq = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        full, _ = model(seq)
        logits, state = model.decode(seq[:, :6])
        torch.testing.assert_close(logits, full[:, 5], rtol=1e-5, atol=1e-5)
        for t in range(6, 20):
            logits, state = model.decode(seq[:, t : t + 1], state)
            torch.testing.assert_close(logits, full[:, t], rtol=1e-5, atol=1e-5)


def test_batched_prompts_of_different_lengths_match_single_runs():
    model = lstm()
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5, 4, 3], [30], [11, 12, 13, 14, 15]]
    batched = generate(model, prompts, 10, temperature=0)
    alone = [generate(model, [p], 10, temperature=0)[0] for p in prompts]
    assert batched == alone and all(len(out) == 10 for out in batched)
    # padding never reaches the state: a short row's logits equal its unpadded forward
    with torch.no_grad():
        padded = torch.tensor([[1, 2, 3, 0, 0, 0, 0], [9, 8, 7, 6, 5, 4, 3]])
        logits, (h, c) = model.decode(padded, lengths=torch.tensor([3, 7]))
        short, _ = model(torch.tensor([[1, 2, 3]]))
        _, (h_short, _) = model.decode(torch.tensor([[1, 2, 3]]))
    torch.testing.assert_close(logits[0], short[0, -1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h[:, 0], h_short[:, 0], rtol=1e-5, atol=1e-5)


def test_sampling_controls_and_eos():
    model = lstm()
    prompts = [[1, 2, 3], [4, 5]]
    greedy = generate(model, prompts, 8, temperature=0)
    assert generate(model, prompts, 8, temperature=1.0, top_k=1, seed=1) == greedy
    assert generate(model, prompts, 8, temperature=1.0, top_p=1e-6, seed=1) == greedy
    sampled = generate(model, prompts, 8, temperature=2.0, seed=123)
    assert generate(model, prompts, 8, temperature=2.0, seed=123) == sampled != greedy

    eos = greedy[0][2]
    out = generate(model, prompts, 8, temperature=0, eos_id=eos)
    assert out[0] == greedy[0][: greedy[0].index(eos) + 1] and len(out[0]) < 8  # eos stops it, included
    assert out[1] == (greedy[1][: greedy[1].index(eos) + 1] if eos in greedy[1] else greedy[1])

    model.train()  # generation samples without dropout and gives the mode back
    assert generate(lstm(dropout=0.5).train(), prompts, 8, temperature=0) == generate(
        lstm(dropout=0.5).eval(), prompts, 8, temperature=0
    )
    generate(model, prompts, 2, temperature=0)
    assert model.training


def test_context_limits_match_the_gpt():
    model = lstm(block_size=16)
    prompt = list(range(12))
    out = generate(model, [prompt], 50, temperature=0)  # 16 + 1 - 12 = 5 new tokens at most
    assert out == [greedy_by_recompute(model, prompt, 5)]
    assert len(generate(model, [list(range(40))], 5, temperature=0)[0]) == 1  # cropped to the context
    with pytest.raises(NotImplementedError, match="RecurrentLM.decode"):
        model(torch.tensor([prompt]), kv_cache=object())


@pytest.mark.parametrize("arch", ["rnn", "gru"])
def test_rnn_and_gru_carry_their_state_like_the_lstm(arch):
    """The plain RNN and the GRU carry one state tensor h: decoding and batched prompts match the
    full forward and single runs, as for the LSTM's (h, c)."""
    model = lstm(arch=arch)
    prompt = [3, 17, 5, 42, 8]
    assert generate(model, [prompt], 12, temperature=0) == [greedy_by_recompute(model, prompt, 12)]
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5, 4, 3], [30]]
    assert generate(model, prompts, 6, temperature=0) == [generate(model, [p], 6, temperature=0)[0] for p in prompts]
    with torch.no_grad():
        _, h = model.decode(torch.tensor([prompt]))
    assert isinstance(h, torch.Tensor) and h.shape == (2, 1, 32)  # (layers, batch, hidden)
