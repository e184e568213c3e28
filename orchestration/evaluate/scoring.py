"""Log-likelihoods of continuations given contexts: what the eval suites and the privacy audit score."""

from __future__ import annotations

import numpy as np
import torch

from orchestration.evaluate.data_source import EvalError


def continuation_logprobs(model, pairs: list[tuple[list[int], list[int]]], *, batch_size: int = 16) -> list[float]:
    """Summed log P(continuation | context) in nats for each (context ids, continuation ids) pair.

    A pair longer than the context window loses context tokens from the left (never continuation ones).
    """
    return [float(t.sum()) for t in continuation_token_logprobs(model, pairs, batch_size=batch_size)]


@torch.no_grad()
def continuation_token_logprobs(
    model, pairs: list[tuple[list[int], list[int]]], *, batch_size: int = 16
) -> list[np.ndarray]:
    """log P(token | context and the tokens before it) in nats for each token of each pair's continuation."""
    block = model.cfg.block_size
    device = next(model.parameters()).device
    out: list[np.ndarray] = []
    for i in range(0, len(pairs), batch_size):
        rows = []
        for ctx, cont in pairs[i : i + batch_size]:
            if not ctx or not cont or len(cont) > block:
                raise EvalError(
                    f"need a context and a continuation of at most block_size={block} tokens, "
                    f"got {len(ctx)} and {len(cont)}"
                )
            ids = (ctx + cont)[-(block + 1) :]
            rows.append((ids[:-1], [-1] * (len(ids) - 1 - len(cont)) + cont))
        width = max(len(x) for x, _ in rows)
        inputs = torch.tensor([x + [0] * (width - len(x)) for x, _ in rows], device=device)
        targets = torch.tensor([y + [-1] * (width - len(y)) for _, y in rows], device=device)
        logits, _ = model(inputs)
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        logp = logp.cpu().numpy()
        for row, ((_, y), (_, cont)) in enumerate(zip(rows, pairs[i : i + batch_size])):
            out.append(logp[row, len(y) - len(cont) : len(y)])
    return out
