"""Structured pruning of a trained GPT: whole attention heads and MLP hidden units removed, every layer
physically shrunk into a smaller ``ModelConfig`` (not masked).

    calibration batches -> unit_importance -> Importance -> select_units -> PrunePlan
    PrunePlan + model -> prune_model -> the smaller GPT (pruned_config, prune_state_dict)

Importance is the first-order Taylor estimate of the loss change from removing a unit (Michel et al.
2019, "Are Sixteen Heads Really Better than One?"): a gate xi on the unit's output, at 1, has
dL/dxi = <output, dL/doutput>, summed over a sequence's positions, L the sequence's summed token loss
(so a sequence weighs the same whatever batch it is scored in); the score is |that| summed over
sequences. A head's output is its slice of attention's c_proj input, a hidden unit's is its column
of the MLP's c_proj input (after GELU, or SwiGLU's silu(gate) * up), so one backward pass scores both.

Selection is per layer, and every layer keeps the same number of heads and of hidden units: the
model stays one ``ModelConfig`` (n_head, head_size, mlp_hidden), which the KV cache (one tensor over
layers), the FLOPs and memory accounting, the HF exporters and checkpoints all take as given.
Per-layer ranking also needs no cross-layer normalisation of Taylor scores, whose scale differs with
depth. Each layer keeps at least one head (one KV group) and one hidden unit. With grouped-query
attention (n_kv_head < n_head) whole KV groups go (a kv head and the query heads that read it), the
group size staying uniform, as attention needs; a group is scored as one unit, one gate on all its
query heads (|the sum of their <output, dL/doutput>| per sequence, what removing the group changes to
first order), not as the sum of its heads' scores, which would count heads whose effects cancel.
Heads keep their width (head_size = the old head_dim) and n_embd is unchanged, so only the
attention's q/k/v rows, its output projection's columns and the MLP's matrices shrink.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable

import torch

from model.config import ModelConfig
from model.gpt import GPT


@dataclass(frozen=True)
class Importance:
    """Per-layer scores, higher = the loss leans on it more: heads (n_layer, n_head), kv_groups
    (n_layer, n_kv_head: a kv head with the query heads that read it, scored as one unit; = heads without
    GQA), neurons (n_layer, hidden_dim); sequences and tokens: how much calibration data made them."""

    heads: torch.Tensor
    kv_groups: torch.Tensor
    neurons: torch.Tensor
    sequences: int
    tokens: int


@dataclass(frozen=True)
class PrunePlan:
    """What each layer keeps, ascending indices into the unpruned layer; every layer keeps as many
    as the others. kv_heads are the kept KV heads (= heads without GQA)."""

    heads: tuple[tuple[int, ...], ...]
    kv_heads: tuple[tuple[int, ...], ...]
    neurons: tuple[tuple[int, ...], ...]


def unit_importance(model: GPT, batches: Iterable[torch.Tensor]) -> Importance:
    """First-order Taylor importance of every head, KV group and MLP hidden unit of ``model`` over ``batches``
    (each (B, T + 1) token ids: inputs [:, :-1], targets [:, 1:]). The model's parameters and mode
    are left as they were; no parameter gradient is made."""
    cfg = model.cfg
    if cfg.arch != "gpt":
        raise ValueError(f"pruning needs a GPT; this model is arch {cfg.arch!r}")
    blocks = list(model.transformer.h)
    device = next(model.parameters()).device
    group = cfg.n_head // cfg.kv_heads  # query heads per kv head
    heads = torch.zeros(cfg.n_layer, cfg.n_head, dtype=torch.float64)
    kv_groups = torch.zeros(cfg.n_layer, cfg.kv_heads, dtype=torch.float64)
    neurons = torch.zeros(cfg.n_layer, cfg.hidden_dim, dtype=torch.float64)
    captured: dict[tuple[str, int], torch.Tensor] = {}

    def capture(kind: str, layer: int):
        def hook(module, args):
            captured[kind, layer] = args[0]

        return hook

    handles = [b.attn.c_proj.register_forward_pre_hook(capture("attn", i)) for i, b in enumerate(blocks)]
    handles += [b.mlp.c_proj.register_forward_pre_hook(capture("mlp", i)) for i, b in enumerate(blocks)]
    was_training = model.training
    model.eval()  # no dropout: score the function the model computes
    sequences = tokens = 0
    try:
        for batch in batches:
            batch = batch.to(device)
            captured.clear()
            with torch.enable_grad():
                _, loss = model(batch[:, :-1], batch[:, 1:])
                summed = loss * (batch[:, 1:] != -1).sum()  # the model's loss is the batch's mean
                keys = sorted(captured)
                grads = torch.autograd.grad(summed, [captured[k] for k in keys])
            for (kind, layer), grad in zip(keys, grads):
                # <output, dL/doutput> per sequence, summed over positions: (B, width)
                taylor = (captured[kind, layer].detach() * grad).sum(dim=1).double()
                if kind == "attn":
                    taylor = taylor.view(taylor.size(0), cfg.n_head, cfg.head_dim).sum(dim=-1)
                    heads[layer] += taylor.abs().sum(dim=0).cpu()
                    per_group = taylor.view(taylor.size(0), cfg.kv_heads, group).sum(dim=-1)
                    kv_groups[layer] += per_group.abs().sum(dim=0).cpu()
                else:
                    neurons[layer] += taylor.abs().sum(dim=0).cpu()
            sequences += batch.size(0)
            tokens += batch[:, 1:].numel()
    finally:
        for h in handles:
            h.remove()
        captured.clear()
        model.train(was_training)
    if sequences == 0:
        raise ValueError("unit_importance: no calibration batches")
    return Importance(heads, kv_groups, neurons, sequences, tokens)


def units_removed(fraction: float, total: int) -> int:
    """How many of ``total`` units a ``fraction`` in [0, 1) removes: rounded to the nearest, at most
    total - 1 (one always stays)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"a pruning fraction must be in [0, 1), got {fraction}")
    return min(int(fraction * total + 0.5), total - 1)


def _lowest(scores: torch.Tensor, remove: int) -> list[int]:
    """Ascending indices kept after dropping the ``remove`` lowest scores (ties: the lower index goes)."""
    order = torch.argsort(scores, stable=True)
    return sorted(order[remove:].tolist())


def removal_counts(cfg: ModelConfig, heads: float, neurons: float) -> tuple[int, int]:
    """(KV groups, MLP hidden units) each layer loses for fractions ``heads`` and ``neurons`` (groups
    are heads without GQA). ValueError when a fraction is outside [0, 1), or non-zero but removes
    nothing at this size (it would be silently ignored)."""
    group = cfg.n_head // cfg.kv_heads  # query heads per kv head; 1 without GQA
    drop_groups = units_removed(heads, cfg.kv_heads)
    drop_neurons = units_removed(neurons, cfg.hidden_dim)
    unit = "KV groups" if group > 1 else "heads"
    if heads > 0 and drop_groups == 0:
        raise ValueError(
            f"heads fraction {heads} removes none of the {cfg.kv_heads} {unit} per layer (at least one stays); "
            f"the smallest that removes one is {0.5 / cfg.kv_heads:.3g}"
            + (f" (with n_kv_head {cfg.kv_heads}, whole KV groups of {group} query heads go)" if group > 1 else "")
        )
    if neurons > 0 and drop_neurons == 0:
        raise ValueError(
            f"neurons fraction {neurons} removes none of the {cfg.hidden_dim} MLP hidden units per layer; "
            f"the smallest that removes one is {0.5 / cfg.hidden_dim:.3g}"
        )
    return drop_groups, drop_neurons


def select_units(cfg: ModelConfig, importance: Importance, heads: float, neurons: float) -> PrunePlan:
    """The plan removing a ``heads`` fraction of each layer's heads (of its KV groups under GQA) and a
    ``neurons`` fraction of its MLP hidden units, the lowest-scored per layer (``removal_counts``)."""
    drop_groups, drop_neurons = removal_counts(cfg, heads, neurons)
    group = cfg.n_head // cfg.kv_heads
    kept_heads, kept_kv, kept_neurons = [], [], []
    for layer in range(cfg.n_layer):
        kv = _lowest(importance.kv_groups[layer], drop_groups)
        kept_kv.append(tuple(kv))
        kept_heads.append(tuple(g * group + j for g in kv for j in range(group)))
        kept_neurons.append(tuple(_lowest(importance.neurons[layer], drop_neurons)))
    return PrunePlan(tuple(kept_heads), tuple(kept_kv), tuple(kept_neurons))


def pruned_config(cfg: ModelConfig, plan: PrunePlan) -> ModelConfig:
    """The smaller shape: fewer heads of the same width (head_size set), fewer MLP hidden units, the
    same n_embd. The preset name is dropped: the shape is no longer the preset's."""
    return replace(
        cfg,
        preset=None,
        n_head=len(plan.heads[0]),
        n_kv_head=None if cfg.n_kv_head is None else len(plan.kv_heads[0]),
        head_size=cfg.head_dim,
        mlp_hidden=len(plan.neurons[0]),
    )


def _rows(units: tuple[int, ...], width: int, offset: int = 0) -> torch.Tensor:
    """Row indices of ``units`` (each ``width`` rows) in a matrix whose block starts at ``offset``."""
    return torch.tensor([offset + u * width + i for u in units for i in range(width)], dtype=torch.long)


def prune_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig, plan: PrunePlan) -> dict[str, torch.Tensor]:
    """A GPT state dict of shape ``cfg`` sliced to ``pruned_config(cfg, plan)``: c_attn's q, k and v rows
    of the kept heads, attention c_proj's columns, the MLP c_fc rows (SwiGLU: gate and up alike) and
    c_proj columns of the kept units; biases with their rows; everything else as it was."""
    if len(plan.heads) != cfg.n_layer:
        raise ValueError(f"the plan covers {len(plan.heads)} layers, the model has {cfg.n_layer}")
    out = dict(state)
    d, q_dim, kv_dim, hidden = cfg.head_dim, cfg.attn_dim, cfg.kv_heads * cfg.head_dim, cfg.hidden_dim
    for i in range(cfg.n_layer):
        block = f"transformer.h.{i}"
        q = _rows(plan.heads[i], d)
        qkv = torch.cat([q, _rows(plan.kv_heads[i], d, q_dim), _rows(plan.kv_heads[i], d, q_dim + kv_dim)])
        fc = torch.tensor(plan.neurons[i], dtype=torch.long)
        fc_rows = torch.cat([fc, fc + hidden]) if cfg.mlp == "swiglu" else fc  # c_fc is [gate | up]
        for name, rows in ((f"{block}.attn.c_attn", qkv), (f"{block}.mlp.c_fc", fc_rows)):
            for suffix in ("weight", "bias"):
                if f"{name}.{suffix}" in state:
                    out[f"{name}.{suffix}"] = state[f"{name}.{suffix}"][rows].contiguous()
        out[f"{block}.attn.c_proj.weight"] = state[f"{block}.attn.c_proj.weight"][:, q].contiguous()
        out[f"{block}.mlp.c_proj.weight"] = state[f"{block}.mlp.c_proj.weight"][:, fc].contiguous()
    return out


def prune_model(model: GPT, plan: PrunePlan) -> GPT:
    """A new GPT of ``pruned_config(model.cfg, plan)`` holding ``model``'s kept weights (tied weights
    tied, fixed tables rebuilt), in ``model``'s mode, dtype and device; ``model`` is unchanged."""
    cfg = pruned_config(model.cfg, plan)
    param = next(model.parameters())
    with torch.device(param.device):
        pruned = GPT(cfg).to(param.dtype)
    state = prune_state_dict(model.state_dict(), model.cfg, plan)
    pruned.load_state_dict(state)  # strict: every tensor has its new shape, nothing is left over
    return pruned.train(model.training)
