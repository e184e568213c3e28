"""The ``finetune:`` section: which checkpoint, which task and data, which parameters train.

Pure data (no torch, no ray). The rest of a fine-tuning run (learning rate, steps, batch, ZeRO,
evaluation cadence) is the ordinary ``train:`` section; the model shape comes from the checkpoint
(task distill: from finetune.student over the teacher's shape, or from a student checkpoint).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Optional

from model.config import LORA_TARGETS, ModelConfig

# finetune.student keys that are not a student's to choose, and why
FIXED_STUDENT_KEYS = {
    "preset": "name the shape keys to change (n_layer, n_head, n_embd, ...) instead of a preset",
    "vocab_size": "the student's vocabulary is the teacher's tokenizer",
    "dropout": "set model.dropout, as for any fine-tune",
}


@dataclass
class FinetuneConfig:
    """Fine-tune a pretrained raylm checkpoint on a task, through Ray Train + DeepSpeed."""

    # a checkpoint_<step> dir or a run dir (its newest checkpoint); local or s3://. Task distill: the
    # student's starting weights (optional: without it the student is finetune.student, freshly initialised)
    checkpoint: Optional[str] = None
    # lm: continued pretraining on a manifest prepared with the checkpoint's tokenizer
    #     (`raylm prepare` with tokenizer.kind=file, tokenizer.path=<the checkpoint dir>);
    # classification: {"text", "label"} rows, a classification head on the last token;
    # sft: {"prompt", "response"} rows, loss on response tokens only;
    # distill: a student learns a manifest's tokens from the data and from finetune.teacher's predictions.
    task: Literal["lm", "classification", "sft", "distill"] = "sft"
    # lm/distill: a manifest URI (distill: made with the teacher's tokenizer, e.g. its pretraining data);
    # classification/sft: a shipped task (shakespeare-genre, shakespeare-play-qa) or a JSONL URI with a
    # {split} placeholder, e.g. s3://bucket/sft_{split}.jsonl
    data: Optional[str] = None
    labels: Optional[list[str]] = None  # classification: class order; None: sorted labels of the train split
    max_per_document: int = field(default=40, metadata={"min": 1})  # shipped tasks: train passages per play
    max_val_examples: int = field(default=256, metadata={"min": 1})  # val rows scored during and after training

    # full: every parameter; partial: freeze the embeddings and/or the first freeze_blocks blocks;
    # lora: freeze the model, train low-rank adapters on lora_targets (and the task head)
    mode: Literal["full", "partial", "lora"] = "full"
    freeze_blocks: int = field(default=0, metadata={"min": 0})
    freeze_embeddings: bool = False  # tied weights: this also freezes the lm head
    lora_rank: int = field(default=8, metadata={"min": 1})
    lora_alpha: float = field(default=16.0, metadata={"min": 0.0})
    lora_dropout: float = field(default=0.0, metadata={"min": 0.0, "max": 0.99})
    lora_targets: list[str] = field(default_factory=lambda: ["attn", "mlp"])  # attn, qkv, attn_out, mlp

    # early stopping on the val loss, checked at every evaluation (train.eval_interval)
    patience: int = field(default=3, metadata={"min": 0})  # evaluations without improvement; 0: never stop early
    min_delta: float = field(default=0.0, metadata={"min": 0.0})  # smaller improvements do not count
    sample_prompts: int = field(default=3, metadata={"min": 0})  # sft: val prompts answered before/after

    # task distill: loss = alpha * temperature^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(data).
    # Memory: each train micro-batch materialises both models' (micro_batch_size, seq_len, vocab) logits.
    teacher: Optional[str] = None  # the frozen teacher: a checkpoint_<step> dir or a run dir
    # the student's shape: ModelConfig keys changed from the teacher's, e.g. {n_layer: 2, n_embd: 64};
    # weights initialised from train.seed. Or finetune.checkpoint: a student checkpoint to start from.
    student: Optional[dict[str, Any]] = None
    # T > 1 softens both distributions in the KL; an LM's next-token distribution is already soft. The
    # defaults T 1, alpha 0.9 were picked over Hinton's T 2, alpha 0.5 on the demo's val windows (held-out
    # windows agreed): configs/finetune_distill.yaml
    temperature: float = field(default=1.0, metadata={"min": 0.01})
    alpha: float = field(default=0.9, metadata={"min": 0.0, "max": 1.0})  # 0: no teacher (from scratch)

    def __post_init__(self) -> None:
        if self.mode != "partial" and (self.freeze_blocks or self.freeze_embeddings):
            raise ValueError(f"freeze_blocks / freeze_embeddings apply to mode 'partial', not {self.mode!r}")
        if self.mode == "partial" and not (self.freeze_blocks or self.freeze_embeddings):
            raise ValueError("mode 'partial' needs freeze_blocks > 0 or freeze_embeddings: true")
        unknown = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if unknown or not self.lora_targets:
            raise ValueError(f"lora_targets {self.lora_targets} must be a non-empty list of {sorted(LORA_TARGETS)}")
        if self.labels is not None and (len(self.labels) < 2 or len(set(self.labels)) != len(self.labels)):
            raise ValueError(f"labels must be at least two distinct names, got {self.labels}")
        self._check_distill()

    def _check_distill(self) -> None:
        if self.task != "distill":
            given = [key for key in ("teacher", "student") if getattr(self, key) is not None]
            if given:
                raise ValueError(f"{given[0]} applies to task 'distill', not {self.task!r}")
            return
        if self.mode != "full":
            raise ValueError(f"task 'distill' trains the whole student: mode must be 'full', not {self.mode!r}")
        if self.student is not None and self.checkpoint is not None:
            raise ValueError(
                "give the student as finetune.student (a fresh model, the teacher's shape with these keys "
                "changed) or as finetune.checkpoint (a student checkpoint to start from), not both"
            )
        known = [f.name for f in fields(ModelConfig)]
        for key in self.student or {}:
            if key in FIXED_STUDENT_KEYS:
                raise ValueError(f"student.{key} cannot be set: {FIXED_STUDENT_KEYS[key]}")
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise ValueError(f"unknown key student.{key}{hint}; allowed: {', '.join(known)}")
