"""Document masking: attention and positions confined to each document of a packed row.

A training row packs several documents, each ended by the end-of-text token. With
``ModelConfig.document_masking`` a token attends only to the tokens of its own document, up to itself
(block-diagonal causal attention), and positions count from its document's first token, so a document
is computed the same wherever it sits in a row. The end-of-text token belongs to the document it ends;
the token after it starts the next one.

Both functions work in *slots*: a token's index in the row, or in a KV cache, which holds a row's tokens
at slots 0, 1, ... across prefill and decode steps.
"""

from __future__ import annotations

import torch


def document_starts(
    idx: torch.Tensor, eos_id: int, first_slot: int = 0, open_start: torch.Tensor | None = None
) -> torch.Tensor:
    """idx (B, T) token ids at slots first_slot .. first_slot + T - 1 -> (B, T) long: the slot where each
    token's document starts. ``open_start`` (B,) is where the document still open before idx starts (a
    KV cache's earlier tokens); None: a document starts at first_slot."""
    slots = torch.arange(first_slot, first_slot + idx.size(1), device=idx.device)
    # an end-of-text token at slot s opens a document at s + 1. The running max of the openings is the start
    # of the document the *next* token belongs to; shifted right by one, each token's own (0 where idx
    # opened none yet: the document open before idx, which the maximum below puts back)
    opened = torch.where(idx == eos_id, slots + 1, 0).cummax(dim=1).values
    starts = torch.cat([torch.zeros_like(opened[:, :1]), opened[:, :-1]], dim=1)
    before = torch.full_like(starts[:, :1], first_slot) if open_start is None else open_start[:, None]
    return torch.maximum(starts, before)


def document_mask(starts: torch.Tensor, query_slots: torch.Tensor, n_keys: int) -> torch.Tensor:
    """(B, 1, T, n_keys) bool for SDPA (True = attend): the query at query_slots[t] (T,) sees the keys at
    slots starts[b, t] .. query_slots[t], its own document up to itself."""
    keys = torch.arange(n_keys, device=starts.device)
    mask = (keys >= starts[:, :, None]) & (keys <= query_slots[:, None])
    return mask[:, None]
