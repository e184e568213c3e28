"""The ``finetune:`` section: which checkpoint, which task and data, which parameters train.

Pure data (no torch, no ray). The rest of a fine-tuning run (learning rate, steps, batch, ZeRO,
evaluation cadence) is the ordinary ``train:`` section; the model shape comes from the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from model.config import LORA_TARGETS


@dataclass
class FinetuneConfig:
    """Fine-tune a pretrained raylm checkpoint on a task, through Ray Train + DeepSpeed."""

    checkpoint: Optional[str] = None  # a checkpoint_<step> dir or a run dir (its newest checkpoint); local or s3://
    # lm: continued pretraining on a manifest prepared with the checkpoint's tokenizer
    #     (`raylm prepare` with tokenizer.kind=file, tokenizer.path=<the checkpoint dir>);
    # classification: {"text", "label"} rows, a classification head on the last token;
    # sft: {"prompt", "response"} rows, loss on response tokens only.
    task: Literal["lm", "classification", "sft"] = "sft"
    # lm: a manifest URI; classification/sft: a shipped task (shakespeare-genre, shakespeare-play-qa)
    # or a JSONL URI with a {split} placeholder, e.g. s3://bucket/sft_{split}.jsonl
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
