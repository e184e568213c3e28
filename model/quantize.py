"""Weight-only quantization of a trained GPT: the tensor math, the quantized modules, and the swap.

Two schemes, both storing weights as integers plus floating-point scales and computing in the
activations' dtype (weight-only: activations stay fp32/bf16, so accuracy loss is the weights' alone):

- ``int8``: symmetric, one fp32 scale per output channel (row): ``w ~= q * scale``, q in [-127, 127].
- ``int4``: asymmetric, groups of ``group_size`` input columns per row, an fp16 scale and minimum
  each: ``w ~= q * scale + min``, q in [0, 15], packed two per byte (high nibble = even column, as
  torchao and gpt-fast pack for ``aten._convert_weight_to_int4pack``).

The stored layout is the same on every device. On the CPU, an int4 linear fed few rows (decoding)
runs torch's own packed kernel (``aten._weight_int4pack_mm_for_cpu``, gpt-fast's path; measured
faster than fp32 at one row, ~40x slower than dequantize-then-matmul at 2,048 rows; it has no
backward, so only where no gradient is wanted), repacked from the portable layout again whenever the
buffers move or are reloaded; everywhere else (CUDA, prefill, eval, attributions) it dequantizes and
runs a plain matmul, so CUDA works without its tensor-core layout being tested here. An int8 linear
runs ``(x @ q^T) * scale`` with q cast to x's dtype: per-row scales factor out of the matmul. The
modules compute in the dtype ``.to()`` gives the model (bf16 included); the scales and minima keep
their stored precision through such casts.

Every ``nn.Linear`` (the LM head included) and ``nn.Embedding`` is quantized; norms stay fp32 (and
int4 keeps fp32 any layer whose input width its group size does not divide). A tied token embedding
and head share one quantized matrix (a row scale is an output-channel scale, and an int4 row's groups
serve a lookup as well as a matmul), so the file holds it once and no fp32 copy, and the head reads
the embedding's buffers on whatever device they are. ``build_quantized_model`` builds a quantized GPT
from a file's tensors without ever allocating the fp32 model.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import ModelConfig
from model.gpt import GPT
from model.loss import LMHead

SCHEMES = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what the packed CPU kernel accepts
# An int4 matmul over at most this many rows uses the CPU packed kernel; more rows dequantize first
PACKED_MAX_ROWS = 16


# --- tensor math -------------------------------------------------------------------------------


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> (q int8 (N, K), scale fp32 (N,)) with ``w ~= q * scale[:, None]``."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return q.to(dtype) * scale.to(dtype)[..., None]


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(..., K) values 0-15 -> (..., K/2) uint8, the even column in the high nibble."""
    q = q.to(torch.uint8)
    return (q[..., ::2] << 4) | q[..., 1::2]


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(..., K/2) uint8 -> (..., K) uint8 values 0-15 (``pack_int4``'s inverse)."""
    return torch.stack([packed >> 4, packed & 0xF], dim=-1).flatten(-2)


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float -> (packed uint8 (N, K/2), scale fp16 (N, K/g), min fp16 (N, K/g)) with
    ``w ~= q * scale + min`` per group of ``group_size`` columns. q is rounded against the fp16
    scale and min actually stored, so storing them in fp16 adds no error of its own."""
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"{k} input columns are not a multiple of the int4 group size {group_size}")
    groups = w.detach().float().reshape(n, k // group_size, group_size)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((hi - lo) / 15.0).clamp(min=1e-6).half()
    lo = lo.half()
    q = torch.round((groups - lo.float()[..., None]) / scale.float()[..., None]).clamp(0, 15)
    return pack_int4(q.reshape(n, k)), scale, lo


def dequantize_int4(
    packed: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, group_size: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``quantize_int4``'s output -> (..., K) in ``dtype``; works on any leading shape (rows gathered
    by an embedding lookup included)."""
    q = unpack_int4(packed)
    groups = q.reshape(*q.shape[:-1], -1, group_size).float()
    w = groups * scale.float()[..., None] + lo.float()[..., None]
    return w.reshape(q.shape).to(dtype)


def cpu_int4_packed(packed: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The portable int4 layout -> (weight, scales_and_zeros) for ``aten._weight_int4pack_mm_for_cpu``.

    The kernel computes ``(q - 8) * s + z`` in fp32, so z = min + 8 s. It needs N divisible by 16:
    rows are padded with zeros (the caller slices its output back to N)."""
    n = packed.size(0)
    pad = -n % 16
    q = unpack_int4(packed).to(torch.int32)
    s, z = scale.float(), lo.float() + 8 * scale.float()
    if pad:
        q = F.pad(q, (0, 0, 0, pad))
        s, z = F.pad(s, (0, 0, 0, pad)), F.pad(z, (0, 0, 0, pad))
    weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    return weight, torch.stack([s, z], dim=-1).transpose(0, 1).contiguous()


# --- modules -------------------------------------------------------------------------------------

STORED = ("qweight", "scales", "zeros")  # a quantized module's integer weights, scales and (int4) minima


class QuantizedWeight(nn.Module):
    """What every quantized module holds: buffers ``qweight``, ``scales`` (+ ``zeros`` for int4: the
    group minima), or, for a tied alias (``tied_to``), its owner's, read through and not a child, so
    the matrix exists once on any device whatever ``.to()`` does. ``weight`` is the dequantized matrix
    in the dtype the module computes in: that of an empty float buffer ``.to(dtype)`` casts, while the
    scales and minima keep their stored precision through any float cast (they only move devices)."""

    def __init__(
        self,
        qweight: torch.Tensor | None,
        scales: torch.Tensor | None,
        zeros: torch.Tensor | None,
        group_size: int = 0,
        tied_to: QuantizedWeight | None = None,
    ) -> None:
        super().__init__()
        object.__setattr__(self, "tied_to", tied_to)  # not registered: the owner's buffers stay its own
        if tied_to is None:
            for name, t in zip(STORED, (qweight, scales, zeros)):
                self.register_buffer(name, t)
        self.bits = 8 if self.zeros is None else 4
        self.group_size = group_size
        self.register_buffer("compute_dtype_marker", torch.empty(0), persistent=False)

    def __getattr__(self, name: str):
        tied_to = self.__dict__.get("tied_to")
        if tied_to is not None and name in STORED:
            return getattr(tied_to, name)
        return super().__getattr__(name)

    def _apply(self, fn, recurse=True):
        # float casts (.to(bf16), .half()) skip the scales and minima: rounding fp16 scales to bf16
        # would add error of its own; device moves still apply
        stored = {n: self._buffers.pop(n) for n in STORED[1:] if self._buffers.get(n) is not None}
        super()._apply(fn, recurse)
        for name, t in stored.items():
            moved = fn(t)
            self._buffers[name] = moved if moved.dtype == t.dtype else t.to(moved.device)
        return self

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.compute_dtype_marker.dtype

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.compute_dtype
        if self.bits == 8:
            return dequantize_int8(self.qweight, self.scales, dtype)
        return dequantize_int4(self.qweight, self.scales, self.zeros, self.group_size, dtype)

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantized()


def drop_packed(module: QuantizedLinear, incompatible_keys=None) -> None:
    """Forget ``module``'s packed CPU copy (a load_state_dict post-hook: loading writes the buffers in place)."""
    module._cpu_packed = None


class QuantizedLinear(QuantizedWeight):
    """A weight-only quantized ``nn.Linear`` (``QuantizedWeight``'s storage) with an fp32 ``bias`` if the
    original had one. An int4 matmul over few rows on the CPU that needs no gradient runs torch's packed
    kernel (it has no backward), from a repacked copy rebuilt whenever the buffers move or are loaded."""

    def __init__(
        self,
        qweight: torch.Tensor | None,
        scales: torch.Tensor | None,
        zeros: torch.Tensor | None,
        in_features: int,
        bias: torch.Tensor | None = None,
        group_size: int = 0,
        tied_to: QuantizedWeight | None = None,
    ) -> None:
        super().__init__(qweight, scales, zeros, group_size, tied_to)
        self.in_features, self.out_features = in_features, self.scales.size(0)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)
        self._cpu_packed: tuple[tuple, torch.Tensor, torch.Tensor] | None = None  # (key, weight, scales+zeros)
        self.register_load_state_dict_post_hook(drop_packed)

    def _apply(self, fn, recurse=True):
        drop_packed(self)
        return super()._apply(fn, recurse)

    def packed_for_cpu(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The packed kernel's (weight, scales_and_zeros), rebuilt when the buffers it came from changed."""
        key = tuple(t.data_ptr() for t in (self.qweight, self.scales, self.zeros))
        if self._cpu_packed is None or self._cpu_packed[0] != key:
            self._cpu_packed = (key, *cpu_int4_packed(self.qweight, self.scales, self.zeros))
        return self._cpu_packed[1], self._cpu_packed[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        needs_grad = torch.is_grad_enabled() and x.requires_grad
        if self.bits == 8:
            out = F.linear(x, self.qweight.to(x.dtype)) * self.scales.to(x.dtype)
        elif x.device.type == "cpu" and x.numel() // x.size(-1) <= PACKED_MAX_ROWS and not needs_grad:
            weight, scales_and_zeros = self.packed_for_cpu()
            rows = x.reshape(-1, x.size(-1)).float()
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, weight, self.group_size, scales_and_zeros)
            out = out[:, : self.out_features].reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        else:
            out = F.linear(x, self.dequantized(x.dtype))
        return out if self.bias is None else out + self.bias.to(x.dtype)


class QuantizedLMHead(QuantizedLinear):
    """The LM head over quantized weights. Logits (no targets) go through the quantized matmul; the
    loss runs ``LMHead``'s own chunked cross-entropy over the dequantized weight (``weight``), so eval
    losses are computed exactly as for the fp32 model."""

    def __init__(self, *args, vocab_size: int, output_mult: float = 1.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.vocab_size, self.output_mult = vocab_size, output_mult

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is not None:
            return LMHead.forward(self, x, targets)  # reads .weight, .vocab_size, .out_features, .output_mult
        logits = super().forward(x * self.output_mult if self.output_mult != 1.0 else x)
        return logits[..., : self.vocab_size] if self.vocab_size < self.out_features else logits


class QuantizedEmbedding(QuantizedWeight):
    """A quantized ``nn.Embedding``: looks up the integer rows and dequantizes only those, in the
    module's compute dtype (fp32, or what ``.to(dtype)`` made it)."""

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if self.bits == 8:
            return dequantize_int8(self.qweight[idx], self.scales[idx], self.compute_dtype)
        return dequantize_int4(
            self.qweight[idx], self.scales[idx], self.zeros[idx], self.group_size, self.compute_dtype
        )


# --- the model-level swap -------------------------------------------------------------------------


def quantize_weights(model: nn.Module, scheme: str, group_size: int = 32) -> tuple[dict[str, torch.Tensor], dict]:
    """A model's weights quantized: (tensors to save, spec). ``tensors`` holds ``<module>.qweight``,
    ``.scales`` (+ ``.zeros``) for every quantized module, ``.bias`` where a linear had one, and every
    other parameter (norms, layers int4 could not group) as fp32, a tied one once; a weight tied to one
    already quantized is named in ``spec["tied"]`` ({alias module: owner module}). ``spec``: scheme,
    group_size, modules ({name: "linear" | "head" | "embedding"}), kept_fp32 (modules int4 could not
    group, with why; an alias of such a module stays tied to it, fp32)."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; allowed: {SCHEMES}")
    if scheme == "int4" and group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, str] = {}
    tied: dict[str, str] = {}
    kept: dict[str, str] = {}
    owner_of: dict[int, str] = {}  # id(weight parameter) -> the module that stored it (quantized or kept)
    covered: set[str] = set()  # parameter names the quantized modules account for
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            continue
        kind = "head" if isinstance(module, LMHead) else "linear" if isinstance(module, nn.Linear) else "embedding"
        owner = owner_of.get(id(module.weight))
        if owner is not None and owner in kept:
            kept[name] = f"tied to {owner}, which is kept fp32"  # the parameter is stored once, as the owner's
            continue
        if owner is not None:
            tied[name] = owner
            modules[name] = kind
            covered.add(f"{name}.weight")
            continue
        owner_of[id(module.weight)] = name
        if scheme == "int4" and module.weight.size(1) % group_size:
            kept[name] = f"{module.weight.size(1)} columns are not a multiple of group size {group_size}"
            continue
        if scheme == "int8":
            parts = dict(zip(("qweight", "scales"), quantize_int8(module.weight)))
        else:
            parts = dict(zip(STORED, quantize_int4(module.weight, group_size)))
        tensors.update({f"{name}.{key}": t.contiguous() for key, t in parts.items()})
        modules[name] = kind
        covered.add(f"{name}.weight")
    for pname, p in model.named_parameters():
        if pname not in covered:
            tensors[pname] = p.detach().float().contiguous()
    spec = {"scheme": scheme, "group_size": group_size if scheme == "int4" else None, "modules": modules}
    return tensors, {**spec, "tied": tied, "kept_fp32": kept}


def apply_quantized_weights(
    model: nn.Module, tensors: dict[str, torch.Tensor], spec: dict, *, assign: bool = False
) -> nn.Module:
    """Swap ``model``'s modules named in ``spec`` (``quantize_weights``') for quantized ones holding
    ``tensors``, tied aliases reading their owner's integers, and load the other parameters (``assign``:
    in place of the model's own, e.g. meta-device ones; tied fp32 parameters are tied again). In place;
    returns the model. Raises ValueError naming what does not fit."""
    group_size = spec.get("group_size") or 0
    built: dict[str, QuantizedWeight] = {}
    owners = {name: kind for name, kind in spec["modules"].items() if name not in spec["tied"]}
    for name, kind in [*owners.items(), *((n, spec["modules"][n]) for n in spec["tied"])]:
        owner = spec["tied"].get(name)
        try:
            old = model.get_submodule(name)
            if owner is None:
                stored = (tensors[f"{name}.qweight"], tensors[f"{name}.scales"], tensors.get(f"{name}.zeros"))
            else:
                stored, tied_to = (None, None, None), built[owner]
        except (AttributeError, KeyError) as err:
            raise ValueError(f"quantized weights do not fit the model: {err}") from err
        tie = {} if owner is None else {"tied_to": tied_to}
        if kind == "embedding":
            new: QuantizedWeight = QuantizedEmbedding(*stored, group_size, **tie)
        else:
            args = (*stored, old.in_features, tensors.get(f"{name}.bias"), group_size)
            if kind == "head":
                new = QuantizedLMHead(*args, vocab_size=old.vocab_size, output_mult=old.output_mult, **tie)
            else:
                new = QuantizedLinear(*args, **tie)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        built[name] = new
    aliases: dict[str, str] = {}  # a tied fp32 parameter's other names -> its first name
    first: dict[int, str] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[pname] = first[id(p)]
        first.setdefault(id(p), pname)
    quantized_keys = {k for k in tensors if k.rpartition(".")[0] in built}
    rest = {k: v for k, v in tensors.items() if k not in quantized_keys}
    missing, unexpected = model.load_state_dict(rest, strict=False, assign=assign)
    missing = [k for k in missing if k.rpartition(".")[0] not in built and k not in aliases]
    if missing or unexpected:
        raise ValueError(f"quantized weights do not fit the model: missing {missing}, unexpected {unexpected}")
    for alias, name in aliases.items():
        parent, _, leaf = alias.rpartition(".")
        setattr(model.get_submodule(parent), leaf, model.get_parameter(name))
    return model


def build_quantized_model(cfg: ModelConfig, tensors: dict[str, torch.Tensor], spec: dict) -> GPT:
    """The GPT of ``cfg`` holding ``quantize_weights``' output (in eval mode, on the CPU) without ever
    allocating the fp32 model: built on the meta device, its quantized modules swapped in, the other
    parameters assigned from ``tensors`` and the fixed tables (sinusoidal positions, RoPE) rebuilt."""
    with torch.device("meta"):
        model = GPT(cfg)
    apply_quantized_weights(model, tensors, spec, assign=True)
    for name, table in model.fixed_tables().items():
        setattr(model, name, table)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # a table GPT.init_weights builds that this does not: say so rather than compute on garbage
        raise ValueError(f"quantized model has tensors nothing loaded or rebuilt: {left}")
    return model.eval()
