"""Knowledge distillation (``finetune.task: distill``): a student learns next-token prediction from the
data and from a frozen teacher's softened distribution, through the one worker loop.

driver: ``distill_models`` resolves the teacher, shapes the student (``finetune.student``'s keys over
the teacher's shape, fresh weights; or a student checkpoint) and checks that they share the tokenizer
-> workers: ``Distiller`` holds the teacher (eval mode, no gradients, outside the engine, so never in
the optimizer or a checkpoint) and turns each train micro-batch into ``distill_loss`` of the two
models' logits; validation scores the student's plain next-token loss, comparable to any LM's.

The loss is Hinton et al.'s (2015): alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE, both
per-token means over the tokens that carry a target. T^2 keeps the soft term's gradient on the same
scale at any temperature; alpha = 0 is the same student trained from scratch by the same code.

Memory: a train micro-batch holds both models' whole logits, (micro_batch_size, seq_len, vocab) each,
plus the student's logit gradient of that size (pretraining's loss never materialises logits); only the
fp32 softmaxes are chunked. At vocab 50k, 8 x 1024 tokens, that is ~0.8 GB per tensor in bf16.
"""

from __future__ import annotations

import dataclasses
import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F

from model.config import ModelConfig
from orchestration.train.task import lm_forward, to_device

if TYPE_CHECKING:
    from orchestration.config import FinetuneRunConfig


# --- the loss --------------------------------------------------------------------------------------


class _DistillLoss(torch.autograd.Function):
    """``distill_loss`` with its gradient made in the forward pass, a chunk of rows at a time (as
    ``model.loss`` does for the LM head): the fp32 softmaxes of both models live one chunk at a time,
    and backward only scales the stored gradient of the student's logits."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, targets, alpha: float, temperature: float):
        from model.loss import loss_chunk_rows

        vocab = student_logits.size(-1)
        student, teacher = student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab)
        targets = targets.reshape(-1)
        valid = targets != -1
        count = valid.sum().clamp(min=1)  # a tensor: no host sync
        picked_targets = targets.clamp(min=0)
        kl_sum = torch.zeros((), dtype=torch.float32, device=student.device)
        ce_sum = torch.zeros((), dtype=torch.float32, device=student.device)
        grad = torch.empty_like(student) if ctx.needs_input_grad[0] else None
        rows = loss_chunk_rows(vocab)
        soft = temperature != 1.0  # at T = 1 one softmax of each model serves both parts
        for start in range(0, student.size(0), rows):
            s, t = student[start : start + rows].float(), teacher[start : start + rows].float()
            tgt, keep = picked_targets[start : start + rows, None], valid[start : start + rows].float()
            log_q = F.log_softmax(s, dim=-1)
            log_q_soft = F.log_softmax(s / temperature, dim=-1) if soft else log_q
            log_p_soft = F.log_softmax(t / temperature if soft else t, dim=-1)
            p_soft = log_p_soft.exp()
            ce_sum += (-log_q.gather(1, tgt).squeeze(1) * keep).sum()
            kl_sum += (torch.linalg.vecdot(p_soft, log_p_soft.sub_(log_q_soft)) * keep).sum()
            if grad is None:
                continue
            # d/ds of alpha*T^2*KL is alpha*T*(q_T - p_T); of (1-alpha)*CE, (1-alpha)*(q - onehot)
            if soft:
                g = log_q_soft.exp_().sub_(p_soft).mul_(alpha * temperature).add_(log_q.exp_(), alpha=1.0 - alpha)
            else:
                g = log_q.exp_().sub_(p_soft, alpha=alpha)
            g.scatter_add_(1, tgt, torch.full_like(keep, alpha - 1.0)[:, None])
            grad[start : start + rows] = g.mul_((keep / count)[:, None]).to(grad.dtype)
        kl, ce = kl_sum / count, ce_sum / count
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(kl, ce)
        ctx.logits_shape = student_logits.shape
        return alpha * temperature**2 * kl + (1.0 - alpha) * ce, kl, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_kl, _grad_ce):
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss.to(grad.dtype)).reshape(ctx.logits_shape), None, None, None, None


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, KL part, CE part) of student and teacher logits (B, T, vocab) against targets (B, T), -1
    ignored: loss = alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - alpha) * CE(student,
    targets), each a mean over the tokens with a target, in fp32 whatever dtype the logits are. Only
    ``loss`` carries a gradient, to the student's logits alone."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "differ: distillation needs one vocabulary"
        )
    return _DistillLoss.apply(student_logits, teacher_logits.detach(), targets, float(alpha), float(temperature))


# --- the worker side ---------------------------------------------------------------------------------


class Distiller:
    """This worker's frozen teacher and the distillation forward the loop calls for each micro-batch.

    Train micro-batches (the engine in train mode) get ``distill_loss``; validation (eval mode) gets the
    student's plain next-token loss, so val losses compare with a student trained without a teacher. The
    KL and CE parts of the train micro-batches add up on the device until the next evaluation reads
    them (``window_metrics``)."""

    def __init__(self, teacher: torch.nn.Module, *, alpha: float, temperature: float, precision: str, device):
        self.teacher = teacher.to(device).eval().requires_grad_(False)
        self.alpha, self.temperature = alpha, temperature
        # the teacher's matmuls in the student's compute dtype; the loss is fp32 either way
        bf16 = precision == "bf16"
        self.autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16) if bf16 else nullcontext()
        self.sums = torch.zeros(3, device=device)  # KL x tokens, CE x tokens, tokens

    def forward(self, engine, batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not engine.module.training:
            return lm_forward(engine, batch, device)
        tokens = to_device(batch["tokens"], device)
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        if "weights" in batch:  # rows with weight 0 carry no loss, as in lm_forward
            targets = targets.masked_fill(~torch.from_numpy(batch["weights"] > 0).to(device)[:, None], -1)
        with torch.no_grad(), self.autocast:
            teacher_logits, _ = self.teacher(inputs)
        student_logits, _ = engine(inputs)
        loss, kl, ce = distill_loss(
            student_logits, teacher_logits, targets, alpha=self.alpha, temperature=self.temperature
        )
        items = (targets != -1).sum().float()
        self.sums += torch.stack([kl * items, ce * items, items])
        return loss, items, torch.zeros((), device=device)

    def window_metrics(self, engine) -> dict:
        """The train tokens' mean KL and CE parts since the last evaluation, over every rank (a
        collective: the loop calls it at each evaluation on every rank)."""
        import torch.distributed as dist

        sums, self.sums = self.sums, torch.zeros_like(self.sums)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
        kl, ce, items = sums.tolist()
        return {"distill_kl": kl / items, "distill_ce": ce / items} if items else {}


# --- the driver side ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistillModels:
    """What the driver resolved for a distillation: the student's shape and where its weights start
    (``student_uri``; None: fresh, seeded by train.seed), the teacher's checkpoint and shape, and the
    tokenizer spec they share."""

    student: ModelConfig
    student_uri: Optional[str]
    teacher: ModelConfig
    teacher_uri: str
    spec: dict


def student_config(teacher: ModelConfig, student: dict, dropout: float, teacher_uri: str) -> ModelConfig:
    """The teacher's ModelConfig with ``finetune.student``'s keys changed (validated as the model:
    section is: types, ranges, shape rules) and the run's dropout."""
    from orchestration.config import build_dataclass

    values = {**dataclasses.asdict(teacher), "preset": None, **student, "dropout": dropout}
    return build_dataclass(
        ModelConfig, values, f"finetune.student over the teacher's shape ({teacher_uri})", prefix="finetune.student."
    )


def distill_models(cfg: FinetuneRunConfig) -> DistillModels:
    """The teacher (``finetune.teacher``) and student (``finetune.student`` or ``finetune.checkpoint``)
    of ``cfg``, checked to share the tokenizer; a student context no longer than the teacher's."""
    from data_pipeline.tokenizer import load_spec
    from model.flops import count_params
    from orchestration.checkpoint_format import MODEL_CONFIG_FILE, CheckpointError
    from orchestration.config import ConfigError
    from orchestration.evaluate.load import local_checkpoint_copy, resolve_checkpoint
    from orchestration.finetune.driver import checkpoint_model_config

    ft, endpoint_url = cfg.finetune, cfg.train.endpoint_url
    try:
        teacher_uri = resolve_checkpoint(ft.teacher, endpoint_url)
        teacher_local = local_checkpoint_copy(teacher_uri, endpoint_url)
    except CheckpointError as err:
        raise ConfigError(f"finetune.teacher: {err}") from None
    teacher = ModelConfig(**json.loads((Path(teacher_local) / MODEL_CONFIG_FILE).read_text()))
    spec = load_spec(teacher_local)
    if ft.checkpoint:
        student_uri = resolve_checkpoint(ft.checkpoint, endpoint_url)
        student_local = local_checkpoint_copy(student_uri, endpoint_url)
        student = checkpoint_model_config(student_local, cfg)
        student_spec = load_spec(student_local)
        if student_spec["hash"] != spec["hash"]:
            raise ConfigError(
                f"finetune.checkpoint {student_uri} has tokenizer {student_spec['name']!r} "
                f"({student_spec['hash'][:12]}), the teacher {teacher_uri} has {spec['name']!r} "
                f"({spec['hash'][:12]}): distillation compares their "
                "next-token distributions token by token, so the student must use the teacher's tokenizer"
            )
    else:
        student_uri, student = None, student_config(teacher, ft.student, cfg.model.dropout, teacher_uri)
    where = f"finetune.checkpoint {student_uri}" if student_uri else "finetune.student"
    if student.vocab_size != teacher.vocab_size:
        raise ConfigError(
            f"{where}: vocab_size {student.vocab_size} is not the teacher's {teacher.vocab_size} ({teacher_uri}); "
            "the student's vocabulary is the teacher's tokenizer"
        )
    if student.block_size > teacher.block_size:
        raise ConfigError(
            f"{where}: block_size {student.block_size} > the teacher's {teacher.block_size} ({teacher_uri}): "
            f"the teacher has no predictions past its context; set finetune.student.block_size <= {teacher.block_size}"
        )
    print(
        f"[raylm] distilling {teacher_uri} ({count_params(teacher):,} parameters) into "
        + (f"{student_uri}" if student_uri else "a fresh student")
        + f" ({count_params(student):,} parameters: {student.n_layer} layers, width {student.n_embd})",
        flush=True,
    )
    return DistillModels(student, student_uri, teacher, teacher_uri, spec)


def check_same_distillation(meta: dict, cfg: FinetuneRunConfig, uri: str, teacher_uri: str) -> None:
    """A resumed distillation keeps its teacher, student and loss: a checkpoint's run config must name
    the same ones, and its teacher (``teacher_uri``, resolved now) be the same checkpoint: a teacher
    given as a run dir resolves to that run's newest checkpoint, which may have moved on."""
    from orchestration.config import ConfigError

    if meta.get("teacher", teacher_uri) != teacher_uri:
        raise ConfigError(
            f"{uri} was distilled from the teacher {meta['teacher']}, finetune.teacher now resolves to {teacher_uri}: "
            f"resuming continues the same run, so set finetune.teacher={meta['teacher']}, or start over under a "
            "new train.run_name"
        )
    before = meta.get("config", {}).get("finetune", {})
    for key in ("teacher", "student", "checkpoint", "alpha", "temperature"):
        now = getattr(cfg.finetune, key)
        if key in before and before[key] != now:
            raise ConfigError(
                f"{uri} was distilled with finetune.{key}={before[key]!r}, this run has {now!r}: resuming "
                "continues the same run, so keep it, or start over under a new train.run_name"
            )
