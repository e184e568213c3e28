"""The training engine: torch DDP for ZeRO stage 0 (``orchestration.train.ddp``), DeepSpeed for 1-3.

``wrap_model`` picks it; both get the same AdamW and the same checkpointed / compiled model. We pass
DeepSpeed a plain ``torch.optim.AdamW`` (DeepSpeed's own Adam JIT-compiles a C++ op on first
use, 60-90 s on CPU) and no scheduler: the loop sets the LR itself from ``orchestration.train.schedule``.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from model.flops import zero_buckets
from orchestration.train.config import TrainConfig
from orchestration.train.plan import PrivacyPlan


def deepspeed_config(train: TrainConfig, load_universal: bool = False, hidden_size: int | None = None) -> dict:
    """The DeepSpeed JSON config for ``train`` (batch sizes, ZeRO stage/offload, precision, clipping),
    with ``train.deepspeed`` merged over it; ``load_universal``: the checkpoint to load is a universal
    one (resharding to this worker count).

    DeepSpeed's defaults that synchronise the device every step are off: its throughput timer
    (synchronised, for a number we measure ourselves), bf16's overflow check (per-tensor kernels and a
    host read each step; bf16 has fp32's range), and ``overlap_comm`` with one worker (per-parameter
    hooks and a synchronise per bucket with nothing to overlap). Under bf16, gradients accumulate in
    fp32, as DDP's autocast keeps them, so every stage trains the same numerics. Buckets are sized
    from the model's ``hidden_size`` (``zero_buckets``) rather than DeepSpeed's billion-parameter
    defaults."""
    bf16 = train.precision == "bf16"
    zero: dict = {"stage": train.zero_stage}
    if train.zero_stage >= 1:
        zero.update(overlap_comm=train.use_gpu and train.num_workers > 1, contiguous_gradients=True)
        if hidden_size:
            zero.update(zero_buckets(train.zero_stage, hidden_size))
    if train.zero_stage == 3:
        # Lets save_16bit_model gather the full weights; we gather fp32 ourselves but keep it usable.
        zero.update(stage3_gather_16bit_weights_on_model_save=True)
    if train.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": train.use_gpu}
    if train.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": train.use_gpu}
    config = {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum_steps,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16, "check_grad_overflow": False} if bf16 else {"enabled": False},
        "fp16": {"enabled": train.precision == "fp16"},
        # A torch optimizer with ZeRO-Offload is fine for us (no compiled CPUAdam needed).
        "zero_force_ds_cpu_optimizer": False,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
        "checkpoint": {"load_universal": load_universal},
    }
    if bf16:
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    return _merged(config, train.deepspeed)


# train.deepspeed keys raylm derives from train.* (setting them there would make the two disagree)
DERIVED_DEEPSPEED_KEYS = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.grad_accum_steps",
    "gradient_clipping": "train.grad_clip",
    "zero_optimization.stage": "train.zero_stage",
    "zero_optimization.offload_optimizer.device": "train.offload_optimizer",
    "zero_optimization.offload_param.device": "train.offload_params",
    "bf16.enabled": "train.precision",
    "fp16.enabled": "train.precision",
    "checkpoint.load_universal": "nothing: raylm sets it when a checkpoint is resharded",
}


def check_deepspeed_passthrough(train: TrainConfig) -> None:
    """Raises ValueError naming the key when ``train.deepspeed`` sets a key raylm derives, a key
    DeepSpeed would ignore (a typo), or a value DeepSpeed's own config model refuses. Imports
    DeepSpeed (a few seconds) only when ``train.deepspeed`` is set."""
    if not train.deepspeed:
        return
    for dotted, source in DERIVED_DEEPSPEED_KEYS.items():
        node = train.deepspeed
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is not None:
            raise ValueError(f"train.deepspeed.{dotted} is derived from {source}; set that instead")
    config = _KeysRead(deepspeed_config(train))
    config["train_batch_size"] = train.micro_batch_size * train.grad_accum_steps  # DeepSpeed checks one rank here
    import_deepspeed()
    from deepspeed.runtime.config import DeepSpeedConfig

    try:
        DeepSpeedConfig(config)
    except Exception as err:  # pydantic's ValidationError or DeepSpeed's own checks
        said = " ".join(line.strip() for line in str(err).splitlines() if "For further information" not in line)
        raise ValueError(f"train.deepspeed: DeepSpeed refuses the merged config: {said}") from None
    unread = sorted(set(train.deepspeed) - config.read)
    if unread:
        raise ValueError(f"train.deepspeed.{unread[0]} is not a key DeepSpeed reads (it would be ignored)")


class _KeysRead(dict):
    """A dict that remembers which of its keys were looked up (DeepSpeed ignores top-level keys it does
    not know, so a key it never reads is a typo)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.read: set[str] = set()

    def get(self, key, *default):
        self.read.add(key)
        return super().get(key, *default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)

    def pop(self, key, *default):
        self.read.add(key)
        return super().pop(key, *default)


def _merged(base: dict, extra: dict) -> dict:
    """``base`` with ``extra`` laid over it, mappings merged key by key."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices (embeddings, linear weights; dim >= 2), none on biases/norms; under
    μP the hidden matrices apart, with ``lr_scale`` 1/width_mult (``model.mup``). Every group carries its
    ``lr_scale``: the step's LR is the schedule's times it (``loop.optimizer_step``).

    Tied weights appear once (``named_parameters`` de-duplicates shared tensors).
    """
    from model.gpt import GPT
    from model.mup import lr_scale

    cfg = next((m.cfg for m in model.modules() if isinstance(m, GPT)), None)
    # a parameter partitioned at birth (ZeRO-3's zero.Init) is an empty 1-D tensor; ds_shape is its own
    groups: dict[tuple[bool, float], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            decay = len(getattr(p, "ds_shape", p.shape)) >= 2
            groups.setdefault((decay, lr_scale(cfg, name) if cfg else 1.0), []).append(p)
    groups.setdefault((True, 1.0), [])  # group 0: decay at the schedule's LR, even when empty (LoRA's biases)
    return [
        {"params": params, "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale}
        for (decay, scale), params in sorted(groups.items(), key=lambda item: (not item[0][0], item[0][1] != 1.0))
    ]


def set_lr(optimizer, lr: float) -> None:
    """Every group of a ``param_groups`` optimizer (or an engine's) at ``lr`` times its ``lr_scale``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]


def build_optimizer(model: torch.nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    """torch AdamW over ``param_groups``; fused on CUDA (one kernel for the whole update)."""
    fused = train.use_gpu and torch.cuda.is_available() and not train.offload_optimizer
    return torch.optim.AdamW(
        param_groups(model, train.weight_decay),
        lr=train.lr,
        betas=tuple(train.betas),
        weight_decay=train.weight_decay,
        fused=fused or None,
    )


def worker_device(train: TrainConfig) -> torch.device:
    """The device Ray Train gave this worker (CUDA), or the CPU. On CUDA, fp32 matmuls run as TF32
    (the peak MFU is measured against) and cuDNN picks its fastest kernels."""
    import ray.train.torch

    if not train.use_gpu:
        return torch.device("cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return ray.train.torch.get_device()


def seed_everything(seed: int) -> None:
    """Python, numpy and torch RNGs: identical init on every rank; per-rank streams after it."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare_model(raw_model: torch.nn.Module, train: TrainConfig) -> torch.nn.Module:
    """Activation checkpointing and compilation as ``train`` asks, in place. A GPT (or a classifier's
    GPT backbone) is compiled block by block, as torchtitan does, so DeepSpeed's gradient hooks fire per
    block and communication overlaps the rest of the backward; parameter names do not change.

    At ZeRO-3 the blocks also become DeepSpeed leaf modules: their parameters are gathered once per
    block by hooks on the block, which run eagerly around the compiled forward, instead of by
    compile-disabled hooks on every Linear, each a graph break. Where that cannot work, compile is
    turned off with one line saying why (``zero3_compile_obstacle``)."""
    gpt = getattr(raw_model, "backbone", raw_model)
    if train.activation_checkpointing != "none":
        if not hasattr(gpt, "set_activation_checkpointing"):
            raise ValueError(f"train.activation_checkpointing needs a transformer; {type(gpt).__name__} has no blocks")
        gpt.set_activation_checkpointing(train.activation_checkpointing, every=train.activation_checkpointing_every)
    if not train.compile:
        return raw_model
    if train.zero_stage == 3:
        obstacle = zero3_compile_obstacle(gpt)
        if obstacle:
            if not dist.is_initialized() or dist.get_rank() == 0:
                print(f"[raylm] train.compile is off: at ZeRO-3 {obstacle}", flush=True)
            return raw_model
        import_deepspeed().utils.set_z3_leaf_modules(gpt, [type(gpt.transformer.h[0])])
    if hasattr(gpt, "compile_blocks"):
        gpt.compile_blocks(backend=train.compile_backend)
        return raw_model
    return torch.compile(raw_model, backend=train.compile_backend)


def zero3_compile_obstacle(gpt: torch.nn.Module) -> str | None:
    """Why ``gpt`` cannot be compiled under ZeRO-3 without graph breaks, or None. Per-block compile
    needs blocks to be leaf modules, and DeepSpeed reduces a leaf module's gradients from its full
    backward hook, which fires before the block's parameter gradients exist when the block's input
    needs no gradient (frozen embeddings, as with LoRA): their gradients would be reduced as zeros."""
    if not hasattr(gpt, "compile_blocks"):
        return (
            f"{type(gpt).__name__} has no transformer blocks to compile one by one, and compiling it whole "
            "breaks its graph at every layer's compile-disabled parameter-gathering hook"
        )
    embeddings = [m for name, m in gpt.transformer.items() if name in ("wte", "wpe")]
    if not any(p.requires_grad for m in embeddings for p in m.parameters()):
        return (
            "each compiled block is a DeepSpeed leaf module, whose gradients are reduced when the "
            "block's input gradient is ready; the embeddings are frozen (LoRA), so the first block's "
            "input has none and its gradients would be reduced before they exist"
        )
    return None


def wrap_model(
    raw_model: torch.nn.Module,
    train: TrainConfig,
    device: torch.device,
    load_universal: bool = False,
    privacy: PrivacyPlan | None = None,
):
    """The engine over ``raw_model`` (checkpointed and compiled as asked) with AdamW on its trainable
    parameters: DDP with autocast at ZeRO stage 0 (nothing to shard), DeepSpeed ZeRO at stages 1-3
    (``load_universal``: it will load a universal checkpoint); with ``privacy`` (a PrivacyPlan, stage 0
    only) Opacus' DP-SGD engine (``orchestration.train.dp``)."""
    if privacy is not None:
        from orchestration.train.dp import DPEngine

        return DPEngine(prepare_model(raw_model, train), build_optimizer(raw_model, train), train, privacy, device)
    if train.zero_stage == 0:
        from orchestration.train.ddp import DDPEngine

        return DDPEngine(prepare_model(raw_model, train), build_optimizer(raw_model, train), train, device)
    deepspeed = import_deepspeed()
    if device.type == "cpu":
        skip_shm_comm_op()
    engine, _, _, _ = deepspeed.initialize(
        model=prepare_model(raw_model, train),
        optimizer=build_optimizer(raw_model, train),
        config=deepspeed_config(train, load_universal, hidden_size=_hidden_size(raw_model)),
        dist_init_required=False,
    )
    return engine


def _hidden_size(raw_model: torch.nn.Module) -> int | None:
    """The model's width (a GPT's, a classifier backbone's, the LSTM's), for bucket sizes."""
    cfg = getattr(getattr(raw_model, "backbone", raw_model), "cfg", None)
    return getattr(cfg, "n_embd", None)


def import_deepspeed():
    """``deepspeed``, imported without the ``import mlflow`` its autotuner module makes at import time
    (1.0 s of every ZeRO worker's start on 2 cores) for autotuning, which raylm never runs. mlflow stays
    importable: the ``mlflow`` tracker imports it itself, before or after."""
    if "deepspeed" in sys.modules or "mlflow" in sys.modules:
        import deepspeed

        return deepspeed
    sys.modules["mlflow"] = None  # `import mlflow` raises ImportError: the autotuner goes without
    try:
        import deepspeed
    finally:
        del sys.modules["mlflow"]
    return deepspeed


def skip_shm_comm_op() -> None:
    """DeepSpeed's CPU comm backend JIT-compiles its shared-memory all-reduce op when it starts (36-52 s
    on 2 cores; once per checkout, torch and ninja) for ``inference_all_reduce`` alone, which training
    never calls: its gradients and ZeRO partitions go through the gloo process group. Marked
    unavailable, the backend falls back to that process group for everything."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def optimizer_state_numel(engine) -> int:
    """Elements held in this rank's optimizer state tensors (Adam moments; ZeRO's flat partitions).

    Walks DeepSpeed's wrappers down to the torch optimizer that owns ``state``.
    """
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return sum(t.numel() for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0)


def grad_norm(engine) -> float | None:
    """The global gradient norm DeepSpeed computed at the last step (None before any)."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if torch.is_tensor(norm) else norm)
