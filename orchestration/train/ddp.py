"""The ZeRO-0 engine: torch DDP, autocast and torch AdamW, with the surface of a DeepSpeed engine.

With nothing to shard, DeepSpeed's stage-0 engine only adds cost: bf16 takes its unfused optimizer
path (an overflow check with a host sync per parameter, a gradient copy to fp32 every step). Here
the weights stay fp32 masters, matmuls run in bf16 under autocast, DDP all-reduces gradients in
buckets while the backward runs (skipped on all but the last micro-batch of a step), and AdamW is
fused on CUDA. The loop and ``orchestration.train.checkpoint`` call it exactly as they call
DeepSpeed: ``engine(x)``, ``backward``, ``step``, ``optimizer``, ``get_global_grad_norm``,
``save_checkpoint``/``load_checkpoint`` (one unsharded file, written by rank 0).
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from typing import Optional

import torch
import torch.distributed as dist

from orchestration.train.config import TrainConfig

STATE_FILE = "engine_state.pt"
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class DDPEngine:
    """One rank's model (DDP-wrapped when there are several), AdamW and gradient accumulation."""

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer, train: TrainConfig, device):
        self.module, self.optimizer, self.device = module, optimizer, torch.device(device)
        self.grad_accum_steps, self.grad_clip = train.grad_accum_steps, train.grad_clip
        self.micro_steps = 0
        self.rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        self.ddp: Optional[torch.nn.parallel.DistributedDataParallel] = None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self.ddp = torch.nn.parallel.DistributedDataParallel(
                module,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                gradient_as_bucket_view=True,  # gradients live in the all-reduce buckets: no extra copy
            )
        dtype = AUTOCAST_DTYPES.get(train.precision)
        self.autocast = torch.autocast(self.device.type, dtype=dtype) if dtype else nullcontext()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=train.precision == "fp16")
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.grad_norm: Optional[torch.Tensor] = None

    def __call__(self, *args, **kwargs):
        if self.ddp is not None and self.module.training:
            # all-reduce gradients only in the backward of a step's last micro-batch
            self.ddp.require_backward_grad_sync = (self.micro_steps + 1) % self.grad_accum_steps == 0
        with self.autocast:
            return (self.ddp or self.module)(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        """Gradients of the micro-batch's share of the step's mean loss (as DeepSpeed scales by 1/GAS)."""
        self.scaler.scale(loss / self.grad_accum_steps).backward()

    def step(self) -> None:
        """Count the micro-batch; on a step's last one, clip, step AdamW and clear the gradients."""
        self.micro_steps += 1
        if self.micro_steps % self.grad_accum_steps:
            return
        self.scaler.unscale_(self.optimizer)
        # the norm stays on the device: reading it (get_global_grad_norm) is the only sync, on log steps
        self.grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip or float("inf"))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def get_global_grad_norm(self) -> Optional[torch.Tensor]:
        return self.grad_norm

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()

    def save_checkpoint(self, save_dir: str, tag: str) -> None:
        """Rank 0 writes the weights, AdamW state and loss scale: every rank holds the same ones."""
        if self.rank != 0:
            return
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        state = {
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
        }
        torch.save(state, os.path.join(save_dir, tag, STATE_FILE))

    def load_checkpoint(
        self, load_dir: str, tag: str, load_optimizer_states: bool = True, load_lr_scheduler_states: bool = False
    ) -> tuple[Optional[str], dict]:
        """(path, {}) after loading what ``save_checkpoint`` wrote, or (None, {}) when there is none. The
        loop sets the lr itself every step, so there is no scheduler state either way."""
        path = os.path.join(load_dir, tag, STATE_FILE)
        if not os.path.isfile(path):
            return None, {}
        state = torch.load(path, map_location=self.device, weights_only=False)
        self.module.load_state_dict(state["module"])
        if load_optimizer_states:
            self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        return path, {}
