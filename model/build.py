"""Build a model by config, on any device, and give a meta-device model real, seeded weights.

A large model is built on the ``meta`` device (shapes only, no memory), then ``materialize`` allocates
it straight on the target device and draws its initial weights there from a seeded generator. So a
rank never holds a full fp32 copy on the host before ZeRO (or sharding) takes over, and every rank
that materializes with the same seed on the same device type holds the same weights.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from model.config import ModelConfig
from model.gpt import GPT
from model.lstm import RecurrentLM


def build_model(cfg: ModelConfig, device: str | torch.device | None = None) -> nn.Module:
    """The model ``cfg.arch`` names, ``GPT`` for "gpt" and ``RecurrentLM`` for "rnn" / "gru" / "lstm", built on
    ``device`` (None: torch's default, the CPU). Initialised from the global RNG, except on "meta",
    where nothing is allocated and ``materialize`` must follow before use."""
    cls = GPT if cfg.arch == "gpt" else RecurrentLM
    if device is None:
        return cls(cfg)
    with torch.device(device):
        return cls(cfg)


def materialize(model: nn.Module, device: str | torch.device, seed: int) -> nn.Module:
    """Allocate ``model``'s parameters and buffers on ``device`` and initialise them with the model's
    own init (``init_weights``: the constructor's distributions, fixed tables rebuilt, tied weights
    tied again) from a generator seeded with ``seed``. In place; returns the model.

    The weights depend on (seed, device type) only: equal on every rank of a job, and equal to
    ``build_model(cfg, device)`` followed by ``init_weights(torch.Generator(device).manual_seed(seed))``.
    """
    if not hasattr(model, "init_weights"):
        raise TypeError(f"{type(model).__name__} has no init_weights(generator); materialize needs one")
    device = torch.device(device)
    model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        model.init_weights(generator)
    return model
