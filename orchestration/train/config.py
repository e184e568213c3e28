"""The ``train:`` section: data, scale-out, batch arithmetic, optimizer, schedule, ZeRO, cadence.

Pure data (no torch, no ray import) so configs load and fail fast anywhere. Checks that need only
this section live in ``__post_init__``; checks that need the data manifest or the model shape run in
``orchestration.train.driver.validate`` before any worker starts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional


@dataclass
class DPConfig:
    """Differentially private training (DP-SGD with Opacus, ``orchestration.train.dp``): every step trains
    on a Poisson sample of the train rows (each row in with probability global_batch_size / rows), each
    row's gradient clipped to max_grad_norm, Gaussian noise of noise_multiplier x max_grad_norm added to
    their sum. Give the noise, or the epsilon to reach at the run's last step (the noise is derived)."""

    enabled: bool = False
    noise_multiplier: Optional[float] = field(default=None, metadata={"min": 0.0})
    target_epsilon: Optional[float] = field(default=None, metadata={"min": 0.0})
    max_grad_norm: float = field(default=1.0, metadata={"min": 0.0})  # per-sample clipping bound (L2)
    delta: float = field(default=1e-5, metadata={"min": 0.0, "max": 1.0})  # must be < 1 / train rows

    def __post_init__(self) -> None:
        if not self.enabled:
            return
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError(
                "train.dp.enabled needs exactly one of train.dp.noise_multiplier and train.dp.target_epsilon "
                f"(the other null); got noise_multiplier={self.noise_multiplier}, "
                f"target_epsilon={self.target_epsilon}"
            )
        if self.max_grad_norm <= 0:
            raise ValueError("train.dp.max_grad_norm must be > 0: it bounds each sample's gradient")
        if self.target_epsilon is not None and self.target_epsilon <= 0:
            raise ValueError("train.dp.target_epsilon must be > 0")
        if self.noise_multiplier is not None and self.noise_multiplier <= 0:
            raise ValueError("train.dp.noise_multiplier must be > 0: without noise epsilon is infinite")
        if not 0 < self.delta < 1:
            raise ValueError(f"train.dp.delta must be in (0, 1), got {self.delta}")


@dataclass
class TrainConfig:
    """How to pretrain: one Ray Train worker per device, DDP (ZeRO stage 0) or DeepSpeed ZeRO inside each."""

    # --- data and outputs
    data: str = "data/shakespeare/manifest.json"  # manifest URI written by `raylm prepare` (local, s3://)
    endpoint_url: Optional[str] = None  # S3-compatible endpoint for s3:// data (MinIO, moto); None: AWS
    run_name: str = "run"  # the run directory is <storage_path>/<run_name>; reused -> resume
    storage_path: str = "runs"  # local path or s3://, gs://, az:// / abfs:// URI (data_pipeline/storage.py)
    # A data mixture's share of every train batch per source ({plays: 0.8, sonnets: 0.2}, normalized);
    # {}: the weights it was prepared with. A resumed run keeps them; a branch may change them (a data schedule)
    mixture_weights: dict[str, float] = field(default_factory=dict)
    mixture_exhausted: Literal["repeat", "stop"] = "repeat"  # a source out of rows: its next epoch, or stop the run

    # --- scale-out
    num_workers: int = field(default=2, metadata={"min": 1})
    # elastic (Ray Train's worker range): after losing nodes the run continues on as few as min_workers
    # and grows back to num_workers when nodes return (checked every resize_check_interval_s); the
    # global batch stays, so global_batch_size must divide by micro_batch_size x every count between
    min_workers: Optional[int] = field(default=None, metadata={"min": 1})
    resize_check_interval_s: float = field(default=60.0, metadata={"min": 1.0})
    use_gpu: bool = False
    cpus_per_worker: float = field(default=1.0, metadata={"min": 0.0})

    # --- batch arithmetic: micro_batch_size x grad_accum_steps x num_workers = global_batch_size
    micro_batch_size: int = field(default=8, metadata={"min": 1})  # sequences per worker per forward
    grad_accum_steps: Optional[int] = field(default=None, metadata={"min": 1})  # None: derived, else 1
    global_batch_size: Optional[int] = field(default=None, metadata={"min": 1})  # None: derived

    # --- length of training: exactly one of the two
    max_steps: Optional[int] = field(default=200, metadata={"min": 1})
    max_tokens: Optional[int] = field(default=None, metadata={"min": 1})  # token budget -> steps

    # --- optimizer (torch AdamW; decay only on matrices) and LR schedule
    lr: float = field(default=1e-3, metadata={"min": 0.0})
    min_lr: float = field(default=1e-4, metadata={"min": 0.0})
    warmup_steps: int = field(default=20, metadata={"min": 0})
    schedule: Literal["cosine", "wsd"] = "cosine"
    decay_fraction: float = field(default=0.2, metadata={"min": 0.0, "max": 1.0})  # wsd: last share of steps
    weight_decay: float = field(default=0.1, metadata={"min": 0.0})
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = field(default=1.0, metadata={"min": 0.0})  # 0 disables clipping

    # --- engine: 0 = torch DDP + autocast (nothing sharded); 1-3 = DeepSpeed ZeRO (optimizer state;
    # + grads; + params sharded over the workers)
    zero_stage: Literal[0, 1, 2, 3] = 1
    offload_optimizer: bool = False  # ZeRO >= 1: optimizer states and step on CPU
    offload_params: bool = False  # ZeRO-3 only: parameters on CPU between uses
    precision: Optional[Literal["fp32", "bf16", "fp16"]] = None  # None: bf16 with use_gpu, else fp32
    # merged into the DeepSpeed config raylm generates (stages 1-3), e.g. {zero_optimization:
    # {stage3_max_live_parameters: 1e8}}; checked against DeepSpeed's own config before workers start.
    # Keys raylm sets from train.* (batch sizes, stage, precision, clipping, offload devices) are refused.
    deepspeed: dict[str, Any] = field(default_factory=dict)
    compile: Optional[bool] = None  # torch.compile each transformer block (the LSTM: whole); None: = use_gpu
    # torch.compile's backend: inductor generates kernels; aot_eager / eager trace without them (to tell a
    # compiler bug from a model one, or compile fast on CPU); cudagraphs replays CUDA graphs
    compile_backend: Literal["inductor", "aot_eager", "eager", "cudagraphs"] = "inductor"
    # recompute activations in the backward instead of keeping them: every block, or every k-th (selective)
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    activation_checkpointing_every: int = field(default=2, metadata={"min": 1})

    # --- cadence (in optimizer steps)
    log_interval: int = field(default=10, metadata={"min": 1})
    eval_interval: int = field(default=100, metadata={"min": 0})  # 0: only at the end
    val_sequences: int = field(default=128, metadata={"min": 1})  # the fixed val set: first rows of the val split
    # at each eval, the bias probe (`raylm eval --suite bias`) on the model in training: bias_score and its CI
    # in metrics.jsonl, its curve in the report (pretraining of a GPT; 224 scored pairs, 0.17 s on the demo
    # model with one thread)
    bias_probe: bool = False
    checkpoint_interval: int = field(default=100, metadata={"min": 0})  # 0: only at the end
    num_to_keep: Optional[int] = field(default=2, metadata={"min": 1})  # None: keep all
    # worker-group failures to absorb, each restarting from the latest checkpoint; -1: forever;
    # None: 3 on a cluster the command joined, 0 on a Ray it started itself
    max_failures: Optional[int] = field(default=None, metadata={"min": -1})
    # how long a run waits, in all, for nodes the autoscaler adds (at start, after a lost node); -1: forever
    scale_up_timeout_s: float = field(default=1800.0, metadata={"min": -1})

    seed: int = 1337
    # experiment trackers fed from rank 0's metrics records (orchestration/train/trackers.py)
    trackers: list[Literal["tensorboard", "mlflow", "wandb"]] = field(default_factory=list)
    dp: DPConfig = field(default_factory=DPConfig)

    def __post_init__(self) -> None:
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if (self.max_steps is None) == (self.max_tokens is None):
            raise ValueError(
                "set exactly one of max_steps and max_tokens (the other to null); "
                f"got max_steps={self.max_steps}, max_tokens={self.max_tokens}"
            )
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must be <= lr ({self.lr})")
        if self.precision is None:
            self.precision = "bf16" if self.use_gpu else "fp32"
        if self.compile is None:
            self.compile = self.use_gpu
        if self.precision == "fp16" and not self.use_gpu:
            raise ValueError(
                "precision 'fp16' is not supported on CPU by DeepSpeed "
                "(\"Type fp16 is not supported on your device\"); use 'bf16' or 'fp32', "
                "or set use_gpu: true"
            )
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(f"offload_params needs zero_stage 3, got zero_stage {self.zero_stage}")
        self.deepspeed = _json_numbers(self.deepspeed)
        if self.deepspeed and self.zero_stage == 0:
            raise ValueError("train.deepspeed configures DeepSpeed, which runs stages 1-3; zero_stage 0 is torch DDP")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage >= 1 (ZeRO owns the optimizer states)")
        self._resolve_batch()
        if self.min_workers is not None:
            self._check_elastic()
        if self.dp.enabled:
            self._check_dp()

    def _check_dp(self) -> None:
        """What DP-SGD (Opacus) cannot run with (each tried on raylm's GPT), and the batch clip it replaces:
        every conflict in one error, so a run with the defaults learns all the keys to change at once."""
        problems = []
        if self.zero_stage != 0:
            problems.append(
                f"train.zero_stage=0 (torch DDP), got {self.zero_stage}: Opacus clips per-sample gradients of "
                "whole parameters, which ZeRO 1-3 shard and reduce inside DeepSpeed"
            )
        if self.precision == "fp16":
            problems.append(
                "train.precision bf16 or fp32, got fp16: the loss scale multiplies the per-sample gradients before "
                "Opacus clips them, so the clipping bound would be wrong"
            )
        if self.activation_checkpointing != "none":
            problems.append(
                "train.activation_checkpointing=none: the recomputed forward fires Opacus' activation hooks a "
                "second time and per-sample gradients go missing"
            )
        if self.grad_clip:
            problems.append(
                f"train.grad_clip=0, got {self.grad_clip}: it clips the batch's gradient, while DP-SGD clips each "
                "sample's (train.dp.max_grad_norm)"
            )
        if problems:
            raise ValueError("train.dp.enabled needs " + "; and ".join(problems))

    def _check_elastic(self) -> None:
        if self.min_workers > self.num_workers:
            raise ValueError(f"min_workers ({self.min_workers}) must be <= num_workers ({self.num_workers})")
        per_worker = self.micro_batch_size
        odd = [n for n in range(self.min_workers, self.num_workers) if self.global_batch_size % (per_worker * n)]
        if odd:
            raise ValueError(
                f"global_batch_size ({self.global_batch_size}) must split into micro_batch_size ({per_worker}) x "
                f"every worker count from min_workers to num_workers; it does not for {odd}: change "
                "global_batch_size, micro_batch_size or the range"
            )

    def at_world_size(self, workers: int) -> TrainConfig:
        """This config on ``workers`` workers (an elastic run resized): the same global batch, the
        gradient accumulation re-derived."""
        return dataclasses.replace(self, num_workers=workers, grad_accum_steps=None)

    def _resolve_batch(self) -> None:
        """Fill whichever of grad_accum_steps / global_batch_size is missing; check they agree."""
        per_step = self.micro_batch_size * self.num_workers  # sequences per micro-step, all workers
        # not a field: whether the batch follows the worker count (a resume adopts the run's own)
        self.batch_derived = self.global_batch_size is None and self.grad_accum_steps is None
        if self.global_batch_size is None:
            self.grad_accum_steps = self.grad_accum_steps or 1
            self.global_batch_size = per_step * self.grad_accum_steps
            return
        if self.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size ({self.global_batch_size}) must be a multiple of micro_batch_size x "
                f"num_workers = {self.micro_batch_size} x {self.num_workers} = {per_step}; "
                f"e.g. global_batch_size {per_step * max(1, round(self.global_batch_size / per_step))}"
            )
        accum = self.global_batch_size // per_step
        if self.grad_accum_steps is not None and self.grad_accum_steps != accum:
            raise ValueError(
                f"micro_batch_size x grad_accum_steps x num_workers = {self.micro_batch_size} x "
                f"{self.grad_accum_steps} x {self.num_workers} = {per_step * self.grad_accum_steps} "
                f"!= global_batch_size ({self.global_batch_size}); drop one of the two or make them agree"
            )
        self.grad_accum_steps = accum

    def total_steps(self, seq_len: int) -> int:
        """Optimizer steps in the run: max_steps, or the token budget over tokens per step."""
        if self.max_steps is not None:
            return self.max_steps
        return math.ceil(self.max_tokens / (self.global_batch_size * seq_len))


def _json_numbers(value: Any) -> Any:
    """``value`` with number-like strings made numbers: YAML reads 1e7 as a string, where DeepSpeed's
    JSON-minded config (whose docs write 1e9) wants a number."""
    if isinstance(value, dict):
        return {key: _json_numbers(item) for key, item in value.items()}
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        return int(number) if number.is_integer() else number
    return value
