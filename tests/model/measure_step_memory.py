"""Peak RSS of real fp32 training steps, run as its own process: `python measure_step_memory.py SPEC`.

SPEC is JSON: {"model": ModelConfig kwargs, "micro_batch_size", "seq_len", "activation_checkpointing",
"checkpoint_every"}. Prints JSON: peak_bytes (VmHWM above the RSS just before the model is built)
after 2 steps of the bare loop (zero_grad(set_to_none) -> forward -> backward -> AdamW step, the
logits dropped as the training loop does). A warm-up step on a one-block model first loads kernels
and thread pools, so they are not counted; /proc/self/clear_refs then restarts the peak.
"""

from __future__ import annotations

import gc
import json
import sys

import torch

from model.config import ModelConfig
from model.gpt import GPT


def rss_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def train_step(model: GPT, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    model(x, y)[1].backward()
    opt.step()


def main(spec: dict) -> dict:
    torch.set_num_threads(1)
    mb, seq_len, mode = spec["micro_batch_size"], spec["seq_len"], spec["activation_checkpointing"]
    warm = GPT(ModelConfig(**{**spec["model"], "vocab_size": 64, "block_size": 16, "n_layer": 1, "n_embd": 32}))
    warm.set_activation_checkpointing(mode)
    tokens = torch.zeros(2, 16, dtype=torch.long)
    train_step(warm, torch.optim.AdamW(warm.parameters()), tokens, tokens)
    del warm
    cfg = ModelConfig(**spec["model"])
    gen = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, cfg.vocab_size, (mb, seq_len), generator=gen) for _ in range(2))
    gc.collect()
    base = rss_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    model = GPT(cfg)
    model.set_activation_checkpointing(mode, spec.get("checkpoint_every", 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(2):  # Adam's m and v exist from the first step on: step 2 is the steady state
        train_step(model, opt, x, y)
    return dict(peak_bytes=rss_bytes("VmHWM") - base)


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
