"""A sequence classifier on top of a pretrained GPT: the last real token's hidden state -> a linear head.

The backbone is causal, so the last real token is the only position that has read the whole text;
right padding after it changes nothing it sees. Parameter names are the GPT's plus ``head.*``, so a
pretrained checkpoint loads into ``backbone`` unchanged.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import ModelConfig
from model.gpt import GPT


class GPTClassifier(nn.Module):
    def __init__(self, cfg: ModelConfig, num_classes: int):
        super().__init__()
        if cfg.arch != "gpt":
            raise ValueError(f"a classification head needs a GPT backbone, got arch={cfg.arch!r}")
        self.backbone = GPT(cfg)
        self.head = nn.Linear(cfg.n_embd, num_classes)
        nn.init.normal_(self.head.weight, mean=0.0, std=cfg.init_std)
        nn.init.zeros_(self.head.bias)

    def forward(
        self, idx: torch.Tensor, labels: torch.Tensor | None = None, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) right-padded ids, lengths (B,) real tokens per row (None: all T) ->
        (class logits (B, num_classes), mean cross-entropy against labels (B,) or None)."""
        hidden = self.backbone.hidden_states(idx)
        last = (lengths - 1) if lengths is not None else torch.full((idx.size(0),), idx.size(1) - 1, device=idx.device)
        pooled = hidden[torch.arange(idx.size(0), device=idx.device), last.long()]
        logits = self.head(pooled)
        loss = F.cross_entropy(logits.float(), labels.long()) if labels is not None else None
        return logits, loss
