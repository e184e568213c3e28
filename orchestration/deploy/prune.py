"""`raylm prune`: a checkpoint -> a smaller checkpoint with the least important heads and MLP hidden units
removed (``model.prune``), which eval, generate, serve, export and finetune load like any other.

Importance is scored on the first windows of the train split of the manifest the checkpoint trained
on (or ``--data``), never on val, so ``raylm eval`` of the pruned checkpoint measures on unseen
windows. The output is a complete checkpoint directory (``orchestration.checkpoint_format``):
``model.safetensors`` of the smaller shape, ``model_config.json`` (n_head, head_size, mlp_hidden),
the tokenizer files, ``pruning.json`` (fractions, method, calibration data, what each layer kept,
the head scores, params and bytes before/after) and ``raylm_meta.json`` written last, naming the
source checkpoint and its training data so ``raylm eval --checkpoint P`` finds the same manifest.
Recovery is an ordinary fine-tune: ``raylm finetune finetune.checkpoint=P finetune.task=lm ...``.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from orchestration.checkpoint_format import (
    MODEL_CONFIG_FILE,
    MODEL_FILE,
    PRUNING_FILE,
    CheckpointError,
    complete_checkpoint_meta,
    is_quantized,
    write_derived_meta,
)

CALIBRATION_BATCH_SIZE = 8  # sequences per forward + backward while scoring
METHOD = (
    "first-order Taylor importance (Michel et al. 2019): per sequence |sum over positions of "
    "output . dL/doutput| of each head / MLP hidden unit (L: the sequence's summed token loss), summed over "
    "the calibration windows; the lowest removed per layer, the same count in every layer (under GQA whole "
    "KV groups, each scored as one unit)"
)


class PruneError(ValueError):
    """Fractions that do not fit the checkpoint (outside [0, 1), both zero, too small to remove a unit at
    its shape): the command's own input, reported in one line naming the flag."""


def prune_checkpoint(
    checkpoint_uri: str,
    out_dir: str,
    *,
    heads: float,
    neurons: float,
    data: Optional[str] = None,
    calibration_batches: int = 16,
    endpoint_url: Optional[str] = None,
) -> dict:
    """Prune ``checkpoint_uri`` (a checkpoint or run directory) into local ``out_dir``, which must be
    empty or absent: a ``heads`` fraction of every layer's attention heads (whole KV groups under GQA)
    and a ``neurons`` fraction of its MLP hidden units, the lowest-scored on ``calibration_batches``
    batches of 8 train windows of ``data`` (default: the manifest the checkpoint trained on; a text file
    is cut into windows as given). Returns the ``pruning.json`` record. PruneError for fractions outside
    [0, 1), both zero, or one too small to remove a unit; CheckpointError for a quantized or non-GPT
    checkpoint. Nothing is written before the pruned model is built."""
    import torch
    from safetensors.torch import save_file

    from data_pipeline import tokenizer as tok
    from model.flops import count_params
    from model.prune import prune_model, removal_counts, select_units, unit_importance
    from orchestration.artifacts import RunDir
    from orchestration.evaluate.data_source import EvalError, training_manifest
    from orchestration.evaluate.lm import token_windows
    from orchestration.evaluate.load import load_checkpoint_model, resolve_checkpoint

    for flag, value in (("--heads", heads), ("--neurons", neurons)):
        if not 0.0 <= value < 1.0:
            raise PruneError(f"{flag} {value}: the fraction removed must be in [0, 1)")
    if heads == 0 and neurons == 0:
        raise PruneError("--heads and --neurons are both 0: nothing to prune")
    if calibration_batches < 1:
        raise PruneError(f"--calibration-batches must be >= 1, got {calibration_batches}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(
            f"--out {out} already exists and is not an empty directory; the pruned checkpoint needs a "
            "folder of its own (pass a new or empty one)"
        )
    ckpt_uri = resolve_checkpoint(checkpoint_uri, endpoint_url)
    source_meta = complete_checkpoint_meta(RunDir.at(ckpt_uri, endpoint_url)) or {}
    if is_quantized(source_meta):  # refused before any weights are read
        source = source_meta.get("checkpoint", "the fp32 checkpoint it was quantized from")
        raise CheckpointError(
            f"{ckpt_uri} is a quantized checkpoint ({source_meta.get('quantization', {}).get('scheme', '?')}): "
            f"pruning slices float weights. Prune {source} instead (then quantize the pruned checkpoint if you "
            "want both)"
        )
    model, cfg, enc, meta = load_checkpoint_model(ckpt_uri, endpoint_url=endpoint_url)
    if cfg.arch != "gpt":
        raise CheckpointError(f"{ckpt_uri}: only GPT checkpoints are pruned, this one is arch {cfg.arch!r}")
    try:  # a fraction too small for this shape: refused before scoring
        removal_counts(cfg, heads, neurons)
    except ValueError as err:
        raise PruneError(f"{ckpt_uri}: {err}") from err

    data = data or training_manifest(meta, endpoint_url).uri
    want = calibration_batches * CALIBRATION_BATCH_SIZE
    seqs = token_windows(data, enc, cfg.block_size, want, "train", endpoint_url)
    if len(seqs) == 0:
        raise EvalError(f"{data}: fewer than {cfg.block_size + 1} tokens, nothing to score importance on")
    windows = torch.from_numpy(seqs).long()
    importance = unit_importance(model, windows.split(CALIBRATION_BATCH_SIZE))
    plan = select_units(cfg, importance, heads, neurons)
    pruned = prune_model(model, plan)
    new_cfg = pruned.cfg
    params_before, params_after = count_params(cfg), count_params(new_cfg)
    print(
        f"[prune] importance on {importance.sequences} train windows ({importance.tokens:,} tokens) of {data}"
        + ("" if len(seqs) == want else f" (wanted {want}: the split holds fewer)")
        + f"; heads per layer {cfg.n_head} -> {new_cfg.n_head}"
        + (f" (kv {cfg.kv_heads} -> {new_cfg.kv_heads})" if cfg.kv_heads != cfg.n_head else "")
        + f", MLP hidden units {cfg.hidden_dim} -> {new_cfg.hidden_dim}",
        flush=True,
    )

    out.mkdir(parents=True, exist_ok=True)
    state = {n: p.detach().float().contiguous() for n, p in pruned.named_parameters()}  # tied: stored once
    save_file(state, str(out / MODEL_FILE), metadata={"format": "pt"})
    (out / MODEL_CONFIG_FILE).write_text(json.dumps(asdict(new_cfg), indent=2))
    written = [MODEL_FILE, MODEL_CONFIG_FILE]
    for name, blob in tok.to_files(tok.load_spec(ckpt_uri, endpoint_url)).items():
        (out / name).write_bytes(blob)
        written.append(name)
    source_dir = RunDir.at(ckpt_uri, endpoint_url)
    bytes_before = source_dir.fs.get_file_info(source_dir.path_of(MODEL_FILE)).size
    bytes_after = (out / MODEL_FILE).stat().st_size
    shape = {
        "n_head": [cfg.n_head, new_cfg.n_head],
        "n_kv_head": [cfg.kv_heads, new_cfg.kv_heads],
        "head_size": new_cfg.head_dim,
        "mlp_hidden": [cfg.hidden_dim, new_cfg.hidden_dim],
    }
    record = {
        "source_checkpoint": ckpt_uri,
        "heads_fraction": heads,
        "neurons_fraction": neurons,
        "method": METHOD,
        "calibration": {"data": data, "split": "train", "sequences": importance.sequences, "tokens": importance.tokens},
        "shape": shape,
        "params_before": params_before,
        "params_after": params_after,
        "bytes_before": bytes_before,
        "bytes_after": bytes_after,
        "kept": {"heads": plan.heads, "kv_heads": plan.kv_heads, "neurons": plan.neurons},
        "head_importance": importance.heads.tolist(),
        # under GQA the selection ranked whole groups: their own scores, not their heads' sum
        **({"kv_group_importance": importance.kv_groups.tolist()} if cfg.kv_heads != cfg.n_head else {}),
    }
    (out / PRUNING_FILE).write_text(json.dumps(record, indent=2))
    written.append(PRUNING_FILE)
    files = write_derived_meta(
        out,
        ckpt_uri,
        meta,
        written,
        "raylm-pruned",
        pruning={"heads_fraction": heads, "neurons_fraction": neurons, **shape},
    )
    print(
        f"[prune] params {params_before:,} -> {params_after:,} ({params_after / params_before:.1%}); "
        f"{MODEL_FILE} {bytes_before:,} B -> {bytes_after:,} B ({bytes_after / bytes_before:.1%})",
        flush=True,
    )
    print(f"[prune] wrote {out} ({len(files) + 1} files)", flush=True)
    manifest = data if data.endswith(".json") else "<a manifest with its tokenizer>"
    print(
        f"[prune] next: its val loss with `raylm eval --checkpoint {out}`; recover with a short fine-tune, e.g. "
        f"`raylm finetune finetune.checkpoint={out} finetune.task=lm finetune.data={manifest} "
        "train.max_steps=100 train.run_name=<name>`",
        flush=True,
    )
    return record
