"""The per-worker pretraining loop that Ray Train runs on every worker.

setup -> restore -> for step: batch, forward, backward, step, metrics, maybe eval, maybe checkpoint.
The driver (``orchestration.train.driver``) validates everything and hands each worker a ``plan``: the
resolved config plus facts it looked up (vocab size, total steps, resume point, tokenizer files).
"""

from __future__ import annotations

import math
import os
import random
import time
from typing import Callable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist

from orchestration.train.checkpoint import checkpoint_dir_name, restore_checkpoint, save_checkpoint
from orchestration.train.prometheus import TrainMetricsExporter
from orchestration.train.schedule import lr_for
from orchestration.train.throughput import MetricsLog, peak_flops_per_device, throughput

# Test hook: the last rank kills its own process (a real crash, no Python cleanup) when it reaches
# this step, once per marker file, so failure recovery is exercised end to end.
FAIL_AT_STEP_ENV, FAIL_MARKER_ENV = "RAYLM_TEST_FAIL_AT_STEP", "RAYLM_TEST_FAIL_MARKER"


def train_loop_per_worker(plan: dict) -> None:
    import ray.data
    import ray.train
    from ray.train import Checkpoint, CheckpointUploadMode

    from orchestration.config import Config, build_dataclass

    ray.data.DataContext.get_current().enable_progress_bars = False  # one log line per interval instead
    cfg = build_dataclass(Config, plan["config"], source="run plan")
    train = cfg.train
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()

    # --- setup: same init on every rank (seeded), then DeepSpeed wraps model + optimizer
    engine, raw_model, model_cfg, device = setup_engine(cfg, plan["vocab_size"])
    seq_len, total_steps = plan["seq_len"], plan["total_steps"]
    tokens_per_step = train.global_batch_size * seq_len
    flops_per_token = _flops_per_token(model_cfg, seq_len)
    peak = peak_flops_per_device(torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    metrics_log = _metrics_log(ctx) if rank == 0 else None
    exporter = TrainMetricsExporter(train.run_name, rank)  # Prometheus, through Ray's metrics agent
    _seed_everything(train.seed + 1000 * rank)  # per-rank streams (dropout) after identical init

    # --- restore: Ray's latest checkpoint (same run, or after a worker failure), else the driver's pick
    step = 0
    checkpoint = ray.train.get_checkpoint() or _driver_checkpoint(plan["resume_uri"], train.endpoint_url)
    if checkpoint is not None:
        with checkpoint.as_directory() as local_dir:
            meta = restore_checkpoint(engine, local_dir, rank=rank, world_size=world_size)
        step = meta["step"]
        if rank == 0:
            print(f"[raylm] resumed from {checkpoint.path} at step {step}", flush=True)
    if rank == 0:
        metrics_log.truncate_after(step)  # lines past the resume point are about to be redone
    start_step, consumed = step, step * train.global_batch_size
    if consumed < plan["start_sequence"]:
        raise RuntimeError(
            f"checkpoint at step {step} ({consumed} sequences) is older than the data "
            f"stream's start ({plan['start_sequence']}); restart the driver to resume"
        )

    batches = _train_batches(ray.train.get_dataset_shard("train"), rank, world_size, train, consumed)
    fail_at = int(os.environ.get(FAIL_AT_STEP_ENV, "-1"))
    window = _Window()
    opt_numel: list[int] = []  # per rank, measured once the optimizer has state

    def lm_loss(batch) -> torch.Tensor:
        tokens = torch.from_numpy(batch).to(device, non_blocking=True)
        return engine(tokens[:, :-1], tokens[:, 1:])[1]

    while step < total_steps:
        if step == fail_at and rank == world_size - 1:
            _crash_once(os.environ.get(FAIL_MARKER_ENV))
        lr, loss_sum = optimizer_step(engine, train, step, total_steps, batches, window, lm_loss)
        step += 1
        window.steps += 1

        # --- metrics (a collective, so every rank joins), maybe eval, maybe checkpoint
        is_last = step == total_steps
        do_eval = is_last or (train.eval_interval > 0 and step % train.eval_interval == 0)
        do_ckpt = is_last or (train.checkpoint_interval > 0 and step % train.checkpoint_interval == 0)
        if not (do_eval or do_ckpt or step % train.log_interval == 0):
            continue
        train_loss = _mean_across_ranks(loss_sum / train.grad_accum_steps)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = window.elapsed()
        record = {
            "step": step,
            "start_step": start_step,
            "loss": train_loss,
            "lr": lr,
            "grad_norm": _grad_norm(engine),
            "tokens": step * tokens_per_step,
            "step_time_s": seconds / window.steps,
            "data_wait_s": window.data_wait_s / window.steps,
            "optimizer_state_numel_per_rank": opt_numel or (opt_numel := _gather(optimizer_state_numel(engine))),
            **throughput(
                tokens=window.steps * tokens_per_step,
                seconds=seconds,
                flops_per_token=flops_per_token,
                num_devices=world_size,
                peak_flops=peak,
            ),
        }
        if do_eval:
            record.update(
                evaluate_loss(
                    engine,
                    ray.train.get_dataset_shard("val"),
                    rank,
                    world_size,
                    train.micro_batch_size,
                    plan["val_batches"],
                    device,
                )
            )
        exporter.record(record)
        if rank == 0:
            metrics_log.append(record)
            metrics_log.flush()
            print("[raylm] " + _format(record, total_steps), flush=True)
        if do_ckpt:
            t_ckpt = time.perf_counter()
            ckpt_dir = save_checkpoint(
                engine,
                raw_model,
                step=step,
                consumed_sequences=step * train.global_batch_size,
                rank=rank,
                world_size=world_size,
                model_config=model_cfg,
                tokenizer_files=plan["tokenizer_files"],
                config=plan["config"],
            )
            exporter.record_checkpoint(time.perf_counter() - t_ckpt)  # local write; the upload is async
            # Async: the upload runs in the background while training continues; Ray registers the
            # checkpoint only once every rank's part has landed.
            ray.train.report(
                record,
                checkpoint=Checkpoint.from_directory(ckpt_dir),
                checkpoint_dir_name=checkpoint_dir_name(step),
                checkpoint_upload_mode=CheckpointUploadMode.ASYNC,
            )
        else:
            ray.train.report(record)
        window = _Window()  # after eval/checkpoint, so their time does not count as training


def optimizer_step(
    engine, train, step: int, total_steps: int, batches: Iterator, window: "_Window", loss_of: Callable
) -> tuple[float, torch.Tensor]:
    """One optimizer step: set the scheduled lr, then forward/backward ``grad_accum_steps`` micro-batches
    (DeepSpeed steps the optimizer on the last one). Returns (lr, the micro-batch losses summed);
    time spent waiting for batches goes to ``window.data_wait_s``."""
    lr = lr_for(train, step, total_steps)
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros(())
    for _ in range(train.grad_accum_steps):
        t0 = time.perf_counter()
        batch = next(batches)
        window.data_wait_s += time.perf_counter() - t0
        loss = loss_of(batch)
        engine.backward(loss)
        engine.step()
        loss_sum = loss_sum.to(loss.device) + loss.detach().float()
    return lr, loss_sum


def setup_engine(cfg, vocab_size: int):
    """Build the model (GPT or LSTM, seeded, so every rank starts identical) and wrap it with DeepSpeed.

    Returns (engine, raw_model, model_cfg, device). ``raw_model`` is the unwrapped module, whose
    parameter names the consolidated checkpoint uses.
    """
    from model.config import with_vocab_size
    from model.lstm import build_model

    train = cfg.train
    device = worker_device(train)
    _seed_everything(train.seed)
    model_cfg = with_vocab_size(cfg.model, vocab_size)
    raw_model = build_model(model_cfg).to(device)  # GPT, or the LSTM baseline (model.arch=lstm)
    return wrap_with_deepspeed(raw_model, train), raw_model, model_cfg, device


def worker_device(train) -> torch.device:
    import ray.train.torch

    return ray.train.torch.get_device() if train.use_gpu else torch.device("cpu")


def wrap_with_deepspeed(raw_model: torch.nn.Module, train):
    """A DeepSpeed engine over ``raw_model`` (compiled first if asked) with AdamW on its trainable parameters."""
    import deepspeed

    from orchestration.train.engine import build_optimizer, deepspeed_config

    model = torch.compile(raw_model) if train.compile else raw_model
    optimizer = build_optimizer(raw_model, train)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(train), dist_init_required=False
    )
    return engine


def evaluate_loss(
    engine, val_shard, rank: int, world_size: int, micro_batch_size: int, num_batches: int, device: torch.device
) -> dict:
    """Mean val loss (and perplexity) over the first ``num_batches`` micro-batches of every rank.

    Every rank runs the same number of forwards (ZeRO-3 gathers weights collectively), so the
    driver sizes ``num_batches`` to what the smallest rank's share of the val split holds.
    """
    from data_pipeline.loader import worker_batches

    engine.eval()
    total = torch.zeros((), device=device)
    with torch.no_grad():
        batches = worker_batches(val_shard, rank=rank, world_size=world_size, micro_batch_size=micro_batch_size)
        for _, batch in zip(range(num_batches), batches):
            tokens = torch.from_numpy(batch).to(device)
            _, loss = engine(tokens[:, :-1], tokens[:, 1:])
            total += loss.float()
    engine.train()
    val_loss = _mean_across_ranks(total / max(num_batches, 1))
    return {"val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 50.0))}


def optimizer_state_numel(engine) -> int:
    """Elements held in this rank's optimizer state tensors (Adam moments; ZeRO's flat partitions).

    Walks DeepSpeed's wrappers down to the torch optimizer that owns ``state``.
    """
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return sum(t.numel() for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0)


def _driver_checkpoint(uri: Optional[str], endpoint_url: Optional[str]):
    """The complete checkpoint the driver found in the run dir when Ray has none of its own."""
    if not uri:
        return None
    from ray.train import Checkpoint

    from data_pipeline.storage import filesystem_for

    fs, path = filesystem_for(uri, endpoint_url)
    return Checkpoint(path, filesystem=fs)


def _train_batches(shard, rank: int, world_size: int, train, consumed: int) -> Iterator[np.ndarray]:
    from data_pipeline.loader import worker_batches

    return iter(
        worker_batches(
            shard, rank=rank, world_size=world_size, micro_batch_size=train.micro_batch_size, skip_before=consumed
        )
    )


class _Window:
    """Accumulates one log interval's steps, data wait and wall time."""

    def __init__(self) -> None:
        self.start, self.steps, self.data_wait_s = time.perf_counter(), 0, 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def _mean_across_ranks(value: torch.Tensor) -> float:
    value = value.detach().float().clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return float(value.item())


def _gather(value: int) -> list[int]:
    out: list = [value]
    if dist.is_available() and dist.is_initialized():
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, value)
    return out


def _grad_norm(engine) -> Optional[float]:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if torch.is_tensor(norm) else norm)


def _flops_per_token(model_cfg, seq_len: int) -> float:
    from model.flops import flops_per_token

    return flops_per_token(model_cfg, seq_len)


def _metrics_log(ctx) -> MetricsLog:
    storage = ctx.get_storage()
    return MetricsLog(storage.storage_filesystem, f"{storage.experiment_fs_path}/metrics.jsonl")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _crash_once(marker: Optional[str]) -> None:
    if marker and not os.path.exists(marker):
        open(marker, "w").close()
        print(f"[raylm] test hook: worker exits hard at this step ({FAIL_AT_STEP_ENV})", flush=True)
        os._exit(1)


def _format(record: dict, total_steps: int) -> str:
    parts = [
        f"step {record['step']}/{total_steps}",
        f"loss {record['loss']:.4f}",
        f"lr {record['lr']:.2e}",
        f"{record['tokens_per_s']:,.0f} tok/s",
        f"wait {record['data_wait_s'] * 1e3:.1f} ms",
    ]
    if record.get("mfu") is not None:
        parts.append(f"mfu {record['mfu']:.1%}")
    else:
        parts.append(f"{record['flops_per_s'] / 1e9:.1f} GFLOP/s")
    if "val_loss" in record:
        parts.append(f"val {record['val_loss']:.4f} (ppl {record['val_perplexity']:.1f})")
    return " | ".join(parts)
