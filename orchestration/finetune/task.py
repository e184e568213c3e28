"""The per-worker fine-tuning loop: pretrained weights in, a task head / adapters / frozen blocks, the
same DeepSpeed engine, metrics and checkpoints as pretraining, plus early stopping on val loss.

The driver (``orchestration.finetune.driver``) hands each worker a ``plan``: the resolved config, the
pretrained checkpoint's URI and model config, the task's labels and the number of val batches.
Every evaluation writes a checkpoint (Ray keeps the best ``num_to_keep`` by val loss plus the
latest), so the best model survives early stopping and a failed worker resumes where it was.
"""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist

from orchestration.train.checkpoint import MODEL_FILE, checkpoint_dir_name, restore_checkpoint, save_checkpoint
from orchestration.train.loop import (
    FAIL_AT_STEP_ENV,
    FAIL_MARKER_ENV,
    _crash_once,
    _driver_checkpoint,
    _grad_norm,
    _mean_across_ranks,
    _metrics_log,
    _seed_everything,
    _Window,
    optimizer_step,
    worker_device,
    wrap_with_deepspeed,
)
from orchestration.train.throughput import throughput

ADAPTER_FILE, HEAD_FILE, FINETUNE_FILE = "adapter.safetensors", "classifier_head.safetensors", "finetune.json"


def build_finetune_model(cfg, model_cfg, state: dict, num_classes: int) -> torch.nn.Module:
    """The pretrained model (weights from ``state``) shaped for ``cfg.finetune``: a classification head
    on top for that task, LoRA adapters or frozen blocks/embeddings for the mode. Seeded, so the new
    parameters start identical on every rank."""
    from model.classifier import GPTClassifier
    from model.lora import apply_lora
    from model.lstm import build_model
    from orchestration.train.checkpoint import load_weights

    ft = cfg.finetune
    _seed_everything(cfg.train.seed)
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
    tokens = torch.from_numpy(batch["tokens"]).long().to(device)
    if task == "classification":
        labels = torch.from_numpy(batch["labels"]).long().to(device)
        logits, loss = engine(tokens, labels, torch.from_numpy(batch["lengths"]).long().to(device))
        correct = (logits.argmax(-1) == labels).sum()
        return loss, torch.tensor(float(len(labels)), device=device), correct.float()
    targets = torch.from_numpy(batch["targets"]).long().to(device) if task == "sft" else tokens[:, 1:]
    _, loss = engine(tokens[:, :-1], targets)
    return loss, (targets != -1).sum().float(), torch.zeros((), device=device)


def evaluate_task(
    engine,
    val_shard,
    task: str,
    rank: int,
    world_size: int,
    micro_batch_size: int,
    num_batches: int,
    device: torch.device,
) -> dict:
    """Val loss (item-weighted over every rank's first ``num_batches`` micro-batches) and accuracy."""
    from data_pipeline.loader import worker_examples

    engine.eval()
    sums = torch.zeros(3, device=device)  # loss x items, items, correct
    with torch.no_grad():
        batches = worker_examples(val_shard, rank=rank, world_size=world_size, micro_batch_size=micro_batch_size)
        for _, batch in zip(range(num_batches), batches):
            loss, items, correct = task_forward(engine, task, batch, device)
            sums += torch.stack([loss.float() * items, items, correct])
    engine.train()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    loss_sum, items, correct = (float(v) for v in sums)
    out = {"val_loss": loss_sum / max(items, 1.0)}
    if task == "classification":
        out["val_accuracy"] = correct / max(items, 1.0)
    else:
        out["val_perplexity"] = math.exp(min(out["val_loss"], 50.0))
    return out


def _early_stop_state(records: list[dict], step: int, min_delta: float) -> tuple[float, int]:
    """(best val loss, evaluations since it improved) replayed from metrics up to ``step`` (resume)."""
    best, bad = float("inf"), 0
    for record in records:
        if record.get("step", 0) <= step and "val_loss" in record:
            best, bad = (record["val_loss"], 0) if record["val_loss"] < best - min_delta else (best, bad + 1)
    return best, bad


def _broadcast(obj, rank: int):
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def finetune_loop_per_worker(plan: dict) -> None:
    import json

    import ray.data
    import ray.train
    from ray.train import Checkpoint, CheckpointUploadMode
    from safetensors.torch import load as load_safetensors

    from data_pipeline.loader import worker_examples
    from data_pipeline.storage import read_bytes
    from model.config import ModelConfig
    from model.flops import flops_per_token
    from orchestration.config import Config, build_dataclass
    from orchestration.train.prometheus import TrainMetricsExporter

    ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = build_dataclass(Config, plan["config"], source="run plan")
    train, ft = cfg.train, cfg.finetune
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    device = worker_device(train)

    # --- setup: pretrained weights -> task model -> DeepSpeed (trainable parameters only in AdamW)
    model_cfg = ModelConfig(**plan["model_config"])
    state = load_safetensors(read_bytes(f"{plan['init_uri']}/{MODEL_FILE}", train.endpoint_url))
    raw_model = build_finetune_model(cfg, model_cfg, state, len(plan["labels"] or [])).to(device)
    trainable = sum(p.numel() for p in raw_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in raw_model.parameters())
    engine = wrap_with_deepspeed(raw_model, train)
    seq_len, total_steps = plan["seq_len"], plan["total_steps"]
    tokens_per_step = train.global_batch_size * seq_len
    fpt = flops_per_token(model_cfg, seq_len) if model_cfg.arch == "gpt" else 0.0
    metrics_log = _metrics_log(ctx) if rank == 0 else None
    exporter = TrainMetricsExporter(train.run_name, rank)
    _seed_everything(train.seed + 1000 * rank)
    extra_files = {**plan["tokenizer_files"], FINETUNE_FILE: json.dumps(plan["finetune_info"], indent=2).encode()}

    # --- restore (a failed worker, or a re-run of the same run name)
    step = 0
    checkpoint = ray.train.get_checkpoint() or _driver_checkpoint(plan["resume_uri"], train.endpoint_url)
    if checkpoint is not None:
        with checkpoint.as_directory() as local_dir:
            step = restore_checkpoint(engine, local_dir, rank=rank, world_size=world_size)["step"]
    if rank == 0:
        metrics_log.truncate_after(step)
        print(
            f"[raylm] fine-tuning ({ft.task}, {ft.mode}): {trainable:,} of {total:,} parameters train"
            + (f"; resumed at step {step}" if step else ""),
            flush=True,
        )
    best, bad = _broadcast(
        _early_stop_state([json.loads(ln) for ln in metrics_log.lines] if rank == 0 else [], step, ft.min_delta), rank
    )

    batches = iter(
        worker_examples(
            ray.train.get_dataset_shard("train"),
            rank=rank,
            world_size=world_size,
            micro_batch_size=train.micro_batch_size,
            skip_before=step * train.global_batch_size,
        )
    )
    fail_at = int(os.environ.get(FAIL_AT_STEP_ENV, "-1"))
    window = _Window()
    stopped_early = False
    while step < total_steps and not stopped_early:
        if step == fail_at and rank == world_size - 1:
            _crash_once(os.environ.get(FAIL_MARKER_ENV))
        lr, loss_sum = optimizer_step(
            engine,
            train,
            step,
            total_steps,
            batches,
            window,
            lambda batch: task_forward(engine, ft.task, batch, device)[0],
        )
        step += 1
        window.steps += 1

        is_last = step == total_steps
        do_eval = is_last or (train.eval_interval > 0 and step % train.eval_interval == 0)
        if not (do_eval or step % train.log_interval == 0):
            continue
        train_loss = _mean_across_ranks(loss_sum / train.grad_accum_steps)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = window.elapsed()
        record = {
            "step": step,
            "loss": train_loss,
            "lr": lr,
            "grad_norm": _grad_norm(engine),
            "tokens": step * tokens_per_step,
            "step_time_s": seconds / window.steps,
            "data_wait_s": window.data_wait_s / window.steps,
            "trainable_params": trainable,
            **throughput(
                tokens=window.steps * tokens_per_step,
                seconds=seconds,
                flops_per_token=fpt,
                num_devices=world_size,
                peak_flops=None,
            ),
        }
        if do_eval:
            record.update(
                evaluate_task(
                    engine,
                    ray.train.get_dataset_shard("val"),
                    ft.task,
                    rank,
                    world_size,
                    train.micro_batch_size,
                    plan["val_batches"],
                    device,
                )
            )
            best, bad = (record["val_loss"], 0) if record["val_loss"] < best - ft.min_delta else (best, bad + 1)
            stopped_early = ft.patience > 0 and bad >= ft.patience and not is_last
            record.update(best_val_loss=best, evals_without_improvement=bad, stopped_early=stopped_early)
        exporter.record(record)
        if rank == 0:
            metrics_log.append(record)
            metrics_log.flush()
            print(_format(record, total_steps), flush=True)
        if do_eval:
            ckpt_dir = save_checkpoint(
                engine,
                raw_model,
                step=step,
                consumed_sequences=step * train.global_batch_size,
                rank=rank,
                world_size=world_size,
                model_config=model_cfg,
                tokenizer_files=extra_files,
                config=plan["config"],
                weight_files=weight_files(raw_model, ft.task, ft.mode),
            )
            ray.train.report(
                record,
                checkpoint=Checkpoint.from_directory(ckpt_dir),
                checkpoint_dir_name=checkpoint_dir_name(step),
                checkpoint_upload_mode=CheckpointUploadMode.ASYNC,
            )
        else:
            ray.train.report(record)
        window = _Window()


def _format(record: dict, total_steps: int) -> str:
    parts = [
        f"[raylm] step {record['step']}/{total_steps}",
        f"loss {record['loss']:.4f}",
        f"lr {record['lr']:.2e}",
        f"{record['tokens_per_s']:,.0f} tok/s",
    ]
    if "val_loss" in record:
        parts.append(f"val {record['val_loss']:.4f}")
        if "val_accuracy" in record:
            parts.append(f"acc {record['val_accuracy']:.3f}")
        parts.append(f"best {record['best_val_loss']:.4f}")
        if record["stopped_early"]:
            parts.append(f"early stop ({record['evals_without_improvement']} evals without improvement)")
    return " | ".join(parts)
