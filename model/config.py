"""Model shape and the named presets of the scaling ladder.

Pure data: no torch import, so configs load and validate fast on any machine.
Ranges and choices live in field metadata (``min``/``max``) and ``Literal`` types; the loader in
``orchestration.config`` enforces them and names the key and file on failure.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Literal, Optional

# LoRA target short names (as configs write them) -> the linear layers they select inside every block
LORA_TARGETS = {
    "attn": ("attn.c_attn", "attn.c_proj"),
    "qkv": ("attn.c_attn",),
    "attn_out": ("attn.c_proj",),
    "mlp": ("mlp.c_fc", "mlp.c_proj"),
}


RECURRENT_ARCHS = ("rnn", "gru", "lstm")  # model.lstm.RecurrentLM's cells; "gpt" is the transformer


@dataclass
class ModelConfig:
    """A decoder-only transformer. Defaults are a tiny CPU-sized GPT.

    arch "rnn" (tanh), "gru" or "lstm" builds the ``model.lstm.RecurrentLM`` baseline instead: it reads
    vocab_size, block_size (training/eval window), n_layer, n_embd (embedding = hidden size), dropout, bias,
    tie_embeddings and init_std, and ignores the attention, MLP, norm and position fields.
    """

    preset: Optional[str] = None  # a name from PRESETS; explicit keys override its values
    arch: Literal["gpt", "rnn", "gru", "lstm"] = "gpt"
    vocab_size: int = field(default=512, metadata={"min": 2})
    # The embedding and head get this many rows rounded up to a multiple of it (nanoGPT's 50,304 for
    # GPT-2's 50,257): matmul shapes GPU kernels tile well. The extra rows are never a token: they get no
    # probability in training, sampling or eval, and exports drop them.
    pad_vocab_to: int = field(default=1, metadata={"min": 1})
    block_size: int = field(default=128, metadata={"min": 1})  # context length in tokens
    n_layer: int = field(default=2, metadata={"min": 1})
    n_head: int = field(default=2, metadata={"min": 1})
    n_kv_head: Optional[int] = field(default=None, metadata={"min": 1})  # None: = n_head (MHA)
    n_embd: int = field(default=64, metadata={"min": 1})
    # Width of one attention head. None: n_embd // n_head. Set, heads need not fill n_embd: a model whose
    # heads were pruned (``model.prune``) keeps its n_embd and head width with fewer heads, so q/k/v are
    # n_head * head_size wide and the attention output projection maps that back to n_embd.
    head_size: Optional[int] = field(default=None, metadata={"min": 1})
    mlp: Literal["gelu", "swiglu"] = "gelu"
    mlp_hidden: Optional[int] = field(default=None, metadata={"min": 1})  # None: 4*d (gelu), 8/3*d (swiglu)
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = field(default=1e-5, metadata={"min": 0.0})
    pos_encoding: Literal["learned", "sinusoidal", "rope"] = "learned"
    rope_theta: float = field(default=10000.0, metadata={"min": 1.0})
    dropout: float = field(default=0.0, metadata={"min": 0.0, "max": 0.99})
    bias: bool = True
    tie_embeddings: bool = True
    init_std: float = field(default=0.02, metadata={"min": 0.0})
    # Attention stays inside each document of a packed row and positions restart at each document
    # (``model.documents``): a document then reads the same whatever shares its row
    document_masking: bool = False
    # The token that ends a document, read with document_masking. None: `raylm train` sets the data's
    # end-of-text token (the tokenizer's)
    eos_id: Optional[int] = field(default=None, metadata={"min": 0})
    # "mup": the maximal update parametrization (``model.mup``): hidden matrices' init and AdamW LR scale
    # with mup_base_width / n_embd, logits with the same ratio, attention by 1/head_dim; an LR tuned at
    # mup_base_width then holds at any width. "sp": the standard one (every LR and init as given).
    parametrization: Literal["sp", "mup"] = "sp"
    mup_base_width: Optional[int] = field(default=None, metadata={"min": 1})  # the width LRs were tuned at

    def __post_init__(self) -> None:
        if self.parametrization == "mup" and (self.arch != "gpt" or self.mup_base_width is None):
            raise ValueError(
                "parametrization=mup scales a transformer's layers against the width its hyperparameters were "
                "tuned at: "
                + (f"arch {self.arch!r} is not one" if self.arch != "gpt" else "set model.mup_base_width (e.g. 64)")
            )
        if self.document_masking and self.arch != "gpt":
            raise ValueError(
                f"document_masking confines a transformer's attention to each document; arch {self.arch!r} has "
                "no attention: set document_masking=false or arch=gpt"
            )
        if self.eos_id is not None and not 0 <= self.eos_id < self.vocab_size:
            raise ValueError(f"eos_id {self.eos_id} is not a token of the vocabulary (vocab_size {self.vocab_size})")
        if self.arch in RECURRENT_ARCHS:
            if self.preset is not None:
                raise ValueError(f"preset {self.preset!r} is a transformer shape; arch {self.arch!r} takes no preset")
            return  # the attention fields below do not apply to a recurrent model
        if self.head_size is None and self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}), or head_size must be set"
            )
        if self.head_size is not None and self.head_size < 1:
            raise ValueError(f"head_size must be >= 1 (or None for n_embd // n_head), got {self.head_size}")
        if self.pos_encoding == "rope" and self.head_dim % 2:
            where = "head_size" if self.head_size is not None else "n_embd/n_head"
            raise ValueError(f"rope needs an even head_dim, got {where} = {self.head_dim}")
        if self.kv_heads > self.n_head or self.n_head % self.kv_heads:
            raise ValueError(f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head}) and be <= it")
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; allowed: {sorted(PRESETS)}")

    @staticmethod
    def expand_preset(values: dict) -> dict:
        """Config values with their named ``preset`` filled in: explicit keys win over the preset's."""
        preset = values.get("preset")
        if preset is None:
            return values
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; allowed: {', '.join(sorted(PRESETS))}")
        return {**PRESETS[preset], **values}

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and the head: vocab_size rounded up to a multiple of pad_vocab_to (the
        recurrent baselines do not pad)."""
        if self.arch in RECURRENT_ARCHS:
            return self.vocab_size
        return -(-self.vocab_size // self.pad_vocab_to) * self.pad_vocab_to

    @property
    def width_mult(self) -> float:
        """n_embd / mup_base_width under μP (how much wider than where the LR was tuned), else 1."""
        return self.n_embd / self.mup_base_width if self.parametrization == "mup" else 1.0

    @property
    def head_dim(self) -> int:
        """Width of one attention head: head_size when set, else n_embd // n_head."""
        return self.head_size if self.head_size is not None else self.n_embd // self.n_head

    @property
    def attn_dim(self) -> int:
        """Width of all query heads together (q, and attention's output before its projection): n_embd
        unless heads were pruned."""
        return self.n_head * self.head_dim

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def hidden_dim(self) -> int:
        """MLP width. SwiGLU's 8/3*d keeps its 3 matrices at the parameter count of GELU's 2 at 4*d;
        rounded up to a multiple of 64 for efficient matmuls."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.mlp == "gelu":
            return 4 * self.n_embd
        return 64 * ((8 * self.n_embd // 3 + 63) // 64)


def _gpt2(n_layer: int, n_head: int, n_embd: int) -> dict:
    return dict(
        vocab_size=50257,
        pad_vocab_to=64,  # 50,304 rows, as nanoGPT trains it
        block_size=1024,
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        mlp="gelu",
        norm="layernorm",
        pos_encoding="learned",
        bias=True,
        tie_embeddings=True,
    )


def _modern(n_layer: int, n_embd: int, head_dim: int = 64, vocab_size: int = 32768) -> dict:
    """Llama-style ladder rung: RoPE, SwiGLU, RMSNorm, no biases, aspect ratio d/L fixed by caller."""
    return dict(
        vocab_size=vocab_size,
        block_size=2048,
        n_layer=n_layer,
        n_head=n_embd // head_dim,
        n_embd=n_embd,
        mlp="swiglu",
        norm="rmsnorm",
        pos_encoding="rope",
        bias=False,
        tie_embeddings=True,
    )


# Parameter counts (model.flops.count_params, padding rows included; `raylm model-info --list` prints
# them): tiny 0.14M, micro 1.09M, mini 3.5M, shakespeare 1.31M, gpt2-small 124.5M, gpt2-medium 354.9M,
# gpt2-large 774.1M, gpt2-xl 1557.7M, gpt3-xl 1315.8M; at pad_vocab_to=1 the GPT-2 counts are Hugging
# Face's (124.4M ...), pinned by tests/model/test_model.py.
# The Llama-style ladder (aspect ratio n_embd / n_layer = 64, head_dim 64, vocab 32768) is named by its
# total count, rounded, as Chinchilla counts N (tests/model/test_presets.py holds each name to within 2%):
#   preset        n_layer  n_embd  params   non-embedding
#   ladder-23m        6      384    23.2M      10.6M
#   ladder-70m       10      640    70.5M      49.6M
#   ladder-166m      14      896   165.9M     136.5M
#   ladder-438m      20     1280   438.5M     396.5M
PRESETS: dict[str, dict] = {
    "tiny": dict(vocab_size=512, block_size=128, n_layer=2, n_head=2, n_embd=64),
    "micro": dict(vocab_size=2048, block_size=256, n_layer=4, n_head=4, n_embd=128),
    "mini": dict(vocab_size=4096, block_size=256, n_layer=6, n_head=6, n_embd=192),
    "shakespeare": dict(
        vocab_size=4096, block_size=256, n_layer=4, n_head=4, n_embd=128, pos_encoding="rope", mlp="gelu", bias=False
    ),
    "gpt2-small": _gpt2(12, 12, 768),
    "gpt2-medium": _gpt2(24, 16, 1024),
    "gpt2-large": _gpt2(36, 20, 1280),
    "gpt2-xl": _gpt2(48, 25, 1600),
    "gpt3-xl": dict(_gpt2(24, 16, 2048), vocab_size=50257, block_size=2048),  # GPT-3 XL, ~1.3B
    "ladder-23m": _modern(6, 384),
    "ladder-70m": _modern(10, 640),
    "ladder-166m": _modern(14, 896),
    "ladder-438m": _modern(20, 1280),
}


def model_config_from_preset(name: str, **overrides) -> ModelConfig:
    """A ModelConfig for a named preset, with keyword overrides applied on top."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; allowed: {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides, "preset": name})


def with_vocab_size(cfg: ModelConfig, vocab_size: int) -> ModelConfig:
    """The same shape with another vocabulary (a trained tokenizer's size decides it)."""
    return replace(cfg, vocab_size=vocab_size)


MODEL_FIELDS = tuple(f.name for f in fields(ModelConfig))


ActivationCheckpointing = Literal["none", "full", "selective"]
ACTIVATION_CHECKPOINTING_MODES = ("none", "full", "selective")


def checkpointed_blocks(n_layer: int, mode: str, every: int = 2) -> tuple[int, ...]:
    """Indices of the transformer blocks whose activations are recomputed in backward.

    "none": no block; "full": every block; "selective": every ``every``-th block (indices every-1,
    2*every-1, ...; torchtitan's layer-frequency rule), so 1/every of the blocks trade their saved
    activations for one extra forward each. Pure arithmetic, so the memory estimate (model.flops) and
    the model (GPT.set_activation_checkpointing) agree on the set.
    """
    if mode not in ACTIVATION_CHECKPOINTING_MODES:
        raise ValueError(
            f"activation checkpointing mode {mode!r} is unknown; allowed: {ACTIVATION_CHECKPOINTING_MODES}"
        )
    if every < 1:
        raise ValueError(f"activation checkpointing every={every} must be >= 1 (checkpoint every k-th block)")
    if mode == "none":
        return ()
    if mode == "full":
        return tuple(range(n_layer))
    return tuple(range(every - 1, n_layer, every))
