"""LoRA adapters (Hu et al. 2021) on a model's linear projections, plus merging them back.

A ``LoRALinear`` *is* the ``nn.Linear`` it replaces (same ``weight``/``bias`` names, so checkpoints,
ZeRO partitioning and the HF exporter see the usual parameters) with two extra matrices:
y = x W^T + b + (alpha / r) * dropout(x) A^T B^T. B starts at zero, so an adapted model computes
exactly what the pretrained one did until the first update.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import LORA_TARGETS


class LoRALinear(nn.Linear):
    """A frozen linear layer plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__(
            base.in_features,
            base.out_features,
            bias=base.bias is not None,
            device=base.weight.device,
            dtype=base.weight.dtype,
        )
        with torch.no_grad():
            self.weight.copy_(base.weight)
            if base.bias is not None:
                self.bias.copy_(base.bias)
        self.rank, self.scale = rank, alpha / rank
        self.lora_A = nn.Parameter(
            torch.empty(rank, base.in_features, dtype=base.weight.dtype, device=base.weight.device)
        )
        self.lora_B = nn.Parameter(
            torch.zeros(base.out_features, rank, dtype=base.weight.dtype, device=base.weight.device)
        )
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear's own init (and PEFT)
        self.lora_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (
            F.linear(x, self.weight, self.bias)
            + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scale
        )

    def delta(self) -> torch.Tensor:
        """The update the adapter adds to ``weight``: scale * B @ A."""
        return (self.lora_B @ self.lora_A) * self.scale


def lora_module_names(model: nn.Module, targets: Iterable[str]) -> list[str]:
    """Names of the nn.Linear modules the target short names select (e.g. 'attn', 'mlp')."""
    suffixes: list[str] = []
    for target in targets:
        if target not in LORA_TARGETS:
            raise ValueError(f"unknown LoRA target {target!r}; choose from {sorted(LORA_TARGETS)}")
        suffixes.extend(LORA_TARGETS[target])
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(name.endswith(s) for s in suffixes)
    ]
    if not names:
        raise ValueError(f"LoRA targets {list(targets)} match no linear layer of {type(model).__name__}")
    return names


def apply_lora(model: nn.Module, targets: Iterable[str], *, rank: int, alpha: float, dropout: float = 0.0) -> list[str]:
    """Replace the targeted linears by LoRALinear in place; freeze everything but the adapters.

    Returns the adapted module names. Anything else the caller wants trained (a task head) must be
    unfrozen after this call.
    """
    names = lora_module_names(model, targets)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), rank, alpha, dropout))
    for pname, param in model.named_parameters():
        param.requires_grad = ".lora_" in f".{pname}"
    return names


def merged_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (a full state dict of ``model``) with every adapter folded into its weight.

    The result has the plain model's keys only, so it loads into a model without adapters.
    """
    merged = {k: v for k, v in state.items() if ".lora_" not in k}
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            a, b = state[f"{name}.lora_A"].float(), state[f"{name}.lora_B"].float()
            merged[f"{name}.weight"] = (state[f"{name}.weight"].float() + (b @ a) * module.scale).contiguous()
    return merged


def adapter_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Only the adapter matrices of a full state dict (what 'kept separate' export ships)."""
    return {k: v for k, v in state.items() if ".lora_" in k}
