"""Export a checkpoint: a Hugging Face transformers folder, or raylm's own portable format.

``hf``: config.json + model.safetensors for the standard transformers architecture that computes the
model exactly (``orchestration.deploy.hf``: GPT-2 shapes -> GPT2LMHeadModel, the Llama-style ladder
-> LlamaForCausalLM, the shakespeare preset's RoPE + GELU + LayerNorm -> Starcoder2ForCausalLM, ...),
generation_config.json, and a ``tokenizer.json`` + tokenizer_config.json for HF's fast tokenizer
(byte-level BPE; vocab and merges derived from the tiktoken ranks the way transformers'
``TikTokenConverter`` does it, written as plain JSON so export needs neither transformers nor
tokenizers). ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained(folder)`` load it offline.

``raylm``: weights, model_config.json and tokenizer files plus a ``raylm_meta.json``, i.e. a complete
consolidated checkpoint that ``load_checkpoint_model`` (eval, generate, serve) loads as it is; its meta
names the source checkpoint and copies the source's training data (``TRAINING_DATA_KEYS``).

A quantized checkpoint (``raylm quantize``) exports only as ``raylm``, copied as it is (integer weights
and all); ``hf`` refuses it, since the HF architectures' safetensors hold float weights: export the fp32
checkpoint it came from instead. Nothing is dequantized behind the user's back.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from orchestration.checkpoint_format import (
    CHECKPOINT_META_FILE,
    MODEL_CONFIG_FILE,
    MODEL_FILE,
    TRAINING_DATA_KEYS,
    is_quantized,
)
from orchestration.deploy.hf import (
    FAMILIES,
    hf_config,
    hf_family,
    hf_state,
    hf_tokenizer_json,
    peft_adapter,
    unsupported_reason,
)

FORMATS = ("hf", "raylm")
# raylm's tokenizer metadata is also called tokenizer.json; in an HF folder that name is HF's
RAYLM_TOKENIZER_META = "raylm_tokenizer.json"


class ExportError(ValueError):
    """A checkpoint that cannot be exported in the asked format, with what to do instead."""


def _write_tokenizer_files(spec: dict, out: Path, *, hf: bool, block_size: int) -> list[str]:
    """raylm's tiktoken files (the meta renamed in an HF folder) and, for HF, tokenizer.json + config."""
    from data_pipeline import tokenizer as tok

    written = []
    for name, data in tok.to_files(spec).items():
        name = RAYLM_TOKENIZER_META if hf and name == tok.META_FILE else name
        (out / name).write_bytes(data)
        written.append(name)
    if hf:
        (out / "tokenizer.json").write_text(json.dumps(hf_tokenizer_json(spec), ensure_ascii=False))
        eot = tok.EOT if tok.EOT in spec["special_tokens"] else None
        (out / "tokenizer_config.json").write_text(
            json.dumps(
                {
                    "tokenizer_class": "PreTrainedTokenizerFast",
                    "model_max_length": block_size,
                    "clean_up_tokenization_spaces": False,
                    "bos_token": eot,
                    "eos_token": eot,
                },
                indent=2,
            )
        )
        written += ["tokenizer.json", "tokenizer_config.json"]
    return written


def export_checkpoint(
    checkpoint_uri: str, out_dir: str, *, fmt: str = "hf", lora: str = "merged", endpoint_url: Optional[str] = None
) -> dict:
    """Write ``checkpoint_uri`` (a checkpoint or run directory, local or s3://) to local ``out_dir``.

    Returns {"format", "out_dir", "files", "checkpoint", "step"} (+ "architecture" for hf).
    ``fmt="hf"`` raises ExportError saying why when no standard architecture computes the model
    exactly (use ``fmt="raylm"`` then). A LoRA fine-tune exports merged (its ``model.safetensors``)
    or, with ``lora="separate"``, as its base checkpoint plus the adapters in ``out_dir/adapter/``
    (``export_adapter``).
    """
    if lora not in ("merged", "separate"):
        raise ExportError(f"lora must be 'merged' or 'separate', got {lora!r}")
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; allowed: {FORMATS}")
    if lora == "separate":
        return export_adapter(checkpoint_uri, out_dir, fmt=fmt, endpoint_url=endpoint_url)
    from safetensors.torch import save_file

    from data_pipeline.tokenizer import EOT, load_spec
    from orchestration.evaluate.load import load_checkpoint_model

    model, cfg, _, meta = load_checkpoint_model(checkpoint_uri, endpoint_url=endpoint_url)
    ckpt_uri = meta["checkpoint_uri"]
    if is_quantized(meta):
        return _export_quantized(ckpt_uri, out_dir, fmt, meta, endpoint_url)
    family = hf_family(cfg)
    if fmt == "hf" and family is None:
        raise ExportError(
            f"{ckpt_uri}: {unsupported_reason(cfg)}. Export with fmt='raylm' (raylm export --format raylm) instead."
        )
    spec = load_spec(ckpt_uri, endpoint_url)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = {"checkpoint": ckpt_uri, "step": meta.get("step")}
    # what the weights were trained on travels with them: eval without --data needs no source checkpoint
    lineage = {key: meta[key] for key in TRAINING_DATA_KEYS if meta.get(key) is not None}

    if fmt == "hf":
        eot = spec["special_tokens"].get(EOT)
        architecture = FAMILIES[family].architecture
        save_file(hf_state(model, family), str(out / MODEL_FILE), metadata={"format": "pt"})
        (out / "config.json").write_text(json.dumps(hf_config(cfg, family, eot), indent=2))
        (out / "generation_config.json").write_text(
            json.dumps({"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot}, indent=2)
        )
        files = [MODEL_FILE, "config.json", "generation_config.json"]
        files += _write_tokenizer_files(spec, out, hf=True, block_size=cfg.block_size)
        readme = (
            f"# raylm export (Hugging Face {architecture})\n\n"
            f"From `{source['checkpoint']}` (step {source['step']}).\n\n"
            "    from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            f"    model = AutoModelForCausalLM.from_pretrained('{out}')\n"
            f"    tok = AutoTokenizer.from_pretrained('{out}')\n\n"
            f"The architecture computes raylm's model exactly ({cfg.pos_encoding} positions, {cfg.mlp} MLP, "
            f"{cfg.norm}, bias={cfg.bias}, {cfg.kv_heads} kv heads of {cfg.n_head}).\n"
            "`tokenizer.tiktoken` + `raylm_tokenizer.json` are the same tokenizer in raylm's own format.\n"
        )
        source["architecture"] = architecture
    else:
        state = {n: p.detach().float().cpu().contiguous() for n, p in model.named_parameters()}
        save_file(state, str(out / MODEL_FILE), metadata={"format": "pt"})
        (out / MODEL_CONFIG_FILE).write_text(json.dumps(asdict(cfg), indent=2))
        files = [MODEL_FILE, MODEL_CONFIG_FILE] + _write_tokenizer_files(spec, out, hf=False, block_size=cfg.block_size)
        reason = (
            f"A Hugging Face export is not possible: {unsupported_reason(cfg)}.\n"
            if family is None
            else f"`export --format hf` also works ({FAMILIES[family].architecture}).\n"
        )
        readme = (
            f"# raylm export (raylm format)\n\nFrom `{source['checkpoint']}` (step {source['step']}).\n\n"
            f"{reason}\nLoad with `orchestration.evaluate.load.load_checkpoint_model('{out}')`, or "
            f"`raylm generate/serve --checkpoint {out}`.\n"
        )
    (out / "README.md").write_text(readme)
    files.append("README.md")
    if fmt == "raylm":
        # Written last and listing every file, like a training checkpoint: it makes the folder complete
        sizes = {f: (out / f).stat().st_size for f in files}
        (out / CHECKPOINT_META_FILE).write_text(
            json.dumps({**source, **lineage, "format": "raylm-export", "files": sizes}, indent=2)
        )
        files.append(CHECKPOINT_META_FILE)
    print(f"exported {source['checkpoint']} as {fmt} to {out} ({len(files)} files)")
    return {"format": fmt, "out_dir": str(out), "files": files, **source}


def _export_quantized(ckpt_uri: str, out_dir: str, fmt: str, meta: dict, endpoint_url: Optional[str]) -> dict:
    """A quantized checkpoint: ``raylm`` copies its inference files (meta last); ``hf`` is an ExportError."""
    from data_pipeline.storage import join, read_bytes

    source = meta.get("checkpoint", "the checkpoint it was quantized from")
    if fmt == "hf":
        raise ExportError(
            f"{ckpt_uri} is a quantized checkpoint ({meta['quantization']['scheme']}); a Hugging Face export "
            f"holds float weights. Export {source} with --format hf, or this one with --format raylm (a copy)."
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [f for f in meta["files"] if f != CHECKPOINT_META_FILE]
    for name in files:
        (out / name).write_bytes(read_bytes(join(ckpt_uri, name), endpoint_url))
    record = {k: v for k, v in meta.items() if k != "checkpoint_uri"}
    (out / CHECKPOINT_META_FILE).write_text(json.dumps(record, indent=2))
    files.append(CHECKPOINT_META_FILE)
    print(f"exported quantized {ckpt_uri} as raylm to {out} ({len(files)} files)")
    return {"format": fmt, "out_dir": str(out), "files": files, "checkpoint": ckpt_uri, "step": meta.get("step")}


def export_adapter(checkpoint_uri: str, out_dir: str, *, fmt: str = "hf", endpoint_url: Optional[str] = None) -> dict:
    """A LoRA fine-tune kept separate: its base checkpoint exported to ``out_dir`` and the adapters to
    ``out_dir/adapter/`` (hf: PEFT's adapter_config.json + adapter_model.safetensors for the base's
    architecture, loadable with ``PeftModel.from_pretrained``; raylm: adapter.safetensors +
    adapter_config.json)."""
    from safetensors.torch import load, save_file

    from data_pipeline.storage import join, read_bytes
    from orchestration.checkpoint_format import ADAPTER_FILE, FINETUNE_FILE
    from orchestration.evaluate.load import load_checkpoint_model

    _, cfg, _, meta = load_checkpoint_model(checkpoint_uri, endpoint_url=endpoint_url)
    ckpt_uri = meta["checkpoint_uri"]
    info = json.loads(read_bytes(join(ckpt_uri, FINETUNE_FILE), endpoint_url)) if FINETUNE_FILE in meta["files"] else {}
    if not info.get("lora"):
        raise ExportError(f"{ckpt_uri} is not a LoRA fine-tune (no adapters in it); export it with lora='merged'")
    result = export_checkpoint(info["base_checkpoint"], out_dir, fmt=fmt, endpoint_url=endpoint_url)
    adapters = load(read_bytes(join(ckpt_uri, ADAPTER_FILE), endpoint_url))
    adapter_dir = Path(out_dir) / "adapter"
    adapter_dir.mkdir(parents=True, exist_ok=True)
    if fmt == "hf":
        tensors, config = peft_adapter(cfg, hf_family(cfg), adapters, info["lora"])
        config["base_model_name_or_path"] = str(Path(out_dir).absolute())
        save_file(tensors, str(adapter_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    else:
        config = {**info["lora"], "base_checkpoint": info["base_checkpoint"]}
        save_file(adapters, str(adapter_dir / ADAPTER_FILE), metadata={"format": "pt"})
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
    files = sorted(f"adapter/{p.name}" for p in adapter_dir.iterdir())
    print(f"exported the adapters of {ckpt_uri} to {adapter_dir} ({', '.join(files)})")
    return {**result, "files": result["files"] + files, "adapter_of": ckpt_uri}
