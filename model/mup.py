"""μP, the maximal update parametrization (Yang et al., Tensor Programs V), for AdamW: what scales with width.

Under the standard parametrization (sp) every layer's update grows with width at a fixed learning rate,
so the best LR shrinks as a model widens and each size needs its own search. μP rescales so that every
layer's activations move by O(1) per step at any width; an LR (and init) tuned at ``mup_base_width``
then transfers. With m = n_embd / mup_base_width (``ModelConfig.width_mult``):

  parameter                                  init std           AdamW LR
  hidden matrices (q/k/v, attention out, MLP)  init_std / sqrt(m)  lr / m
  embeddings, norms, biases, an untied head    init_std            lr

and in the forward, logits are multiplied by 1/m (``output_mult``; with tied embeddings this is what makes
the shared matrix a μP readout) and attention scores by 1/head_dim instead of 1/sqrt(head_dim). At m = 1
only the attention scale differs from sp. The rules are read by ``model.gpt`` (init, forward) and
``orchestration.train.engine.param_groups`` (each group's ``lr_scale``); an export folds the two forward
multipliers into standard weights (``orchestration.deploy.hf``).
"""

from __future__ import annotations

import math
from typing import Optional

from model.config import ModelConfig

# The parameters μP treats as hidden (both dimensions grow with width), by their name's ending in a GPT
HIDDEN_MATRICES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def is_hidden_matrix(name: str) -> bool:
    """Whether parameter ``name`` (any prefix: a classifier's backbone, a wrapper) is a hidden matrix."""
    return name.endswith(HIDDEN_MATRICES) and ".transformer.h." in f".{name}"


def lr_scale(cfg: ModelConfig, name: str) -> float:
    """The factor on the scheduled LR for parameter ``name``: 1/m for hidden matrices under μP, else 1."""
    return 1.0 / cfg.width_mult if is_hidden_matrix(name) else 1.0


def init_scale(cfg: ModelConfig, name: str) -> float:
    """The factor on init_std for parameter ``name``: 1/sqrt(m) for hidden matrices under μP (variance
    ~ 1/fan_in as width grows), else 1."""
    return 1.0 / math.sqrt(cfg.width_mult) if is_hidden_matrix(name) else 1.0


def output_mult(cfg: ModelConfig) -> float:
    """What the LM head's input is multiplied by: 1/m under μP, 1 under sp."""
    return 1.0 / cfg.width_mult


def attention_scale(cfg: ModelConfig) -> Optional[float]:
    """The factor on q·k: 1/head_dim under μP; None (SDPA's 1/sqrt(head_dim)) under sp."""
    return 1.0 / cfg.head_dim if cfg.parametrization == "mup" else None


def query_fold(cfg: ModelConfig) -> float:
    """What the query projection is multiplied by for a standard 1/sqrt(head_dim) attention to compute μP's
    1/head_dim (an export's q rows): 1/sqrt(head_dim) under μP, 1 under sp."""
    return 1.0 / math.sqrt(cfg.head_dim) if cfg.parametrization == "mup" else 1.0
