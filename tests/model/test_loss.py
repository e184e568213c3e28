"""model.loss: the chunked head + cross-entropy gives the plain head's loss and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import model.loss as head_loss
from model.loss import LMHead, loss_chunk_rows

VOCAB, WIDTH = 97, 16


def _plain(head: LMHead, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, head.weight).float()
    return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), ignore_index=-1)


@pytest.mark.parametrize("rows_per_chunk", [None, 5])  # one chunk; 5 rows a chunk (5 chunks, the last short)
@pytest.mark.parametrize("dtype,autocast", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)])
def test_chunked_loss_and_gradients_equal_the_plain_heads(rows_per_chunk, dtype, autocast, monkeypatch):
    if rows_per_chunk:
        monkeypatch.setattr(head_loss, "LOSS_CHUNK_BYTES", 4 * VOCAB * rows_per_chunk)
    torch.manual_seed(0)
    head = LMHead(WIDTH, VOCAB).to(dtype)
    hidden = torch.randn(3, 7, WIDTH, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, VOCAB, (3, 7))
    targets[0, :3] = -1  # ignored positions
    grads = []
    for loss_fn in (lambda: head(hidden, targets), lambda: _plain(head, hidden, targets)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn()
        (2 * loss).backward()  # a scaled loss: backward scales the stored gradients
        grads.append((loss.detach(), hidden.grad, head.weight.grad))
        hidden.grad = head.weight.grad = None
    (ours, our_hidden, our_weight), (plain, plain_hidden, plain_weight) = grads
    assert ours.dtype == torch.float32  # exact in fp32 even for a bf16 head
    torch.testing.assert_close(ours, plain.float(), atol=1e-6, rtol=1e-6)
    assert our_hidden.dtype == hidden.dtype and our_weight.dtype == head.weight.dtype
    # chunks accumulate the weight's gradient in fp32, the plain head in one bf16 matmul
    tol = 1e-6 if dtype == torch.float32 and not autocast else 4e-3
    torch.testing.assert_close(our_hidden.float(), plain_hidden.float(), atol=tol, rtol=0)
    torch.testing.assert_close(our_weight.float(), plain_weight.float(), atol=tol, rtol=0)


def test_no_gradients_are_made_when_none_are_needed():
    head = LMHead(WIDTH, VOCAB)
    hidden, targets = torch.randn(4, WIDTH), torch.randint(0, VOCAB, (4,))
    with torch.no_grad():
        loss = head(hidden, targets)
    torch.testing.assert_close(loss, _plain(head, hidden, targets))
    head.weight.requires_grad_(False)  # a frozen head (LoRA fine-tuning): only the hidden states' gradient
    hidden.requires_grad_(True)
    head(hidden, targets).backward()
    assert hidden.grad is not None and head.weight.grad is None


def test_a_chunk_holds_the_budgeted_fp32_logits():
    assert loss_chunk_rows(50_257) == head_loss.LOSS_CHUNK_BYTES // (4 * 50_257)
    assert loss_chunk_rows(10**12) == 1


def test_padding_rows_are_never_a_token():
    """pad_vocab_to: 50 tokens in 64 rows. Logits, the loss, sampling and the Hugging Face export see
    the 50; the 14 padding rows get no probability and no gradient."""
    from model.config import ModelConfig
    from model.generate import generate
    from model.gpt import GPT
    from orchestration.deploy.hf import hf_state

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, pad_vocab_to=64, block_size=16, n_layer=1, n_head=2, n_embd=16)
    model = GPT(cfg)
    assert cfg.padded_vocab_size == 64 and model.transformer.wte.weight.shape == (64, 16)
    x = torch.randint(0, 50, (2, 9))
    logits = model(x[:, :-1])[0]
    assert logits.shape == (2, 8, 50)
    _, loss = model(x[:, :-1], x[:, 1:])
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, 50), x[:, 1:].reshape(-1)))
    loss.backward()
    grad = model.lm_head.weight.grad  # tied: the embedding's gradient too
    assert grad[50:].abs().sum() == 0 and grad[:50].abs().sum() > 0
    model.lm_head.weight.data[50:] = 100.0  # padding rows that would win every draw if they could
    assert max(max(seq) for seq in generate(model, [[1, 2, 3]] * 4, 12, temperature=1.5, seed=3)) < 50
    state = hf_state(model, "gpt2")
    assert state["transformer.wte.weight"].shape == (50, 16)
