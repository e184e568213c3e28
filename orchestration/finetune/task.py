"""Fine-tuning as a ``Task`` of the one worker loop: pretrained weights in, a task head / adapters /
frozen blocks, the task's loss, which weight files a checkpoint holds, and early stopping on val loss.

The driver (``orchestration.finetune.driver``) puts the job's part in ``WorkerPlan.task``: the
``finetune`` section, the pretrained checkpoint's URI and the task's labels. Every evaluation writes
a checkpoint (Ray keeps the best ``num_to_keep`` by val loss plus the latest), so the best model
survives early stopping and a failed worker resumes where it was. Distillation's student and its
frozen teacher come from ``orchestration.finetune.distill``.
"""

from __future__ import annotations

import torch

from orchestration.checkpoint_format import ADAPTER_FILE, HEAD_FILE, MODEL_FILE
from orchestration.finetune.config import FinetuneConfig
from orchestration.train.plan import WorkerPlan
from orchestration.train.task import EarlyStopping, Task, dataset_batches, lm_forward, to_device


def build_finetune_model(ft: FinetuneConfig, model_cfg, state: dict, num_classes: int, seed: int) -> torch.nn.Module:
    """The pretrained model (weights from ``state``) shaped for ``ft``: a classification head
    on top for that task, LoRA adapters or frozen blocks/embeddings for the mode. Seeded, so the new
    parameters start identical on every rank."""
    from model.build import build_model
    from model.classifier import GPTClassifier
    from model.lora import apply_lora
    from orchestration.train.checkpoint import load_weights
    from orchestration.train.engine import seed_everything

    seed_everything(seed)
    if ft.task == "classification":
        model = GPTClassifier(model_cfg, num_classes)
        base = model.backbone
    else:
        model = base = build_model(model_cfg)
    load_weights(base, state, f"{ft.checkpoint}/{MODEL_FILE}")
    if ft.mode == "lora":
        apply_lora(base, ft.lora_targets, rank=ft.lora_rank, alpha=ft.lora_alpha, dropout=ft.lora_dropout)
    elif ft.mode == "partial":
        frozen = list(base.transformer.h[: ft.freeze_blocks])
        if ft.freeze_embeddings:
            frozen += [m for name, m in base.transformer.items() if name in ("wte", "wpe")]
        for module in frozen:
            module.requires_grad_(False)
    return model


def weight_files(model: torch.nn.Module, task: str, mode: str):
    """Gathered state dict -> files: the plain model (LoRA merged in) in model.safetensors, so eval,
    generate, export and serve read a fine-tuned checkpoint like any other; the adapters alone and
    the classification head beside it."""
    from model.lora import adapter_state_dict, merged_state_dict

    base = model.backbone if task == "classification" else model

    def split(state: dict) -> dict[str, dict]:
        files: dict[str, dict] = {}
        if task == "classification":
            files[HEAD_FILE] = {k: v for k, v in state.items() if k.startswith("head.")}
            state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
        if mode == "lora":
            files[ADAPTER_FILE] = adapter_state_dict(state)
            state = merged_state_dict(base, state)
        files[MODEL_FILE] = state
        return files

    return split


def task_forward(
    engine, task: str, batch: dict, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss of the micro-batch, loss-bearing items in it, correct predictions) for any task.

    Items are tokens for lm/sft (response tokens only for sft) and examples for classification,
    so val losses weighted by them are exact means over the split."""
    if task == "lm":
        return lm_forward(engine, batch, device)
    tokens = to_device(batch["tokens"], device)
    if task == "classification":
        labels = to_device(batch["labels"], device)
        logits, loss = engine(tokens, labels, to_device(batch["lengths"], device))
        correct = (logits.argmax(-1) == labels).sum()
        return loss, torch.tensor(float(len(labels)), device=device), correct.float()
    targets = to_device(batch["targets"], device)
    _, loss = engine(tokens[:, :-1], targets)
    return loss, (targets != -1).sum().float(), torch.zeros((), device=device)


def finetune_task(plan: WorkerPlan, device: torch.device, rank: int, world_size: int) -> Task:
    """The fine-tuning job: the pretrained checkpoint's weights shaped for the task and mode; for
    distillation, the student (from its checkpoint, or freshly initialised as pretraining builds a model)
    and the frozen teacher whose predictions it learns."""
    from safetensors.torch import load as load_safetensors

    from data_pipeline.storage import read_bytes
    from model.flops import flops_per_token

    ft: FinetuneConfig = plan.task["finetune"]
    train, model_cfg = plan.train, plan.model
    if plan.task["init_uri"] is None:  # a fresh distillation student: seeded, at ZeRO-3 partitioned as built
        from orchestration.train.rank_model import build_rank_model

        model = build_rank_model(model_cfg, train.at_world_size(world_size), device)
    else:
        state = load_safetensors(read_bytes(f"{plan.task['init_uri']}/{MODEL_FILE}", train.endpoint_url))
        model = build_finetune_model(ft, model_cfg, state, len(plan.task["labels"] or []), train.seed).to(device)
    # a parameter partitioned at build (ZeRO-3) holds none of its elements here: count its full size
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    total = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    micro, gbs = train.micro_batch_size, train.global_batch_size

    def forward(engine, batch: dict, dev: torch.device):
        return task_forward(engine, ft.task, batch, dev)

    flops, eval_extra = flops_per_token(model_cfg, plan.seq_len), None
    banner = f"fine-tuning ({ft.task}, {ft.mode}): {trainable:,} of {total:,} parameters train"
    if ft.task == "distill":
        from orchestration.evaluate.load import load_checkpoint_model
        from orchestration.finetune.distill import Distiller

        teacher, teacher_cfg, _, _ = load_checkpoint_model(plan.task["teacher_uri"], endpoint_url=train.endpoint_url)
        distiller = Distiller(
            teacher, alpha=ft.alpha, temperature=ft.temperature, precision=train.precision, device=device
        )
        forward, eval_extra = distiller.forward, distiller.window_metrics
        flops += flops_per_token(teacher_cfg, plan.seq_len) / 3  # the teacher's forward: a third of training's
        banner = (
            f"distilling (T={ft.temperature}, alpha={ft.alpha}): a student of {total:,} parameters learns from "
            f"{plan.task['teacher_uri']} ({sum(p.numel() for p in teacher.parameters()):,}, frozen)"
        )
    return Task(
        name=f"finetune-{ft.task}",
        model=model,
        forward=forward,
        train_batches=dataset_batches("train", rank, world_size, micro, gbs),
        val_batches=dataset_batches("val", rank, world_size, micro, gbs, limit=plan.val_batches),
        flops_per_token=flops,
        weight_files=weight_files(model, ft.task, ft.mode),
        checkpoint_every_eval=True,
        early_stopping=EarlyStopping(ft.patience, ft.min_delta),
        reports_accuracy=ft.task == "classification",
        record_extra={"trainable_params": trainable},
        eval_extra=eval_extra,
        banner=banner,
    )
