"""Checkpoints: the engine's own state, each rank writing its own files, + metadata; the consolidated
``model.safetensors`` only at the end of a run (``orchestration.train.consolidate``). The layout and the
completeness rule are ``orchestration.checkpoint_format``'s. A resuming rank fetches only the files it
loads (``fetched_checkpoint``): its own ZeRO partitions, the shared model states and its RNG state; on
another worker count, its share of ``universal/``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import shutil
import struct
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import pyarrow.fs as pafs
import torch

from orchestration.artifacts import RunDir
from orchestration.checkpoint_format import (
    CHECKPOINT_META_FILE,
    DS_TAG,
    MODEL_CONFIG_FILE,
    MODEL_FILE,
    RANK_FILE_RE,
    TOKENIZER_FILE,
    CheckpointError,
    checkpoint_meta,
    meta_record,
    rng_file,
)
from orchestration.train.consolidate import (
    consolidate_checkpoint,
    full_fp32_param,
    persistent_buffers,
    safetensors_declared_bytes,
    write_from_engine,
)


def gather_fp32_state_dict(raw_model: torch.nn.Module, rank: int) -> Optional[dict]:
    """Full fp32 weights on rank 0 (None on other ranks), as one dict: for ``weight_files`` mappings
    (fine-tuning's merged LoRA weights, adapters and head), which need the whole state at once.
    Collective: every rank must call it."""
    state = {}
    for name, param in raw_model.named_parameters():  # tied weights appear once
        full = full_fp32_param(param)
        if rank == 0:
            state[name] = full.cpu().clone().contiguous()
    if rank != 0:
        return None
    for name, tensor in persistent_buffers(raw_model):
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
    consolidate: bool,
    weight_files: Optional[Callable[[dict], dict[str, dict]]] = None,
) -> tuple[str, list[int]]:
    """Write this rank's part of a checkpoint to a fresh local temp dir; returns (its path, the bytes
    each rank wrote).

    Collective (engine save, file-list gather). Each rank writes its own engine files and RNG state;
    rank 0 also the model config, ``files`` (name -> bytes: the tokenizer, which travels with the
    weights, and other small files) and, last, ``raylm_meta.json`` (``meta`` plus step, world size and
    every rank's files) so ``complete_checkpoint_meta`` can tell a finished checkpoint from a partial
    one. ``consolidate`` (the run's last save) adds ``model.safetensors``, streamed tensor by tensor;
    with ``weight_files`` (fine-tuning: merged LoRA weights, the adapters and a task head apart) the
    gathered state dict is mapped to {file name: state dict} instead.
    """
    import torch.distributed as dist
    from safetensors.torch import save_file

    tmp = Path(tempfile.mkdtemp(prefix=f"raylm_ckpt_{step:08d}_rank{rank}_"))
    engine.save_checkpoint(str(tmp), tag=DS_TAG)
    torch.save(_rng_state(), tmp / rng_file(rank))
    if consolidate and weight_files is None:
        write_from_engine(raw_model, rank, tmp / MODEL_FILE, {"format": "pt", "step": step})
    elif consolidate:
        state = gather_fp32_state_dict(raw_model, rank)
        if rank == 0:
            for file_name, tensors in weight_files(state).items():
                save_file(tensors, str(tmp / file_name), metadata={"format": "pt", "step": str(step)})
    if rank == 0:
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
        full_meta = meta_record(
            meta, step=step, consumed_sequences=consumed_sequences, world_size=world_size, files=merged
        )
        (tmp / CHECKPOINT_META_FILE).write_text(json.dumps(full_meta, indent=2))
    return str(tmp), [sum(rank_files.values()) for rank_files in all_files]


def needs_reshard(meta: dict, world_size: int) -> bool:
    """ZeRO state (stages 1-3) written by another worker count; stage 0's state is not sharded."""
    return meta["world_size"] != world_size and meta.get("zero_stage", 1) != 0


def download(ckpt: RunDir, names: list[str], local: str) -> int:
    """Copy ``names`` (relative to ``ckpt``) under ``local``; returns the bytes copied."""
    from data_pipeline.storage import with_retries

    total = 0
    for name in names:
        target = os.path.join(local, name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        copy = functools.partial(pafs.copy_files, ckpt.path_of(name), target, source_filesystem=ckpt.fs)
        with_retries(copy, what=ckpt.uri_of(name))
        total += os.path.getsize(target)
    return total


def files_to_restore(files: dict[str, int], rank: int, engine_files: bool = True) -> list[str]:
    """The checkpoint files one rank loads to resume: its RNG state and, with ``engine_files``, the
    engine files it reads (the shared model states and its own ZeRO partitions; a resume that
    reshards reads the universal checkpoint instead, ``orchestration.train.reshard``). Never the
    consolidated weights."""
    wanted = []
    for name in files:
        in_engine = name.startswith(f"{DS_TAG}/")
        if not (in_engine and engine_files) and not name.startswith("rng_rank"):
            continue
        owner = RANK_FILE_RE.search(name.rsplit("/", 1)[-1])
        if owner and int(owner.group(1)) != rank:
            continue
        wanted.append(name)
    return wanted


@contextlib.contextmanager
def fetched_checkpoint(ckpt: RunDir, rank: int, world_size: int) -> Iterator[tuple[str, dict]]:
    """(local directory, meta) of a complete checkpoint for one resuming rank. A local checkpoint is
    read in place; from object storage only ``files_to_restore`` is downloaded, into a temp dir
    removed on exit, so no node fetches other ranks' partitions or the consolidated weights."""
    from data_pipeline.storage import with_retries

    meta = with_retries(lambda: checkpoint_meta(ckpt), what=ckpt.uri)
    if isinstance(ckpt.fs, pafs.LocalFileSystem):
        yield ckpt.path, meta
        return
    local = tempfile.mkdtemp(prefix=f"raylm_restore_rank{rank}_")
    try:
        download(ckpt, files_to_restore(meta["files"], rank, not needs_reshard(meta, world_size)), local)
        yield local, meta
    finally:
        shutil.rmtree(local, ignore_errors=True)


def restore_checkpoint(
    engine, local_dir: str, meta: dict, *, rank: int, world_size: int, universal_dir: Optional[str] = None
) -> None:
    """Load the engine's model/optimizer state and this rank's RNG from a local checkpoint dir whose
    ``checkpoint_meta`` is ``meta``. State written by another worker count loads too: a stage-0 (DDP)
    checkpoint is unsharded, ZeRO state comes from ``universal_dir`` (``reshard.fetched_universal``,
    with the engine built to load it, which fills the weights from the fp32 masters). Each rank
    continues its RNG streams from its file; after a resize a rank the checkpoint's run did not have
    seeds streams from (seed, rank, step).
    """
    if needs_reshard(meta, world_size) and universal_dir is None:
        raise CheckpointError(
            f"checkpoint {local_dir} holds ZeRO-{meta.get('zero_stage')} state sharded over {meta['world_size']} "
            f"workers; this run has {world_size}: load it through orchestration.train.reshard"
        )
    # Our AdamW groups' hyperparameters come from the config, not the checkpoint: DeepSpeed's ZeRO-3
    # universal load copies group 0's (weight decay 0.1) onto every group, the no-decay one included.
    hyper = [{k: g[k] for k in ("weight_decay", "betas", "eps", "lr_scale")} for g in engine.optimizer.param_groups]
    load_path, _ = engine.load_checkpoint(
        universal_dir or local_dir,
        tag=DS_TAG,
        load_optimizer_states=True,
        load_lr_scheduler_states=False,
    )
    for group, values in zip(engine.optimizer.param_groups, hyper):
        group.update(values)
    if load_path is None:
        raise CheckpointError(f"the engine found no checkpoint under {universal_dir or local_dir}/{DS_TAG}")
    rng_path = os.path.join(local_dir, rng_file(rank))
    if os.path.exists(rng_path):  # resized runs too: a rank the checkpoint's run had continues its streams
        _set_rng_state(torch.load(rng_path, weights_only=False))
    else:  # a rank new to the run: streams of its own, not a replay of the run's first steps
        from orchestration.train.engine import seed_everything

        seed_everything(hash((meta["config"]["train"]["seed"], rank, meta["step"])) % 2**63)


def ensure_consolidated(ckpt: RunDir) -> bool:
    """Give a complete checkpoint its ``model.safetensors`` if it has none (an interval checkpoint:
    only the run's last save writes it), built from its engine files and written beside them (on
    object storage: downloaded to a temp dir, consolidated, uploaded). Returns whether it wrote one."""
    import time

    from data_pipeline.storage import with_retries

    meta = checkpoint_meta(ckpt)
    if ckpt.has(MODEL_FILE):
        size, declared = consolidated_sizes(ckpt)
        if size == declared:
            return False
        print(
            f"[raylm] {ckpt.uri_of(MODEL_FILE)} was cut short ({size:,} of {declared or '?'} bytes, a write "
            "interrupted before raylm wrote atomically): rebuilding it from the engine files",
            flush=True,
        )
    t0 = time.perf_counter()
    if isinstance(ckpt.fs, pafs.LocalFileSystem):
        out = consolidate_checkpoint(ckpt.path, meta)
    else:
        local = tempfile.mkdtemp(prefix="raylm_consolidate_")
        try:
            download(ckpt, [f for f in meta["files"] if f.startswith(f"{DS_TAG}/")], local)
            out = consolidate_checkpoint(local, meta)
            upload = functools.partial(
                pafs.copy_files, str(out), ckpt.path_of(MODEL_FILE), destination_filesystem=ckpt.fs
            )
            with_retries(upload, what=ckpt.uri_of(MODEL_FILE))
        finally:
            shutil.rmtree(local, ignore_errors=True)
    size = ckpt.fs.get_file_info(ckpt.path_of(MODEL_FILE)).size
    print(
        f"[raylm] consolidated {ckpt.uri_of(MODEL_FILE)} from its engine files (ZeRO stage {meta.get('zero_stage')}) "
        f"({size / 1e6:,.1f} MB, {time.perf_counter() - t0:.1f} s)",
        flush=True,
    )
    return True


def consolidated_sizes(ckpt: RunDir) -> tuple[int, Optional[int]]:
    """(bytes, bytes its header declares) of the checkpoint's ``model.safetensors``: equal when it is
    whole; None declared when not even its header is whole."""
    path = ckpt.path_of(MODEL_FILE)
    size = ckpt.fs.get_file_info(path).size
    try:
        with ckpt.fs.open_input_file(path) as f:
            return size, safetensors_declared_bytes(lambda offset, length: f.read_at(length, offset))
    except (ValueError, struct.error):  # a header cut short (JSON or length unreadable)
        return size, None


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
    size, declared = consolidated_sizes(RunDir.at(str(root)))
    if size != declared:
        raise CheckpointError(
            f"{root / MODEL_FILE} is cut short ({size:,} of {declared or '?'} bytes): rebuild it from the "
            f"checkpoint's engine files with `raylm consolidate <checkpoint>`"
        )
    state = load_file(str(root / MODEL_FILE))
    model_cfg = json.loads((root / MODEL_CONFIG_FILE).read_text())
    tokenizer_ref = json.loads((root / TOKENIZER_FILE).read_text())
    return state, model_cfg, tokenizer_ref, meta
