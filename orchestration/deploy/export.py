"""Export a checkpoint: a Hugging Face GPT-2 folder, or raylm's own portable format.

``hf``: config.json for ``GPT2LMHeadModel``, model.safetensors under HF's names (Conv1D weights are
(in, out), so every nn.Linear weight is transposed) and a ``tokenizer.json`` for HF's fast tokenizer
(byte-level BPE; vocab and merges derived from the tiktoken ranks the way transformers'
``TikTokenConverter`` does it, written as plain JSON so export needs neither transformers nor
tokenizers). Only a GPT-2-shaped model maps: learned positions, tanh-GELU MLP, LayerNorm, biases, MHA.

``raylm``: weights, model_config.json and tokenizer files plus a ``raylm_meta.json``, i.e. a complete
consolidated checkpoint that ``load_checkpoint_model`` (eval, generate, serve) loads as it is.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from model.config import ModelConfig
from orchestration.train.checkpoint import META_FILE, MODEL_CONFIG_FILE, MODEL_FILE

FORMATS = ("hf", "raylm")
# raylm's tokenizer metadata is also called tokenizer.json; in an HF folder that name is HF's
RAYLM_TOKENIZER_META = "raylm_tokenizer.json"
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class ExportError(ValueError):
    """A checkpoint that cannot be exported in the asked format, with what to do instead."""


def gpt2_mismatches(cfg: ModelConfig) -> list[str]:
    """Fields of ``cfg`` that HF's GPT-2 cannot represent, as 'field=value (GPT-2: ...)'; [] if none."""
    wanted = [("pos_encoding", "learned"), ("mlp", "gelu"), ("norm", "layernorm"), ("bias", True)]
    out = [f"{k}={getattr(cfg, k)!r} (GPT-2: {v!r})" for k, v in wanted if getattr(cfg, k) != v]
    if cfg.kv_heads != cfg.n_head:
        out.append(f"n_kv_head={cfg.n_kv_head} (GPT-2: multi-head attention, n_kv_head = n_head = {cfg.n_head})")
    return out


def hf_gpt2_config(cfg: ModelConfig, eot_id: Optional[int]) -> dict:
    """config.json of a ``GPT2LMHeadModel`` with the shape of ``cfg``."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": cfg.hidden_dim,
        "activation_function": "gelu_new",  # tanh approximation, as model.layers.MLP
        "layer_norm_epsilon": cfg.norm_eps,
        "initializer_range": cfg.init_std,
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "torch_dtype": "float32",
    }


def hf_gpt2_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """raylm GPT weights under HF GPT-2 names, Linear (out, in) transposed to Conv1D (in, out).

    A tied lm_head is left out (HF ties it to wte on load); attention ``bias`` masks are buffers HF
    rebuilds itself.
    """
    state = {}
    for name, p in model.named_parameters():  # tied weights appear once, under transformer.wte
        t = p.detach().float().cpu()
        state[name] = (t.t() if name.endswith(_CONV1D) else t).contiguous()
    return state


def _byte_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map (the alphabet of byte-level BPE vocabularies)."""
    printable = [range(ord("!"), ord("~") + 1), range(ord("¡"), ord("¬") + 1), range(ord("®"), ord("ÿ") + 1)]
    bs = [b for r in printable for b in r]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def hf_tokenizer_json(spec: dict) -> dict:
    """HF ``tokenizers`` JSON for a tiktoken byte-level BPE spec (ranks, pattern, special tokens).

    Same construction as transformers' TikTokenConverter: vocab = ranks in byte-level unicode; for
    every multi-byte token each split into two vocab tokens is a merge, merges ordered by the rank of
    the token they make, so HF's BPE applies merges in tiktoken's order. ``ignore_merges`` lets a
    whole pre-token that is in the vocab map straight to its id, as tiktoken does.
    """
    ranks = spec["ranks"]
    byte_map = _byte_unicode()

    def to_str(b: bytes) -> str:
        return "".join(byte_map[x] for x in b)

    merges = []
    for token, rank in ranks.items():
        pairs = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        merges.extend((rank, ranks[a], ranks[b], a, b) for a, b in pairs)
    merges.sort()
    added = [
        {
            "id": i,
            "content": t,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for t, i in sorted(spec["special_tokens"].items(), key=lambda kv: kv[1])
    ]
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": spec["pattern"]}, "behavior": "Isolated", "invert": False},
                byte_level,
            ],
        },
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": True,
            "vocab": {to_str(t): r for t, r in sorted(ranks.items(), key=lambda kv: kv[1])},
            "merges": [[to_str(a), to_str(b)] for *_, a, b in merges],
        },
    }


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

    Returns {"format", "out_dir", "files", "checkpoint"}. ``fmt="hf"`` raises ExportError naming the
    fields that are not GPT-2's when the architecture does not map (use ``fmt="raylm"`` then).
    A LoRA fine-tune exports merged (its ``model.safetensors``) or, with ``lora="separate"``, as its
    base checkpoint plus the adapters in ``out_dir/adapter/`` (``export_adapter``).
    """
    if lora not in ("merged", "separate"):
        raise ExportError(f"lora must be 'merged' or 'separate', got {lora!r}")
    if lora == "separate":
        return export_adapter(checkpoint_uri, out_dir, fmt=fmt, endpoint_url=endpoint_url)
    from safetensors.torch import save_file

    from data_pipeline.tokenizer import EOT, load_spec
    from orchestration.evaluate.load import _local_copy, _resolve, load_checkpoint_model

    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; allowed: {FORMATS}")
    ckpt_uri = _resolve(checkpoint_uri, endpoint_url)
    local = _local_copy(ckpt_uri, endpoint_url)  # downloads an s3:// checkpoint once
    model, cfg, _, meta = load_checkpoint_model(local)
    if fmt == "hf" and gpt2_mismatches(cfg):
        raise ExportError(
            f"{ckpt_uri}: not a GPT-2 architecture, so HF GPT2LMHeadModel cannot load it: "
            f"{'; '.join(gpt2_mismatches(cfg))}. Export with fmt='raylm' (raylm export --format raylm) instead."
        )
    spec = load_spec(local)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = {"checkpoint": ckpt_uri, "step": meta.get("step")}

    if fmt == "hf":
        eot = spec["special_tokens"].get(EOT)
        save_file(hf_gpt2_state(model), str(out / MODEL_FILE), metadata={"format": "pt"})
        (out / "config.json").write_text(json.dumps(hf_gpt2_config(cfg, eot), indent=2))
        files = [MODEL_FILE, "config.json"] + _write_tokenizer_files(spec, out, hf=True, block_size=cfg.block_size)
        readme = (
            f"# raylm export (Hugging Face GPT-2)\n\nFrom `{source['checkpoint']}` (step {source['step']}).\n\n"
            "    from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast\n"
            f"    model = GPT2LMHeadModel.from_pretrained('{out}')\n"
            f"    tok = PreTrainedTokenizerFast(tokenizer_file='{out / 'tokenizer.json'}')\n\n"
            "`tokenizer.tiktoken` + `raylm_tokenizer.json` are the same tokenizer in raylm's own format.\n"
        )
    else:
        state = {n: p.detach().float().cpu().contiguous() for n, p in model.named_parameters()}
        save_file(state, str(out / MODEL_FILE), metadata={"format": "pt"})
        (out / MODEL_CONFIG_FILE).write_text(json.dumps(asdict(cfg), indent=2))
        files = [MODEL_FILE, MODEL_CONFIG_FILE] + _write_tokenizer_files(spec, out, hf=False, block_size=cfg.block_size)
        why = gpt2_mismatches(cfg)
        reason = (
            f"A Hugging Face GPT-2 export is not possible: {'; '.join(why)}.\n"
            if why
            else "This model is GPT-2-shaped: `export --format hf` also works.\n"
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
        (out / META_FILE).write_text(json.dumps({**source, "format": "raylm-export", "files": sizes}, indent=2))
        files.append(META_FILE)
    print(f"exported {source['checkpoint']} as {fmt} to {out} ({len(files)} files)")
    return {"format": fmt, "out_dir": str(out), "files": files, **source}


def peft_adapter(adapters: dict[str, torch.Tensor], lora: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """raylm adapters -> (tensors, adapter_config.json) in PEFT's LoRA format for GPT2LMHeadModel.

    Module paths are GPT-2's own; PEFT keeps lora_A (r, in) / lora_B (out, r) even on GPT-2's Conv1D
    layers (fan_in_fan_out transposes only the base weight), so the matrices copy over unchanged.
    """
    from model.config import LORA_TARGETS

    tensors = {
        f"base_model.model.{name.replace('.lora_A', '.lora_A.weight').replace('.lora_B', '.lora_B.weight')}": t.contiguous()  # noqa: E501
        for name, t in adapters.items()
    }
    targets = sorted({suffix for target in lora["targets"] for suffix in LORA_TARGETS[target]})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": lora["rank"],
        "lora_alpha": lora["alpha"],
        "lora_dropout": 0.0,
        "target_modules": targets,
        "fan_in_fan_out": True,
        "bias": "none",
        "use_rslora": False,
        "inference_mode": True,
        "base_model_name_or_path": None,
    }
    return tensors, config


def export_adapter(checkpoint_uri: str, out_dir: str, *, fmt: str = "hf", endpoint_url: Optional[str] = None) -> dict:
    """A LoRA fine-tune kept separate: its base checkpoint exported to ``out_dir`` and the adapters to
    ``out_dir/adapter/`` (hf: PEFT's adapter_config.json + adapter_model.safetensors, loadable with
    ``PeftModel.from_pretrained``; raylm: adapter.safetensors + adapter_config.json)."""
    from safetensors.torch import load_file, save_file

    from orchestration.evaluate.load import _local_copy, _resolve
    from orchestration.finetune.task import ADAPTER_FILE, FINETUNE_FILE

    ckpt_uri = _resolve(checkpoint_uri, endpoint_url)
    local = Path(_local_copy(ckpt_uri, endpoint_url))
    info = json.loads((local / FINETUNE_FILE).read_text()) if (local / FINETUNE_FILE).is_file() else {}
    if not info.get("lora"):
        raise ExportError(f"{ckpt_uri} is not a LoRA fine-tune (no adapters in it); export it with lora='merged'")
    result = export_checkpoint(info["base_checkpoint"], out_dir, fmt=fmt, endpoint_url=endpoint_url)
    adapters = load_file(str(local / ADAPTER_FILE))
    adapter_dir = Path(out_dir) / "adapter"
    adapter_dir.mkdir(parents=True, exist_ok=True)
    if fmt == "hf":
        tensors, config = peft_adapter(adapters, info["lora"])
        config["base_model_name_or_path"] = str(Path(out_dir).absolute())
        save_file(tensors, str(adapter_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    else:
        config = {**info["lora"], "base_checkpoint": info["base_checkpoint"]}
        save_file(adapters, str(adapter_dir / ADAPTER_FILE), metadata={"format": "pt"})
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
    files = sorted(f"adapter/{p.name}" for p in adapter_dir.iterdir())
    print(f"exported the adapters of {ckpt_uri} to {adapter_dir} ({', '.join(files)})")
    return {**result, "files": result["files"] + files, "adapter_of": ckpt_uri}
