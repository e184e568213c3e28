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
    head = LMHead(WIDTH, VOCAB, bias=False).to(dtype)
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
    head = LMHead(WIDTH, VOCAB, bias=False)
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
