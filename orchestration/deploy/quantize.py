"""`raylm quantize`: a checkpoint -> a weight-only int8 or int4 checkpoint that eval, generate and serve load.

The output is a complete checkpoint directory (``orchestration.checkpoint_format``):
``model.quantized.safetensors`` (integer weights + scales, ``model.quantize``), ``quantization.json``
(scheme, group size, which modules, bytes before/after and, unless skipped, the val loss of both on the
same windows), ``model_config.json``, the tokenizer files and ``raylm_meta.json`` written last, naming
the source checkpoint and its training data so ``raylm eval --checkpoint Q`` finds the same manifest.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from orchestration.checkpoint_format import (
    MODEL_CONFIG_FILE,
    MODEL_FILE,
    QUANTIZATION_FILE,
    QUANTIZED_MODEL_FILE,
    CheckpointError,
    is_quantized,
    write_derived_meta,
)


def compare_eval(fp32_model, quantized_model, enc, seqs) -> dict:
    """Val loss of both models on the same pre-tokenised windows ``seqs``, with their speed: each model
    runs one untimed warm-up batch first (so neither absorbs first-call costs), then the timed
    ``lm_metrics`` pass: forwards plus the same loss bookkeeping for both, no data reading or tokenising.
    -> {"fp32", "quantized": {loss, tokens, wall_s, tokens_per_s}}."""
    import torch

    from orchestration.evaluate.lm import lm_metrics

    out = {}
    for key, model in (("fp32", fp32_model), ("quantized", quantized_model)):
        with torch.no_grad():
            model(torch.from_numpy(seqs[:8, :-1]).long())  # warm-up: first-call allocations, packed-kernel repack
        t0 = time.perf_counter()
        result = lm_metrics(model, enc, seqs)
        wall_s = time.perf_counter() - t0
        out[key] = {"loss": result["loss"], "tokens": result["tokens"], "wall_s": wall_s}
        out[key]["tokens_per_s"] = result["tokens"] / wall_s
    return out


def quantize_checkpoint(
    checkpoint_uri: str,
    out_dir: str,
    *,
    scheme: str,
    group_size: int = 32,
    data: Optional[str] = None,
    max_sequences: int = 256,
    evaluate: bool = True,
    endpoint_url: Optional[str] = None,
) -> dict:
    """Quantize ``checkpoint_uri`` (a checkpoint or run directory) into local ``out_dir``, which must be
    empty or absent (CheckpointError otherwise: the output is a checkpoint of its own files only).

    Returns the ``quantization.json`` record: scheme, group_size, modules, tied, kept_fp32,
    bytes_before/after (the fp32 ``model.safetensors`` vs ``model.quantized.safetensors``), ratio, and
    with ``evaluate`` "eval": {"fp32", "quantized": {loss, tokens, wall_s, tokens_per_s}, "loss_delta",
    "data"} on ``data`` (default: the manifest the checkpoint trained on), ``max_sequences`` val windows.
    The quantized model is rebuilt from the tensors before anything is written, so an output that would
    not load is never written.
    """
    from safetensors.torch import save_file

    from data_pipeline import tokenizer as tok
    from model.quantize import build_quantized_model, quantize_weights
    from orchestration.artifacts import RunDir
    from orchestration.evaluate.load import load_checkpoint_model

    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(
            f"--out {out} already exists and is not an empty directory; the quantized checkpoint needs a "
            "folder of its own (pass a new or empty one)"
        )
    model, cfg, enc, meta = load_checkpoint_model(checkpoint_uri, endpoint_url=endpoint_url)
    ckpt_uri = meta["checkpoint_uri"]
    if is_quantized(meta):
        source = meta.get("checkpoint", "its fp32 source")
        raise CheckpointError(f"{ckpt_uri} is already quantized; quantize {source} instead")
    if cfg.arch != "gpt":
        raise CheckpointError(f"{ckpt_uri}: only GPT checkpoints are quantized, this one is arch {cfg.arch!r}")
    tensors, spec = quantize_weights(model, scheme, group_size)
    try:  # exactly as load_checkpoint_model will build it
        quantized = build_quantized_model(cfg, tensors, spec)
    except ValueError as err:
        raise CheckpointError(f"{ckpt_uri}: the {scheme} weights would not load ({err}); nothing written") from err

    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / QUANTIZED_MODEL_FILE), metadata={"format": "pt"})
    (out / MODEL_CONFIG_FILE).write_text(json.dumps(asdict(cfg), indent=2))
    written = [QUANTIZED_MODEL_FILE, MODEL_CONFIG_FILE]
    for name, blob in tok.to_files(tok.load_spec(ckpt_uri, endpoint_url)).items():
        (out / name).write_bytes(blob)
        written.append(name)
    # the source's own file: an interval checkpoint's model.safetensors (consolidated later) is not in its meta
    source_dir = RunDir.at(ckpt_uri, endpoint_url)
    bytes_before = source_dir.fs.get_file_info(source_dir.path_of(MODEL_FILE)).size
    bytes_after = (out / QUANTIZED_MODEL_FILE).stat().st_size
    record = {
        **spec,
        "source_checkpoint": ckpt_uri,
        "bytes_before": bytes_before,
        "bytes_after": bytes_after,
        "ratio": bytes_before / bytes_after,
    }
    print(
        f"[quantize] {scheme}: {MODEL_FILE} {bytes_before:,} B -> {QUANTIZED_MODEL_FILE} {bytes_after:,} B "
        f"({record['ratio']:.2f}x smaller); {len(spec['modules'])} modules quantized"
        + (f", tied {spec['tied']}" if spec["tied"] else "")
        + (f", kept fp32: {spec['kept_fp32']}" if spec["kept_fp32"] else ""),
        flush=True,
    )
    if evaluate:
        from orchestration.evaluate.data_source import EvalError, training_manifest
        from orchestration.evaluate.lm import token_windows

        data = data or training_manifest(meta, endpoint_url).uri
        seqs = token_windows(data, enc, cfg.block_size, max_sequences, "val", endpoint_url)
        if len(seqs) == 0:
            raise EvalError(f"{data}: fewer than {cfg.block_size + 1} tokens, nothing to compare losses on")
        evals = compare_eval(model, quantized, enc, seqs)
        fp32_eval, q_eval = evals["fp32"], evals["quantized"]
        record["eval"] = {"data": data, **evals, "loss_delta": q_eval["loss"] - fp32_eval["loss"]}
        print(
            f"[quantize] val loss on {fp32_eval['tokens']:,} tokens of {data}: fp32 {fp32_eval['loss']:.4f}, "
            f"{scheme} {q_eval['loss']:.4f} ({record['eval']['loss_delta']:+.4f} nats); forward passes "
            f"{fp32_eval['tokens_per_s']:,.0f} vs {q_eval['tokens_per_s']:,.0f} tokens/s",
            flush=True,
        )
    (out / QUANTIZATION_FILE).write_text(json.dumps(record, indent=2))
    written.append(QUANTIZATION_FILE)
    files = write_derived_meta(
        out,
        ckpt_uri,
        meta,
        written,
        "raylm-quantized",
        quantization={"scheme": scheme, "group_size": spec["group_size"]},
    )
    print(f"[quantize] wrote {out} ({len(files) + 1} files)", flush=True)
    return record
