"""A consolidated checkpoint -> a model in eval mode: plain PyTorch, no Ray Train, no DeepSpeed.

A checkpoint URI is a ``checkpoint_<step>`` directory, a run directory (its newest complete
checkpoint is used) or a run name the demo points at its newest run (``latest_run``), local or on
object storage. Eval, generation, export, serving and fine-tuning
load checkpoints through here. A quantized checkpoint (``raylm quantize``; its meta says so,
``is_quantized``) loads as the GPT with its linear and embedding layers swapped for ``model.quantize``'s
modules, built on the meta device so the fp32 model is never allocated; fine-tuning refuses it.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Optional

import tiktoken

from model.build import build_model
from model.config import ModelConfig
from model.gpt import GPT
from orchestration.artifacts import LATEST_RUN_FILE, RunDir, read_latest_run
from orchestration.checkpoint_format import (
    CHECKPOINT_META_FILE,
    MODEL_CONFIG_FILE,
    MODEL_FILE,
    QUANTIZATION_FILE,
    QUANTIZED_MODEL_FILE,
    CheckpointError,
    complete_checkpoint_meta,
    is_quantized,
    is_training_state,
    latest_complete_checkpoint,
)
from orchestration.train.checkpoint import ensure_consolidated, load_consolidated_state, load_weights


def resolve_checkpoint(uri: str, endpoint_url: Optional[str]) -> str:
    """A complete checkpoint dir for ``uri``: itself, a run dir's newest complete checkpoint, or that of
    the run its ``latest_run`` pointer names (a run's own checkpoints win over a pointer)."""
    where = RunDir.at(uri, endpoint_url)
    try:
        if complete_checkpoint_meta(where) is not None:
            return where.uri
        latest = latest_complete_checkpoint(where)
        pointed = read_latest_run(where) if latest is None else None
        if pointed is not None:
            print(f"[raylm] {uri} -> {pointed} ({LATEST_RUN_FILE})", flush=True)
            latest = latest_complete_checkpoint(RunDir.at(pointed, endpoint_url))
    except OSError as err:  # storage unreachable, access denied, ...
        raise CheckpointError(
            f"{uri}: cannot look for a checkpoint there ({err}); check the URI and its endpoint URL"
        ) from err
    if latest is None:
        raise CheckpointError(
            f"{uri}: neither a complete checkpoint (with {CHECKPOINT_META_FILE}) nor a run directory "
            "holding one"
            + (f" (its {LATEST_RUN_FILE} names {pointed}, which holds none)" if pointed else "")
            + "; pass a checkpoint_<step> directory or a run directory (`raylm demo` or `raylm train` writes one)"
        )
    return latest[0].uri


def local_checkpoint_copy(uri: str, endpoint_url: Optional[str], *, allow_quantized: bool = False) -> str:
    """Local directory with the checkpoint's inference files (downloads them from object storage). A
    checkpoint without consolidated weights (one a run saved before its end) gets them first. A
    quantized checkpoint is a CheckpointError unless ``allow_quantized`` (inference only: nothing
    trains on integer weights)."""
    ckpt = RunDir.at(uri, endpoint_url)
    meta = complete_checkpoint_meta(ckpt)
    quantized = meta is not None and is_quantized(meta)
    if quantized and not allow_quantized:
        source = meta.get("checkpoint", "the fp32 checkpoint it was quantized from")
        raise CheckpointError(
            f"{uri} is a quantized checkpoint ({meta.get('quantization', {}).get('scheme', '?')} weights): "
            f"training or fine-tuning on quantized weights is not supported; start from {source} instead"
        )
    if not quantized:
        ensure_consolidated(ckpt)
    if "://" not in uri:
        return uri
    meta = complete_checkpoint_meta(ckpt)
    local = Path(tempfile.mkdtemp(prefix="raylm_ckpt_"))
    wanted = [f for f in meta["files"] if not is_training_state(f)]
    weights = [] if quantized else [MODEL_FILE]
    for name in [*dict.fromkeys([*wanted, *weights]), CHECKPOINT_META_FILE]:
        (local / name).write_bytes(ckpt.read_bytes(name))
    return str(local)


def load_quantized_state(local_dir: str) -> tuple[dict, dict, dict, dict]:
    """(quantized tensors, model_config dict, quantization spec, meta) from a local quantized checkpoint."""
    from safetensors.torch import load_file

    root = Path(local_dir)
    meta = json.loads((root / CHECKPOINT_META_FILE).read_text())
    spec = json.loads((root / QUANTIZATION_FILE).read_text())
    tensors = load_file(str(root / QUANTIZED_MODEL_FILE))
    return tensors, json.loads((root / MODEL_CONFIG_FILE).read_text()), spec, meta


def load_checkpoint_model(
    uri: str, *, endpoint_url: Optional[str] = None, device: str = "cpu"
) -> tuple[GPT, ModelConfig, tiktoken.Encoding, dict]:
    """(model in eval mode, its ModelConfig, the tokenizer, checkpoint meta) from a checkpoint URI."""
    from data_pipeline.tokenizer import encoding, load_spec

    ckpt_uri = resolve_checkpoint(uri, endpoint_url)
    local = local_checkpoint_copy(ckpt_uri, endpoint_url, allow_quantized=True)
    if is_quantized(json.loads((Path(local) / CHECKPOINT_META_FILE).read_text())):
        from model.quantize import build_quantized_model

        tensors, cfg_dict, spec, meta = load_quantized_state(local)
        model_cfg = ModelConfig(**cfg_dict)
        try:  # on the meta device first: the fp32 model is never built
            model = build_quantized_model(model_cfg, tensors, spec)
        except ValueError as err:
            raise CheckpointError(f"{ckpt_uri}/{QUANTIZED_MODEL_FILE} ({QUANTIZATION_FILE}): {err}") from err
    else:
        state, cfg_dict, _, meta = load_consolidated_state(local)
        model_cfg = ModelConfig(**cfg_dict)
        model = build_model(model_cfg)  # GPT, or RecurrentLM for arch rnn|gru|lstm
        load_weights(model, state, f"{ckpt_uri}/{MODEL_FILE} (with its {MODEL_CONFIG_FILE})")
    model.to(device).eval()
    meta = {**meta, "checkpoint_uri": ckpt_uri}
    return model, model_cfg, encoding(load_spec(local)), meta


def loaded_checkpoint(
    checkpoint, *, endpoint_url: Optional[str] = None, device: str = "cpu"
) -> tuple[GPT, ModelConfig, tiktoken.Encoding, dict]:
    """``load_checkpoint_model``'s (model, config, tokenizer, meta) for a URI; an already loaded tuple
    passes through, so a caller running several evals loads the weights once."""
    if isinstance(checkpoint, str):
        return load_checkpoint_model(checkpoint, endpoint_url=endpoint_url, device=device)
    return checkpoint
