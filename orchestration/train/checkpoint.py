"""Checkpoints: the engine's own state + a consolidated ``model.safetensors`` + metadata.

Layout of one checkpoint directory (all ranks' files merged into it by Ray Train):

    ds/                     the engine's files: DeepSpeed's model states and one optimizer partition
                            per rank (ZeRO 1-3), or one engine_state.pt (ZeRO-0: DDP, nothing sharded)
    rng_rank{r}.pt          each rank's torch/numpy/python RNG state
    model.safetensors       full fp32 weights (gathered from ZeRO shards), loadable without DeepSpeed
    model_config.json       the ModelConfig (vocab size from the tokenizer)
    tokenizer.json          where the tokenizer lives (manifest URI + tokenizer hash)
    raylm_meta.json         step, consumed sequences, config and every file's size: written LAST

``raylm_meta.json`` is the completeness marker: a directory is a usable checkpoint only when it
exists and every file it lists is present with the listed size (``complete_checkpoint_meta``), so a partial
upload is never picked as the latest.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pyarrow.fs as pafs
import torch

from orchestration.artifacts import CHECKPOINT_META_FILE, RunDir, complete_checkpoint_meta

MODEL_FILE = "model.safetensors"
MODEL_CONFIG_FILE = "model_config.json"
TOKENIZER_FILE = "tokenizer.json"
DS_TAG = "ds"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or does not fit the run, with its location."""


def gather_fp32_state_dict(engine, raw_model: torch.nn.Module, rank: int) -> Optional[dict]:
    """Full fp32 weights of a DeepSpeed-wrapped model on rank 0 (None on other ranks).

    Collective: every rank must call it. Master weights come from the ZeRO optimizer partitions
    (``safe_get_full_fp32_param`` all-reduces the shards) so a bf16 run saves its fp32 masters; with
    no partitioned master copy (ZeRO-0 in fp32) the parameter itself is the master.
    """
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    state: dict[str, torch.Tensor] = {}
    for name, param in raw_model.named_parameters():  # tied weights appear once
        full = safe_get_full_fp32_param(param) if param.requires_grad else None
        if full is None and hasattr(param, "ds_id"):
            # ZeRO-3 partitions frozen parameters too (fine-tuning) but keeps no fp32 master for them
            with deepspeed.zero.GatheredParameters([param]):
                full = param.detach().clone()
        elif full is None:
            full = param.detach()
        if rank == 0:
            state[name] = full.detach().float().cpu().clone().contiguous()
    if rank != 0:
        return None
    params = {n for n, _ in raw_model.named_parameters(remove_duplicate=False)}
    for name, tensor in raw_model.state_dict().items():  # persistent buffers
        if name not in params:
            state[name] = tensor.detach().float().cpu().clone().contiguous()
    return state


def _rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _list_files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def save_checkpoint(
    engine,
    raw_model: torch.nn.Module,
    *,
    step: int,
    consumed_sequences: int,
    rank: int,
    world_size: int,
    model_config,
    files: dict[str, bytes],
    meta: dict,
    weight_files: Optional[Callable[[dict], dict[str, dict]]] = None,
) -> str:
    """Write this rank's part of a checkpoint to a fresh local temp dir and return its path.

    Collective (DeepSpeed save, weight gather, file-list gather). Rank 0 also writes the consolidated
    weights, model config, ``files`` (name -> bytes: the tokenizer, which travels with the weights,
    and other small files) and, last, ``raylm_meta.json`` (``meta`` plus step, world size and every
    rank's files) so ``complete_checkpoint_meta`` can tell a finished checkpoint from a partial one.
    ``weight_files`` maps the gathered state dict to
    {file name: state dict} (default: all of it in ``model.safetensors``); fine-tuning uses it to
    save merged LoRA weights, the adapters and a task head apart.
    """
    import torch.distributed as dist
    from safetensors.torch import save_file

    tmp = Path(tempfile.mkdtemp(prefix=f"raylm_ckpt_{step:08d}_rank{rank}_"))
    engine.save_checkpoint(str(tmp), tag=DS_TAG)
    state = gather_fp32_state_dict(engine, raw_model, rank)
    torch.save(_rng_state(), tmp / f"rng_rank{rank}.pt")
    if rank == 0:
        for file_name, tensors in (weight_files or (lambda full: {MODEL_FILE: full}))(state).items():
            save_file(tensors, str(tmp / file_name), metadata={"format": "pt", "step": str(step)})
        (tmp / MODEL_CONFIG_FILE).write_text(json.dumps(asdict(model_config), indent=2))
        for name, data in files.items():
            (tmp / name).write_bytes(data)
    written = _list_files(tmp)
    all_files: list = [None] * world_size
    if dist.is_available() and dist.is_initialized():
        dist.all_gather_object(all_files, written)
    else:
        all_files = [written]
    if rank == 0:
        merged: dict[str, int] = {}
        for rank_files in all_files:
            merged.update(rank_files)  # DeepSpeed names per-rank files apart; `latest` is identical
        full_meta = {
            **meta,
            "step": step,
            "consumed_sequences": consumed_sequences,
            "world_size": world_size,
            "files": merged,
        }
        (tmp / CHECKPOINT_META_FILE).write_text(json.dumps(full_meta, indent=2))
    return str(tmp)


def checkpoint_meta(local_dir: str) -> dict:
    """A local checkpoint directory's meta (step, world size, ZeRO stage, ...); CheckpointError if incomplete."""
    meta = complete_checkpoint_meta(RunDir(local_dir, pafs.LocalFileSystem(), local_dir))
    if meta is None:
        raise CheckpointError(
            f"checkpoint {local_dir} is incomplete (no {CHECKPOINT_META_FILE} or files missing); "
            "delete it to resume from the previous one"
        )
    return meta


def universal_checkpoint(local_dir: str, meta: dict, world_size: int) -> Optional[str]:
    """When ``local_dir`` holds ZeRO state (stages 1-3) sharded over another worker count: a temp dir
    with it converted to DeepSpeed's universal checkpoint (each parameter's fp32 weights and Adam
    moments whole, which any partitioning loads), under the same tag. None when nothing needs
    resharding: the same worker count, or stage 0's unsharded state. Every rank converts its own copy
    (each node holds the checkpoint locally); only a resume on a new worker count pays for it."""
    if meta["world_size"] == world_size or meta.get("zero_stage", 1) == 0:
        return None
    import argparse
    import contextlib
    import io

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    out = tempfile.mkdtemp(prefix="raylm_universal_")
    args = argparse.Namespace(
        input_folder=os.path.join(local_dir, DS_TAG),
        output_folder=os.path.join(out, DS_TAG),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # torch's AdamW leaves out state the converter looks for
    )
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # progress bars
        ds_to_universal(args)
    return out


def restore_checkpoint(
    engine, local_dir: str, meta: dict, *, rank: int, world_size: int, universal_dir: Optional[str] = None
) -> None:
    """Load the engine's model/optimizer state and this rank's RNG from a local checkpoint dir whose
    ``checkpoint_meta`` is ``meta``. State written by another worker count loads too: a stage-0 (DDP)
    checkpoint is unsharded, ZeRO state comes from ``universal_dir`` (``universal_checkpoint``, with
    the engine built to load it); each rank then keeps its own seeded RNG streams.
    """
    same_world = meta["world_size"] == world_size
    if not same_world and meta.get("zero_stage", 1) != 0 and universal_dir is None:
        raise CheckpointError(
            f"checkpoint {local_dir} holds ZeRO-{meta.get('zero_stage')} state sharded over {meta['world_size']} "
            f"workers; this run has {world_size}: convert it with universal_checkpoint() first"
        )
    # Our AdamW groups' hyperparameters come from the config, not the checkpoint: DeepSpeed's ZeRO-3
    # universal load copies group 0's (weight decay 0.1) onto every group, the no-decay one included.
    hyper = [{k: g[k] for k in ("weight_decay", "betas", "eps")} for g in engine.optimizer.param_groups]
    load_path, _ = engine.load_checkpoint(
        universal_dir or local_dir, tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
    )
    for group, values in zip(engine.optimizer.param_groups, hyper):
        group.update(values)
    if universal_dir is not None:
        shutil.rmtree(universal_dir, ignore_errors=True)
    if load_path is None:
        raise CheckpointError(f"the engine found no checkpoint under {universal_dir or local_dir}/{DS_TAG}")
    if same_world:
        _set_rng_state(torch.load(os.path.join(local_dir, f"rng_rank{rank}.pt"), weights_only=False))


def load_weights(model: torch.nn.Module, state: dict, source: str) -> None:
    """Load a consolidated state dict; tied aliases (lm_head = wte) may be absent, nothing else."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    first: dict[int, str] = {}
    aliases = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases.add(name)
        first.setdefault(id(p), name)
    if unexpected or set(missing) - aliases:
        raise CheckpointError(
            f"{source} does not fit the model: missing {sorted(set(missing) - aliases)}, "
            f"unexpected {sorted(unexpected)}"
        )


def load_consolidated_state(local_dir: str) -> tuple[dict, dict, dict, dict]:
    """(state_dict, model_config dict, tokenizer ref, meta) from a checkpoint dir, no DeepSpeed."""
    from safetensors.torch import load_file

    root = Path(local_dir)
    meta_path = root / CHECKPOINT_META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{local_dir} has no {CHECKPOINT_META_FILE}: not a complete raylm checkpoint")
    meta: Any = json.loads(meta_path.read_text())
    state = load_file(str(root / MODEL_FILE))
    model_cfg = json.loads((root / MODEL_CONFIG_FILE).read_text())
    tokenizer_ref = json.loads((root / TOKENIZER_FILE).read_text())
    return state, model_cfg, tokenizer_ref, meta
