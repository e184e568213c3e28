"""How a raylm GPT maps onto a standard Hugging Face transformers architecture, exactly.

Each shape family is the transformers architecture that computes the same function (checked
against transformers' own modeling code, and pinned in tests by logits within 1e-4 and equal greedy
tokens):

  positions          MLP          norm        biases   -> architecture
  learned/sinusoid.  GELU (tanh)  LayerNorm   any      -> GPT2LMHeadModel (GPT-2, tiny/micro/mini, gpt3-xl)
  RoPE               SwiGLU       RMSNorm     any      -> LlamaForCausalLM (the ladder-* presets)
  RoPE               GELU (tanh)  LayerNorm   any      -> Starcoder2ForCausalLM (the shakespeare preset)
  RoPE               GELU (tanh)  RMSNorm     any      -> ArceeForCausalLM (Llama with a non-gated MLP)
  RoPE               SwiGLU       LayerNorm   none     -> StableLmForCausalLM

What makes each exact: raylm's RoPE rotates pairs (i, i + D/2), the half-split layout HF's
``rotate_half`` uses, so q/k weights copy without a permutation; raylm's GQA repeats each kv head
for consecutive query heads, as HF's ``repeat_kv``; GELU is the tanh form (``gelu_pytorch_tanh``, the
same torch op); raylm's LayerNorm without bias is HF's LayerNorm with a zero bias; a model without
linear biases gets zero biases where the HF class always has them (GPT-2's Conv1D). GPT-2 has no
grouped-query attention, so GQA k/v heads are repeated into full multi-head weights, and GPT-2's
learned position table holds raylm's fixed sinusoidal table. Tied embeddings stay tied.
Learned or sinusoidal positions with SwiGLU or RMSNorm have no standard equivalent, nor has
``model.document_masking`` (the architectures attend across an end-of-text token and keep counting
positions past it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import torch

from model import mup
from model.config import ModelConfig


@dataclass(frozen=True)
class Family:
    """One HF architecture a raylm shape maps onto."""

    architecture: str  # the transformers class config.json names
    model_type: str
    positions: str  # "absolute" (learned or sinusoidal) or "rope"
    mlp: str  # raylm's model.mlp
    norm: str  # raylm's model.norm
    needs_no_bias: bool = False  # the HF class has no biases on some linears
    # the HF class reads config.head_dim; False: its heads are hidden_size / num_heads wide, so a model
    # whose heads do not fill n_embd (pruned heads: ModelConfig.head_size) has no equivalent there
    any_head_dim: bool = True


FAMILIES = {
    "gpt2": Family("GPT2LMHeadModel", "gpt2", "absolute", "gelu", "layernorm", any_head_dim=False),
    "llama": Family("LlamaForCausalLM", "llama", "rope", "swiglu", "rmsnorm"),
    "starcoder2": Family("Starcoder2ForCausalLM", "starcoder2", "rope", "gelu", "layernorm"),
    "arcee": Family("ArceeForCausalLM", "arcee", "rope", "gelu", "rmsnorm"),
    "stablelm": Family(
        "StableLmForCausalLM", "stablelm", "rope", "swiglu", "layernorm", needs_no_bias=True, any_head_dim=False
    ),
}
TANH_GELU = "gelu_pytorch_tanh"  # ACT2FN name of F.gelu(approximate="tanh"), model.layers.MLP's activation


def hf_family(cfg: ModelConfig) -> Optional[str]:
    """The FAMILIES key whose architecture computes ``cfg`` exactly, or None when none does."""
    if cfg.arch != "gpt" or cfg.document_masking:
        return None
    positions = "rope" if cfg.pos_encoding == "rope" else "absolute"
    for name, fam in FAMILIES.items():
        if (fam.positions, fam.mlp, fam.norm) == (positions, cfg.mlp, cfg.norm):
            if (fam.needs_no_bias and cfg.bias) or (not fam.any_head_dim and cfg.attn_dim != cfg.n_embd):
                return None
            return name
    return None


def unsupported_reason(cfg: ModelConfig) -> str:
    """Why ``cfg`` has no HF architecture, with the shapes that do map."""
    if cfg.document_masking:
        # the architectures attend across the whole input and count positions from its first token
        return (
            "model.document_masking=true (attention and positions restart after each end-of-text token): no "
            "standard Hugging Face architecture computes that"
        )
    positions = "rope" if cfg.pos_encoding == "rope" else "absolute"
    same = [f for f in FAMILIES.values() if (f.positions, f.mlp, f.norm) == (positions, cfg.mlp, cfg.norm)]
    if cfg.arch == "gpt" and cfg.attn_dim != cfg.n_embd and same and not same[0].any_head_dim:
        return (
            f"n_head * head_dim = {cfg.n_head} * {cfg.head_dim} = {cfg.attn_dim} is not n_embd {cfg.n_embd} "
            f"(heads were pruned), and {same[0].architecture}, the architecture of this shape "
            f"(pos_encoding={cfg.pos_encoding!r}, mlp={cfg.mlp!r}, norm={cfg.norm!r}), makes heads n_embd / n_head "
            "wide; Llama, Starcoder2 and Arcee shapes (RoPE) export pruned heads"
        )
    shape = (
        f"arch={cfg.arch!r}"
        if cfg.arch != "gpt"
        else f"pos_encoding={cfg.pos_encoding!r}, mlp={cfg.mlp!r}, norm={cfg.norm!r}, bias={cfg.bias}"
    )
    table = "; ".join(
        f"{f.architecture}: {'learned/sinusoidal' if f.positions == 'absolute' else 'rope'} positions, "
        f"mlp={f.mlp!r}, norm={f.norm!r}{', bias=False' if f.needs_no_bias else ''}"
        for f in FAMILIES.values()
    )
    return f"no standard Hugging Face architecture computes {shape} exactly (exported shapes: {table})"


def hf_config(cfg: ModelConfig, family: str, eot_id: Optional[int]) -> dict:
    """config.json of the family's architecture with the shape of ``cfg``."""
    fam = FAMILIES[family]
    common = {
        "architectures": [fam.architecture],
        "model_type": fam.model_type,
        "vocab_size": cfg.vocab_size,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": eot_id,
        "eos_token_id": eot_id,
        "dtype": "float32",
    }
    if family == "gpt2":
        return {
            **common,
            "n_positions": cfg.block_size,
            "n_ctx": cfg.block_size,
            "n_embd": cfg.n_embd,
            "n_layer": cfg.n_layer,
            "n_head": cfg.n_head,
            "n_inner": cfg.hidden_dim,
            "activation_function": TANH_GELU,
            "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": cfg.dropout,
            "embd_pdrop": cfg.dropout,
            "attn_pdrop": cfg.dropout,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
        }
    rope = {
        **common,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.kv_heads,
        "max_position_embeddings": cfg.block_size,
        "attention_dropout": cfg.dropout,
        # transformers >= 5 reads rope_parameters; 4.x reads rope_theta (and partial_rotary_factor)
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_theta": cfg.rope_theta,
    }
    if family in ("llama", "arcee"):
        return {
            **rope,
            "hidden_act": "silu" if family == "llama" else TANH_GELU,
            "rms_norm_eps": cfg.norm_eps,
            "head_dim": cfg.head_dim,
            "attention_bias": cfg.bias,
            "mlp_bias": cfg.bias,
        }
    if family == "starcoder2":
        return {
            **rope,
            "hidden_act": TANH_GELU,
            "norm_epsilon": cfg.norm_eps,
            "head_dim": cfg.head_dim,  # read by transformers' Starcoder2 (5.x); hidden_size / heads otherwise
            "use_bias": cfg.bias,
            "residual_dropout": cfg.dropout,
            "embedding_dropout": cfg.dropout,
            "sliding_window": None,
        }
    return {  # stablelm
        **rope,
        "rope_parameters": {**rope["rope_parameters"], "partial_rotary_factor": 1.0},
        "partial_rotary_factor": 1.0,
        "hidden_act": "silu",
        "layer_norm_eps": cfg.norm_eps,
        "use_qkv_bias": False,
        "qk_layernorm": False,
        "use_parallel_residual": False,
        "hidden_dropout": cfg.dropout,
    }


_BLOCK = re.compile(r"^transformer\.h\.(\d+)\.(.+)$")


def linear_rows(cfg: ModelConfig, family: str, module: str, rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """A raylm linear layer's output rows -> {HF module path: its rows}.

    ``module`` is a raylm path (``transformer.h.3.attn.c_attn``); ``rows`` is anything laid out along
    the layer's outputs: its weight (out, in), its bias (out,) or a LoRA B (out, r). The fused qkv
    splits into q/k/v (GPT-2: k/v heads repeated up to n_head), the fused SwiGLU [gate | up] into two.
    """
    layer, name = _BLOCK.match(module).groups()
    if family == "gpt2":
        if name == "attn.c_attn" and cfg.kv_heads != cfg.n_head:
            q, k, v = _split_qkv(cfg, rows)
            group = cfg.n_head // cfg.kv_heads
            k, v = (t.reshape(cfg.kv_heads, -1, *t.shape[1:]).repeat_interleave(group, 0).flatten(0, 1) for t in (k, v))
            rows = torch.cat([q, k, v])
        return {module: rows}
    prefix = f"model.layers.{layer}"
    if name == "attn.c_attn":
        q, k, v = _split_qkv(cfg, rows)
        return {f"{prefix}.self_attn.q_proj": q, f"{prefix}.self_attn.k_proj": k, f"{prefix}.self_attn.v_proj": v}
    if name == "attn.c_proj":
        return {f"{prefix}.self_attn.o_proj": rows}
    if name == "mlp.c_fc":
        if cfg.mlp == "swiglu":
            gate, up = rows.chunk(2, dim=0)
            return {f"{prefix}.mlp.gate_proj": gate, f"{prefix}.mlp.up_proj": up}
        return {f"{prefix}.mlp.{'c_fc' if family == 'starcoder2' else 'up_proj'}": rows}
    if name == "mlp.c_proj":
        return {f"{prefix}.mlp.{'c_proj' if family == 'starcoder2' else 'down_proj'}": rows}
    raise KeyError(f"{module} is not a linear layer of a raylm block")


def _split_qkv(cfg: ModelConfig, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q_dim, kv_dim = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    return rows.split([q_dim, kv_dim, kv_dim], dim=0)


_NORMS = {"ln_1": "input_layernorm", "ln_2": "post_attention_layernorm"}


def mup_folded(cfg: ModelConfig, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``params`` with μP's forward multipliers folded into standard weights (``model.mup``), for
    architectures that have neither: the logits' 1/width_mult into the final norm's gain and bias, and
    attention's 1/head_dim (where HF divides by sqrt(head_dim)) into the query rows of each c_attn weight,
    bias and LoRA B. Under sp, ``params`` as they are."""
    if cfg.parametrization != "mup":
        return params
    out, q_dim = dict(params), cfg.n_head * cfg.head_dim
    for name, tensor in params.items():
        if name.startswith("transformer.ln_f."):
            out[name] = tensor * mup.output_mult(cfg)
        elif re.fullmatch(r"transformer\.h\.\d+\.attn\.c_attn\.(weight|bias|lora_B)", name):
            out[name] = torch.cat([tensor[:q_dim] * mup.query_fold(cfg), tensor[q_dim:]])
    return out


def hf_state(model: torch.nn.Module, family: str) -> dict[str, torch.Tensor]:
    """raylm GPT weights under the family's HF names, fp32, every tensor the HF class holds.

    A tied lm_head is left out (HF ties it on load). Biases raylm lacks but the HF class has
    (GPT-2's linears; any LayerNorm's) are zeros, which computes the same function. The vocabulary's
    padding rows (``pad_vocab_to``) are dropped: the export holds ``vocab_size`` rows, as its config says.
    """
    cfg: ModelConfig = model.cfg
    params = mup_folded(cfg, {n: p.detach().float().cpu() for n, p in model.named_parameters()})  # tied: wte only
    d = cfg.n_embd
    ln_bias = family in ("gpt2", "starcoder2", "stablelm")
    linear_bias = family == "gpt2" or (cfg.bias and not FAMILIES[family].needs_no_bias)
    state: dict[str, torch.Tensor] = {}

    def norm(raylm: str, hf: str) -> None:
        state[f"{hf}.weight"] = params[f"{raylm}.weight"]
        if ln_bias:
            state[f"{hf}.bias"] = params.get(f"{raylm}.bias", torch.zeros(d))

    gpt2 = family == "gpt2"
    vocab = cfg.vocab_size
    state["transformer.wte.weight" if gpt2 else "model.embed_tokens.weight"] = params["transformer.wte.weight"][:vocab]
    if gpt2:
        # GPT-2's learned table can hold raylm's fixed sinusoidal one: x + table[pos] either way
        table = params["transformer.wpe.weight"] if cfg.pos_encoding == "learned" else model.pos_table.float().cpu()
        state["transformer.wpe.weight"] = table
    for i in range(cfg.n_layer):
        block = f"transformer.h.{i}"
        for ln, hf_ln in _NORMS.items():
            norm(f"{block}.{ln}", f"{block}.{ln}" if gpt2 else f"model.layers.{i}.{hf_ln}")
        for linear in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            module = f"{block}.{linear}"
            weight = params[f"{module}.weight"]
            bias = params.get(f"{module}.bias", torch.zeros(weight.shape[0]))
            for hf_module, w in linear_rows(cfg, family, module, weight).items():
                state[f"{hf_module}.weight"] = w.t() if gpt2 else w  # GPT-2's Conv1D stores (in, out)
            if linear_bias:
                for hf_module, b in linear_rows(cfg, family, module, bias).items():
                    state[f"{hf_module}.bias"] = b
    norm("transformer.ln_f", "transformer.ln_f" if gpt2 else "model.norm")
    if not cfg.tie_embeddings:
        state["lm_head.weight"] = params["lm_head.weight"][:vocab]
    return {k: v.contiguous() for k, v in state.items()}


def peft_adapter(
    cfg: ModelConfig, family: str, adapters: dict[str, torch.Tensor], lora: dict
) -> tuple[dict[str, torch.Tensor], dict]:
    """raylm adapters -> (tensors, adapter_config.json) in PEFT's LoRA format for the family's model.

    Under μP the query rows of B carry the attention scale (``mup_folded``). A fused layer's adapter becomes
    one adapter per HF layer: the same A, the rows of B that layer
    owns (``linear_rows``), so B @ A per piece is exactly the fused delta's rows. PEFT keeps lora_A
    (r, in) / lora_B (out, r) even on GPT-2's Conv1D (fan_in_fan_out transposes only the base weight).
    """
    tensors, targets = {}, set()
    adapters = mup_folded(cfg, adapters)
    modules = sorted({name.rsplit(".", 1)[0] for name in adapters})
    for module in modules:
        a, b = adapters[f"{module}.lora_A"], adapters[f"{module}.lora_B"]
        for hf_module, rows in linear_rows(cfg, family, module, b).items():
            tensors[f"base_model.model.{hf_module}.lora_A.weight"] = a.clone()  # own storage per layer
            tensors[f"base_model.model.{hf_module}.lora_B.weight"] = rows.clone()
            targets.add(re.sub(r"^(transformer\.h|model\.layers)\.\d+\.", "", hf_module))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": lora["rank"],
        "lora_alpha": lora["alpha"],
        "lora_dropout": 0.0,
        "target_modules": sorted(targets),
        "fan_in_fan_out": family == "gpt2",
        "bias": "none",
        "use_rslora": False,
        "inference_mode": True,
        "base_model_name_or_path": None,
    }
    return tensors, config


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
