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
    CHECKPOINT_META_FILE,
    MODEL_CONFIG_FILE,
    MODEL_FILE,
    QUANTIZATION_FILE,
    QUANTIZED_MODEL_FILE,
    CheckpointError,
    is_quantized,
)

# checkpoint meta keys the quantized checkpoint copies (as ``export``): where its eval data is found
TRAINING_DATA_KEYS = ("data", "base_checkpoint")


def timed_eval(loaded, data: str, max_sequences: int) -> dict:
    """``evaluate_lm`` of a loaded model on ``data``'s val windows, plus wall seconds and tokens/s."""
    from orchestration.evaluate.lm import evaluate_lm

    t0 = time.perf_counter()
    result = evaluate_lm(loaded, data, max_sequences=max_sequences)
    wall_s = time.perf_counter() - t0
    tokens = result["tokens"]
    return {"loss": result["loss"], "tokens": tokens, "wall_s": wall_s, "tokens_per_s": tokens / wall_s}


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
    """Quantize ``checkpoint_uri`` (a checkpoint or run directory) into local ``out_dir``.

    Returns the ``quantization.json`` record: scheme, group_size, modules, tied, kept_fp32,
    bytes_before/after (the fp32 ``model.safetensors`` vs ``model.quantized.safetensors``), ratio, and
    with ``evaluate`` "eval": {"fp32", "quantized": {loss, tokens, wall_s, tokens_per_s}, "loss_delta",
    "data"} on ``data`` (default: the manifest the checkpoint trained on), ``max_sequences`` val windows.
    """
    from safetensors.torch import save_file

    from data_pipeline import tokenizer as tok
    from model.quantize import apply_quantized_weights, quantize_weights
    from orchestration.evaluate.load import load_checkpoint_model

    model, cfg, enc, meta = load_checkpoint_model(checkpoint_uri, endpoint_url=endpoint_url)
    ckpt_uri = meta["checkpoint_uri"]
    if is_quantized(meta):
        source = meta.get("checkpoint", "its fp32 source")
        raise CheckpointError(f"{ckpt_uri} is already quantized; quantize {source} instead")
    if cfg.arch != "gpt":
        raise CheckpointError(f"{ckpt_uri}: only GPT checkpoints are quantized, this one is arch {cfg.arch!r}")
    tensors, spec = quantize_weights(model, scheme, group_size)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / QUANTIZED_MODEL_FILE), metadata={"format": "pt"})
    (out / MODEL_CONFIG_FILE).write_text(json.dumps(asdict(cfg), indent=2))
    for name, blob in tok.to_files(tok.load_spec(ckpt_uri, endpoint_url)).items():
        (out / name).write_bytes(blob)
    bytes_before, bytes_after = meta["files"][MODEL_FILE], (out / QUANTIZED_MODEL_FILE).stat().st_size
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
        from model.build import build_model
        from orchestration.evaluate.data_source import training_manifest

        data = data or training_manifest(meta, endpoint_url).uri
        quantized = apply_quantized_weights(build_model(cfg), tensors, spec).eval()
        fp32_eval = timed_eval((model, cfg, enc, meta), data, max_sequences)
        q_eval = timed_eval((quantized, cfg, enc, {**meta, "checkpoint_uri": str(out)}), data, max_sequences)
        record["eval"] = {"data": data, "fp32": fp32_eval, "quantized": q_eval}
        record["eval"]["loss_delta"] = q_eval["loss"] - fp32_eval["loss"]
        print(
            f"[quantize] val loss on {fp32_eval['tokens']:,} tokens of {data}: fp32 {fp32_eval['loss']:.4f}, "
            f"{scheme} {q_eval['loss']:.4f} ({record['eval']['loss_delta']:+.4f} nats); eval "
            f"{fp32_eval['tokens_per_s']:,.0f} vs {q_eval['tokens_per_s']:,.0f} tokens/s",
            flush=True,
        )
    (out / QUANTIZATION_FILE).write_text(json.dumps(record, indent=2))
    lineage = {key: meta[key] for key in TRAINING_DATA_KEYS if meta.get(key) is not None}
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.name != CHECKPOINT_META_FILE}
    # Written last and listing every file, like a training checkpoint: it makes the folder complete
    (out / CHECKPOINT_META_FILE).write_text(
        json.dumps(
            {
                "checkpoint": ckpt_uri,
                "step": meta.get("step"),
                **lineage,
                "format": "raylm-quantized",
                "quantization": {"scheme": scheme, "group_size": spec["group_size"]},
                "files": files,
            },
            indent=2,
        )
    )
    print(f"[quantize] wrote {out} ({len(files) + 1} files)", flush=True)
    return record
