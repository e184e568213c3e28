"""The LM head and its cross-entropy in one step, chunk by chunk, so no (tokens x vocab) logits live.

A plain head + ``F.cross_entropy`` keeps the logits of the whole micro-batch for backward, in fp32 on
the way through the loss: at GPT-2's 50,257 tokens and 16 x 1,024 tokens that is 3.3 GB per copy, and
the loss holds three. Here the head's matmul, the fp32 log-softmax and its gradient are done for a
chunk of rows at a time (``LOSS_CHUNK_BYTES`` of fp32 logits), and the gradients of the hidden states
and of the head's weight are made in the forward pass, where the chunk's probabilities are at hand
(as Liger-Kernel's fused linear cross-entropy does): the FLOPs are those of the plain head, with no
recompute, and backward only scales the stored gradients. The loss is exact in fp32 whatever the
matmuls run in (a bf16 model's own loss would be rounded to bf16: steps of 2^-7 near 4 nats).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

LOSS_CHUNK_BYTES = 256 * 2**20  # the fp32 logits of one chunk of rows


def loss_chunk_rows(vocab_size: int) -> int:
    """Rows of one chunk: ``LOSS_CHUNK_BYTES`` of fp32 logits."""
    return max(1, LOSS_CHUNK_BYTES // (4 * vocab_size))


class LMHead(nn.Linear):
    """The vocabulary projection (an ``nn.Linear`` without bias; its weight may be tied to the token
    embedding). ``head(x)`` gives logits; ``head(x, targets)`` gives the mean cross-entropy against
    ``targets`` (-1: ignored) without the logits. Both run through the module call, so DeepSpeed
    ZeRO-3's hooks gather the weight for either. Rows past ``vocab_size`` (padding: the matmul runs
    over them) are never a token: logits leave them out and the loss gives them no probability.
    ``output_mult`` multiplies the input first (μP's 1/width_mult on logits; 1 under sp)."""

    def __init__(
        self, in_features: int, out_features: int, *, vocab_size: int | None = None, output_mult: float = 1.0
    ) -> None:
        super().__init__(in_features, out_features, bias=False)
        self.vocab_size = vocab_size or out_features
        self.output_mult = output_mult

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if self.output_mult != 1.0:
            x = x * self.output_mult
        if targets is None:
            logits = F.linear(x, self.weight)
            return logits[..., : self.vocab_size] if self.vocab_size < self.out_features else logits
        flat = x.reshape(-1, x.size(-1))
        return _LinearCrossEntropy.apply(flat, self.weight, targets.reshape(-1), self.vocab_size)


class _LinearCrossEntropy(torch.autograd.Function):
    """mean over rows with a target of ``logsumexp(h @ W.T) - (h @ W.T)[target]``, chunked; see the
    module docstring. Matmuls run in the inputs' dtype, or autocast's when it is on (as a plain head
    would); the log-softmax, the loss and the weight's gradient accumulate in fp32."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int):
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        valid = targets != -1
        count = valid.sum().clamp(min=1)  # a tensor: no host sync
        picked_targets = targets.clamp(min=0)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        rows = loss_chunk_rows(weight.size(0))
        for start in range(0, hidden.size(0), rows):
            h, t = hidden[start : start + rows], picked_targets[start : start + rows]
            keep = valid[start : start + rows].float()
            logits = F.linear(h, weight).float()
            if vocab_size < logits.size(1):
                logits[:, vocab_size:] = float("-inf")  # padding rows: no probability, no gradient
            picked = logits.gather(1, t[:, None]).squeeze(1)
            # log-sum-exp in place (torch.logsumexp would hold a second chunk-sized tensor)
            top = logits.amax(dim=-1, keepdim=True)
            exps = logits.sub_(top).exp_()
            sums = exps.sum(dim=-1, keepdim=True)
            total += ((top + sums.log()).squeeze(1) - picked).mul(keep).sum()
            if not (need_hidden or need_weight):
                continue
            # d loss / d logits = (softmax - onehot(target)) / count, on rows with a target
            grad_logits = exps.div_(sums)
            grad_logits.scatter_add_(1, t[:, None], -keep[:, None])
            grad_logits.mul_((keep / count)[:, None])
            grad_logits = grad_logits.to(weight.dtype)
            if need_hidden:
                grad_hidden[start : start + rows] = grad_logits @ weight
            if need_weight:
                grad_weight += (grad_logits.t() @ h).float()
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total / count

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_loss).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None
