"""The checkpoint format: every name, the meta record and what makes a checkpoint complete.

Training writes checkpoints (``train.checkpoint``, ``train.consolidate``, ``train.reshard``); eval,
serve, export, fine-tuning and resume read them. All of them take the layout from here, so a name or
the completeness rule changes in one place. Layout of one checkpoint directory
(``checkpoint_<step:08d>`` in a run directory, all ranks' files merged into it by Ray Train):

    ds/                     the engine's files: DeepSpeed's model states and one optimizer partition
                            per rank (ZeRO 1-3), or one engine_state.pt (ZeRO-0: DDP, nothing sharded)
    rng_rank{r}.pt          each rank's torch/numpy/python RNG state
    model.safetensors       full fp32 weights, loadable without DeepSpeed: written by the run's last
                            save (streamed), or later from ds/ by ``raylm consolidate`` / any reader
    model_config.json       the ModelConfig (vocab size from the tokenizer)
    tokenizer.json          where the tokenizer lives (manifest URI + tokenizer hash)
    finetune.json, adapter.safetensors, classifier_head.safetensors
                            fine-tuning's description, LoRA adapters and task head (fine-tunes only)
    model.quantized.safetensors, quantization.json
                            a quantized checkpoint (``raylm quantize``) holds these instead of
                            model.safetensors: integer weights + scales, and the scheme that made them
    pruning.json            a pruned checkpoint (``raylm prune``): what was removed, how it was scored
                            and what each layer kept; its model.safetensors has the smaller shape
    raylm_meta.json         step, consumed sequences, world size, config and every file's size:
                            written LAST
    universal/              the engine state converted for any worker count, by the first resume that
                            reshards it (``train.reshard``), with a marker of its own

``raylm_meta.json`` is the completeness marker: a directory is a usable checkpoint only when it exists
and every file it lists is present with the listed size (``complete_checkpoint_meta``), so a partial
upload is never picked as the latest.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

import pyarrow.fs as pafs

from data_pipeline.storage import list_dir
from orchestration.artifacts import RunDir

CHECKPOINT_META_FILE = "raylm_meta.json"
MODEL_FILE = "model.safetensors"
MODEL_CONFIG_FILE = "model_config.json"
TOKENIZER_FILE = "tokenizer.json"
ADAPTER_FILE, HEAD_FILE, FINETUNE_FILE = "adapter.safetensors", "classifier_head.safetensors", "finetune.json"
QUANTIZED_MODEL_FILE, QUANTIZATION_FILE = "model.quantized.safetensors", "quantization.json"
PRUNING_FILE = "pruning.json"
DS_TAG = "ds"  # the engine's files live under ds/
UNIVERSAL_DIR = "universal"  # inside the checkpoint directory it was converted from
CHECKPOINT_DIR_RE = re.compile(r"^checkpoint_(\d+)$")
RANK_FILE_RE = re.compile(r"(?:zero_pp_rank_|rng_rank)(\d+)[_.]")  # files that belong to one rank
# meta keys a checkpoint derived from another (an export, a quantized copy) carries over: the training
# data and, for a fine-tune on task rows, the checkpoint it started from (eval finds held-out data there)
TRAINING_DATA_KEYS = ("data", "base_checkpoint")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or does not fit the run, with its location."""


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint_{step:08d}"


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def is_training_state(name: str) -> bool:
    """Files only a resuming run needs (the engine's state, RNG states), not eval, serve or export."""
    return name.startswith(f"{DS_TAG}/") or name.startswith("rng_rank")


def meta_record(meta: dict, *, step: int, consumed_sequences: int, world_size: int, files: dict[str, int]) -> dict:
    """The ``raylm_meta.json`` of a checkpoint: the run's ``meta`` plus where it stands and every file's size."""
    return {**meta, "step": step, "consumed_sequences": consumed_sequences, "world_size": world_size, "files": files}


def write_derived_meta(
    out: str | Path, source_uri: str, meta: dict, written: list[str], fmt: str, **record
) -> dict[str, int]:
    """The meta of a checkpoint made from another (``raylm quantize``, ``raylm prune``) in local dir ``out``:
    the source, its step and training data, ``fmt``, ``record`` and every written file's size. Written
    LAST, as a training checkpoint's: it makes the folder complete. Returns the files' sizes."""
    out = Path(out)
    files = {name: (out / name).stat().st_size for name in written}
    lineage = {key: meta[key] for key in TRAINING_DATA_KEYS if meta.get(key) is not None}
    body = {"checkpoint": source_uri, "step": meta.get("step"), **lineage, "format": fmt, **record, "files": files}
    (out / CHECKPOINT_META_FILE).write_text(json.dumps(body, indent=2))
    return files


def read_checkpoint_meta(ckpt: RunDir) -> Optional[dict]:
    """A checkpoint's ``raylm_meta.json``, or None when there is none yet."""
    return ckpt.read_json(CHECKPOINT_META_FILE) if ckpt.has(CHECKPOINT_META_FILE) else None


def complete_checkpoint_meta(ckpt: RunDir) -> Optional[dict]:
    """The checkpoint's meta when its marker exists and every file it lists is there at its size."""
    meta = read_checkpoint_meta(ckpt)
    if meta is None:
        return None
    infos = ckpt.fs.get_file_info([ckpt.path_of(rel) for rel in meta["files"]])
    for info, size in zip(infos, meta["files"].values()):
        if info.type != pafs.FileType.File or info.size != size:
            return None
    return meta


def is_quantized(meta: dict) -> bool:
    """Whether the checkpoint with ``meta`` holds quantized weights (``raylm quantize``'s output)."""
    return QUANTIZATION_FILE in meta.get("files", {})


def checkpoint_meta(ckpt: RunDir) -> dict:
    """A checkpoint's meta (step, world size, ZeRO stage, ...); CheckpointError if it is incomplete."""
    meta = complete_checkpoint_meta(ckpt)
    if meta is None:
        raise CheckpointError(
            f"checkpoint {ckpt.uri} is incomplete (no {CHECKPOINT_META_FILE} or files missing); "
            "delete it to use the previous one"
        )
    return meta


def checkpoints_newest_first(run: RunDir) -> list[RunDir]:
    """The run's ``checkpoint_<step>`` directories, newest first (complete or not)."""
    if not run.exists():
        return []
    dirs = [
        i
        for i in list_dir(run.fs, run.path)
        if i.type == pafs.FileType.Directory and CHECKPOINT_DIR_RE.match(i.base_name)
    ]
    dirs.sort(key=lambda i: int(CHECKPOINT_DIR_RE.match(i.base_name).group(1)), reverse=True)
    return [run.child(i.base_name) for i in dirs]


def latest_complete_checkpoint(run: RunDir) -> Optional[tuple[RunDir, dict]]:
    """(checkpoint dir, meta) of the newest complete checkpoint; incomplete ones (an upload cut short)
    are skipped, so the previous good one wins. None when there is none."""
    for ckpt in checkpoints_newest_first(run):
        meta = complete_checkpoint_meta(ckpt)
        if meta is not None:
            return ckpt, meta
    return None
