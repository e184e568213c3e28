"""Consolidated fp32 weights (``model.safetensors``), streamed tensor by tensor.

Interval checkpoints hold only the engine's state, each rank writing its own files, so no save in the
step loop gathers the whole model onto one rank. The consolidated file is written

- at the end of a run, by the workers (``write_from_engine``): each parameter's fp32 master is
  gathered in turn (a collective) and rank 0 appends it to the file, holding one tensor at a time;
- on demand, from a checkpoint's engine files (``consolidate_checkpoint``: ``raylm consolidate``,
  and any command that reads the weights of a checkpoint written without them): stage 0's unsharded
  state or DeepSpeed's ZeRO partitions, memory-mapped. ZeRO-3 partitions are merged one tensor at a
  time; DeepSpeed's ZeRO-1/2 reader concatenates each parameter group's partitions, so that offline
  process holds one fp32 copy of the model.

The file is plain safetensors: an 8-byte header length, a JSON header with every tensor's dtype,
shape and byte range, then the tensors' bytes in header order, written as they arrive, into a
partial file renamed into place once whole: two consolidations of one checkpoint (eval and serve at
once) each rename a whole file, and an interrupted one leaves none. The header says how long the file
must be (``safetensors_declared_bytes``), which readers check before trusting one.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
import uuid
from pathlib import Path
from typing import Callable, Iterable

import torch

from orchestration.checkpoint_format import DS_TAG, MODEL_FILE
from orchestration.train.ddp import STATE_FILE as DDP_STATE_FILE

_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_safetensors_streaming(
    path: str | Path, specs: list[tuple[str, tuple[int, ...], torch.dtype]], tensors: Iterable, metadata: dict
) -> int:
    """Write ``tensors`` (in ``specs`` order: name, shape, dtype) to a safetensors file as they come,
    so the caller never holds more than one; returns the bytes written. Anything with
    ``.contiguous()`` returning a tensor (DeepSpeed's lazy ZeRO-3 tensors) is accepted."""
    header: dict = {"__metadata__": {k: str(v) for k, v in metadata.items()}}
    offset = 0
    for name, shape, dtype in specs:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    path = Path(path)
    partial = path.with_name(f"{path.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(partial, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for (name, shape, dtype), tensor in zip(specs, tensors, strict=True):
                tensor = tensor.contiguous().detach().to("cpu", dtype)
                if tuple(tensor.shape) != tuple(shape):
                    raise ValueError(f"{name}: shape {tuple(tensor.shape)}, expected {tuple(shape)}")
                f.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
        os.replace(partial, path)  # atomic: readers see no file or a whole one, never a part
    except BaseException:  # Ctrl-C included: an interrupted write leaves nothing behind
        partial.unlink(missing_ok=True)
        raise
    return 8 + len(raw) + offset


def safetensors_declared_bytes(read_at: Callable[[int, int], bytes]) -> int:
    """The size a safetensors file's own header says the file has (8 + header + the last tensor's
    end), from ``read_at(offset, length)``: a file shorter than this was cut short."""
    (header_len,) = struct.unpack("<Q", read_at(0, 8))
    header = json.loads(read_at(8, header_len))
    ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
    return 8 + header_len + max(ends, default=0)


def full_fp32_param(param: torch.nn.Parameter) -> torch.Tensor:
    """One parameter's full fp32 value under any engine. Collective under ZeRO: every rank calls it.
    Master weights come from the ZeRO optimizer partitions, so a bf16 run saves its fp32 masters."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    full = safe_get_full_fp32_param(param) if param.requires_grad else None
    if full is None and hasattr(param, "ds_id"):
        # ZeRO-3 partitions frozen parameters too (fine-tuning) but keeps no fp32 master for them
        with deepspeed.zero.GatheredParameters([param]):
            full = param.detach().clone()
    elif full is None:  # no partitioned master: DDP, or ZeRO-0; the parameter is the master
        full = param.detach()
    return full.float()


def persistent_buffers(raw_model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    params = {n for n, _ in raw_model.named_parameters(remove_duplicate=False)}
    return [(n, t) for n, t in raw_model.state_dict().items() if n not in params]


def write_from_engine(raw_model: torch.nn.Module, rank: int, path: str | Path, metadata: dict) -> int:
    """The end-of-run ``model.safetensors`` from a live engine (collective: every rank calls it; rank 0
    writes). Tied weights appear once. Returns the bytes rank 0 wrote (0 on other ranks)."""
    params = list(raw_model.named_parameters())
    buffers = persistent_buffers(raw_model)
    tensors = (full_fp32_param(p) for _, p in params)
    if rank != 0:
        for _ in tensors:  # join every parameter's gather
            pass
        return 0
    specs = [(n, tuple(getattr(p, "ds_shape", p.shape)), torch.float32) for n, p in params]
    specs += [(n, tuple(b.shape), torch.float32) for n, b in buffers]
    return write_safetensors_streaming(path, specs, itertools.chain(tensors, (b for _, b in buffers)), metadata)


def consolidate_checkpoint(local_dir: str | Path, meta: dict) -> Path:
    """Write ``model.safetensors`` into a local checkpoint directory from its engine files (all
    ranks' of them must be there) and return its path. Tied weights appear once."""
    root = Path(local_dir)
    if meta.get("zero_stage", 1) == 0:
        state = torch.load(root / DS_TAG / DDP_STATE_FILE, map_location="cpu", mmap=True, weights_only=False)["module"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=DS_TAG, lazy_mode=True)
    seen, specs, tensors = set(), [], []
    for name, tensor in state.items():
        key = tensor.data_ptr() if isinstance(tensor, torch.Tensor) else id(tensor)
        if key in seen:  # a tied alias (lm_head = wte)
            continue
        seen.add(key)
        specs.append((name, tuple(tensor.shape), torch.float32))
        tensors.append(tensor)
    out = root / MODEL_FILE
    write_safetensors_streaming(out, specs, tensors, {"format": "pt", "step": meta["step"]})
    return out
