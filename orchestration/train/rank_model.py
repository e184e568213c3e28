"""The model a training rank starts from: the same seeded weights on every rank and at every ZeRO
stage, and under ZeRO-3 no rank ever holding more than its share plus one parameter.

Stages 0-2 keep a whole copy per rank anyway: the model is built on the meta device and materialized
on the rank's device (``model.build.materialize``). ZeRO-3 constructs it under DeepSpeed's
``zero.Init``, which partitions each module's parameters as soon as its constructor returns, so a
model that only fits sharded never exists whole on a rank (each rank used to build the full fp32
model first: 80 GB for 20B parameters). The seeded init then runs one gathered parameter at a time,
drawn on rank 0 from the stream ``materialize`` draws, in fp32 and rounded to the parameter's dtype
as DeepSpeed's cast would, and scattered back to the shards.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from model.build import build_model, materialize
from model.config import ModelConfig
from orchestration.train.config import TrainConfig
from orchestration.train.engine import deepspeed_config, import_deepspeed, skip_shm_comm_op


def build_rank_model(model_cfg: ModelConfig, train: TrainConfig, device: torch.device) -> torch.nn.Module:
    """``model_cfg``'s model on this rank, initialised from ``train.seed``; a GPT at ZeRO-3 already
    partitioned over the process group (``train`` must be at the group's size)."""
    if train.zero_stage != 3 or model_cfg.arch != "gpt":  # the LSTM baseline is small: built whole
        return materialize(build_model(model_cfg, device="meta"), device, train.seed)
    deepspeed = import_deepspeed()
    if device.type == "cpu":
        skip_shm_comm_op()
    else:
        torch.cuda.set_device(device)  # zero.Init allocates on the accelerator's current device
    # DeepSpeed's own comm layer over the worker's process group, before its config counts the world
    deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, dist_init_required=False)
    with deepspeed.zero.Init(config_dict_or_path=deepspeed_config(train, hidden_size=model_cfg.n_embd)):
        model = build_model(model_cfg)
    _float_buffers_in_fp32(model)
    generator = torch.Generator(device=device).manual_seed(train.seed)
    with torch.no_grad():
        model.init_weights(generator, write=_gathered_write(deepspeed))
    return model


def _gathered_write(deepspeed) -> Callable:
    """``init_weights``' writer for partitioned parameters: gather one, let rank 0 draw it (in fp32,
    then rounded into a 16-bit parameter), partition it again with rank 0's values."""
    rank0 = not dist.is_initialized() or dist.get_rank() == 0

    def write(param: torch.nn.Parameter, init: Callable[[torch.Tensor], object]) -> None:
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if not rank0:
                return
            if param.dtype == torch.float32:
                init(param)
                return
            full = torch.empty(param.shape, dtype=torch.float32, device=param.device)
            init(full)
            param.copy_(full)

    return write


def _float_buffers_in_fp32(model: torch.nn.Module) -> None:
    """zero.Init creates every floating tensor in the engine's 16-bit dtype, buffers too; the
    position tables stay fp32 as on the other stages (DeepSpeed does not cast buffers there)."""
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and buf.is_floating_point() and buf.dtype != torch.float32:
                module._buffers[name] = buf.float()
