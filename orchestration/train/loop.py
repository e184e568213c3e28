"""The one worker loop Ray Train runs on every worker, for every job (pretraining, LSTM, fine-tuning).

setup -> restore -> for step: batch, forward, backward, step, metrics, maybe eval, maybe checkpoint;
early stopping or a stop request (``raylm stop``) ends it after a checkpoint.
What differs between jobs is the ``Task`` (``orchestration.train.task``) that ``make_task(plan, ...)``
builds; the driver hands each worker ``{"plan": WorkerPlan, "make_task": fn}``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from contextlib import nullcontext
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from orchestration.train.plan import WorkerPlan
from orchestration.train.task import EarlyStopping, Task

# Test hook: the last rank kills its own process (a real crash, no Python cleanup) when it reaches
# this step, once per marker file, so failure recovery is exercised end to end.
FAIL_AT_STEP_ENV, FAIL_MARKER_ENV = "RAYLM_TEST_FAIL_AT_STEP", "RAYLM_TEST_FAIL_MARKER"


def worker_loop(loop_config: dict) -> None:
    import ray.data
    import ray.train
    from ray.train import Checkpoint, CheckpointUploadMode

    from orchestration.artifacts import MetricsLog, stop_requested
    from orchestration.checkpoint_format import checkpoint_dir_name
    from orchestration.train.checkpoint import fetched_checkpoint, needs_reshard, restore_checkpoint, save_checkpoint
    from orchestration.train.engine import (
        grad_norm,
        optimizer_state_numel,
        seed_everything,
        worker_device,
        wrap_model,
    )
    from orchestration.train.memory import MemoryPhases, configure_allocator
    from orchestration.train.prometheus import TrainMetricsExporter
    from orchestration.train.reshard import (
        ReshardStats,
        ensure_universal,
        fetched_universal,
        universal_dir_for,
    )
    from orchestration.train.throughput import peak_flops_per_device, throughput
    from orchestration.train.trackers import open_trackers

    plan: WorkerPlan = loop_config["plan"]
    ray.data.DataContext.get_current().enable_progress_bars = False  # one log line per interval instead
    train = plan.train
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    if world_size != train.num_workers:  # an elastic run on fewer (or again more) workers
        train = train.at_world_size(world_size)

    # --- setup: the task's model (seeded: identical on every rank), then DDP or DeepSpeed wraps it
    device = worker_device(train)
    configure_allocator(device, train.zero_stage)
    phases = MemoryPhases(device)  # each phase's peak once, in the first records that follow it
    task: Task = loop_config["make_task"](plan, device, rank, world_size)
    phases.end("build")
    model_cfg = plan.model
    total_steps, tokens_per_step = plan.total_steps, train.global_batch_size * plan.seq_len
    peak = peak_flops_per_device(torch.cuda.get_device_name(device) if device.type == "cuda" else None, train.precision)
    run = plan.run
    metrics_log = MetricsLog(run) if rank == 0 else None
    exporter = TrainMetricsExporter(train.run_name, rank)  # Prometheus, through Ray's metrics agent

    # --- restore: the newer of Ray's latest checkpoint (after a worker failure) and the driver's pick;
    # each rank fetches only the files it loads. ZeRO state sharded by another worker count is
    # converted to DeepSpeed's universal checkpoint once per checkpoint (rank 0, the others wait),
    # which the engine is then told to load, each rank reading its partition's share of it.
    step, reshard = 0, None
    checkpoint = newer_checkpoint(_checkpoint_dir(ray.train.get_checkpoint(), plan), _driver_checkpoint(plan))
    fetched = fetched_checkpoint(checkpoint, rank, world_size) if checkpoint is not None else nullcontext((None, None))
    with fetched as (local_dir, meta):
        if meta and needs_reshard(meta, world_size):
            reshard, universal_at = ReshardStats(), universal_dir_for(checkpoint, run)
            universal = ensure_universal(checkpoint, meta, universal_at, rank, reshard)
        engine = wrap_model(task.model, train, device, load_universal=reshard is not None, privacy=plan.privacy)
        seed_everything(train.seed + 1000 * rank)  # per-rank streams (dropout) after identical init
        if meta:
            shared = (
                fetched_universal(universal_at, universal, engine, rank, world_size, reshard)
                if reshard
                else nullcontext(None)
            )
            with shared as universal_dir:
                restore_checkpoint(
                    engine, local_dir, meta, rank=rank, world_size=world_size, universal_dir=universal_dir
                )
            step = meta["step"]
    phases.end("engine_init")
    if rank == 0:
        metrics_log.truncate_after(step)  # lines past the resume point are about to be redone
        if task.banner or step:
            print(f"[raylm] {task.banner}" + (f"; resumed from {checkpoint.uri} at step {step}" if step else ""))
    start_step, consumed = step, step * train.global_batch_size
    if consumed < plan.start_sequence:
        raise RuntimeError(
            f"checkpoint at step {step} ({consumed} sequences) is older than the data stream's start "
            f"({plan.start_sequence}); restart the driver to resume"
        )
    stopper = EarlyStop(task.early_stopping, metrics_log.records() if rank == 0 else [], step, rank)
    trackers = None
    if rank == 0:
        trackers = open_trackers(
            train.trackers,
            run_dir=plan.run.uri,
            run_name=train.run_name,
            config=plan.config,
            resume_step=step,
            endpoint_url=plan.run.endpoint_url,
        )

    batches = task.train_batches(step)
    take_step = optimizer_step
    if plan.privacy is not None:  # DP-SGD: a Poisson sample per step, clipped per row, noised
        from orchestration.train.dp import dp_optimizer_step as take_step
    fail_at = int(os.environ.get(FAIL_AT_STEP_ENV, "-1"))
    window = Window(device)
    opt_numel: list[int] = []  # per rank, measured once the optimizer has state
    stop_on_request = False  # `raylm stop`: checkpoint at the next log interval, then end
    while step < total_steps and not (stopper.stopped or stop_on_request):
        if step == fail_at and rank == world_size - 1:
            _crash_once(os.environ.get(FAIL_MARKER_ENV))
        measured = None if phases.measured("optimizer_step") else phases  # the first step's phases
        lr = take_step(engine, train, step, total_steps, batches, window, task, device, measured)
        step += 1
        window.steps += 1

        # --- metrics (a collective, so every rank joins), maybe eval, maybe checkpoint
        is_last = step == total_steps
        do_eval = is_last or (train.eval_interval > 0 and step % train.eval_interval == 0)
        do_ckpt = (
            is_last
            or (train.checkpoint_interval > 0 and step % train.checkpoint_interval == 0)
            or (task.checkpoint_every_eval and do_eval)
        )
        if not (do_eval or do_ckpt or step % train.log_interval == 0):
            continue
        # rank 0 looks for a stop request; the loss's all-reduce carries its answer to every rank
        asked = float(rank == 0 and not is_last and stop_requested(run))
        loss_sum, asked = _sum_across_ranks(window.loss_sum / (window.steps * train.grad_accum_steps), asked)
        train_loss = loss_sum / world_size
        stop_on_request = asked > 0
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = window.elapsed()
        opt_numel = opt_numel or _gather(optimizer_state_numel(engine))
        # DP-SGD's batch is a Poisson sample: its loss and tokens are the rows actually drawn (a collective)
        privacy = engine.privacy_record(window) if plan.privacy is not None else {}
        window_tokens = privacy["dp_rows_sampled"] * plan.seq_len if privacy else window.steps * tokens_per_step
        record = {
            "step": step,
            "start_step": start_step,
            "loss": train_loss,
            "lr": lr,
            "grad_norm": grad_norm(engine),
            "tokens": step * tokens_per_step,
            "step_time_s": seconds / window.steps,
            "data_wait_s": window.data_wait_s / window.steps,
            "optimizer_state_numel_per_rank": opt_numel,
            "peak_memory_bytes": phases.peak_bytes(),  # rank 0's, since its process started
            "torch_threads": torch.get_num_threads(),
            **task.record_extra,
            **throughput(
                tokens=window_tokens,
                seconds=seconds,
                flops_per_token=task.flops_per_token,
                num_devices=world_size,
                peak_flops=peak,
            ),
        }
        if task.data_stats is not None:
            record.update(data_read_per_rank(task.data_stats()))
        if task.step_extra is not None:
            record.update(task.step_extra(step))
        record.update(privacy)
        if do_eval and task.val_batches is not None:
            with phases.first("eval"):
                record.update(validation_metrics(engine, task, device))
                if task.eval_extra is not None:
                    engine.eval()
                    with torch.no_grad():
                        record.update(task.eval_extra(engine))
                    engine.train()
            record.update(stopper.after_eval(record["val_loss"], is_last))
        if stop_on_request:
            record["stopped_on_request"] = True
        ckpt_dir = None
        if do_ckpt or stopper.stopped or stop_on_request:
            # The step loop's stall: each rank writes its own engine files locally; only the run's
            # last save (or every save of a task that keeps weights per checkpoint) also writes the
            # consolidated weights. The upload is async.
            t_ckpt = time.perf_counter()
            with phases.first("save"):
                ckpt_dir, bytes_per_rank = save_checkpoint(
                    engine,
                    task.model,
                    step=step,
                    consumed_sequences=step * train.global_batch_size,
                    rank=rank,
                    world_size=world_size,
                    model_config=model_cfg,
                    files=plan.checkpoint_files,
                    meta={**plan.checkpoint_meta, "config": plan.config, "zero_stage": train.zero_stage},
                    consolidate=is_last or stopper.stopped or stop_on_request or task.weight_files is not None,
                    weight_files=task.weight_files,
                )
            record["checkpoint_s"] = max(_gather(time.perf_counter() - t_ckpt))  # the slowest rank's
            record["checkpoint_bytes_per_rank"] = bytes_per_rank
            exporter.record_checkpoint(record["checkpoint_s"])
        record.update(_memory_record(phases))
        if reshard is not None:  # what the resume's reshard cost each rank, in the first record
            record["reshard"] = _reshard_record(reshard)
            reshard = None
        exporter.record(record)
        if rank == 0:
            metrics_log.append(record)
            trackers.log(record)
            if ckpt_dir is not None:
                metrics_log.flush()  # the records this checkpoint covers survive any crash after it
        if ckpt_dir is not None:
            # Async: the upload runs in the background while training continues; Ray registers the
            # checkpoint only once every rank's part has landed.
            ray.train.report(
                record,
                checkpoint=Checkpoint.from_directory(ckpt_dir),
                checkpoint_dir_name=checkpoint_dir_name(step),
                checkpoint_upload_mode=CheckpointUploadMode.ASYNC,
            )
        elif do_eval:  # Tune's schedulers and searchers read val_loss from these reports
            ray.train.report(record)
        window = Window(device)  # after eval/checkpoint, so their time does not count as training
    if rank == 0:
        metrics_log.close()
        records = metrics_log.records()
        evals = [r for r in records if "val_loss" in r]
        trackers.summary(
            {
                "final_step": step,
                "final_loss": records[-1]["loss"] if records else None,
                "final_val_loss": evals[-1]["val_loss"] if evals else None,
                "tokens": step * tokens_per_step,
                **({"dp_epsilon": records[-1]["dp_epsilon"]} if plan.privacy is not None and records else {}),
            }
        )
        trackers.close()


def optimizer_step(
    engine,
    train,
    step: int,
    total_steps: int,
    batches: Iterator[dict],
    window: Window,
    task: Task,
    device,
    phases=None,
) -> float:
    """One optimizer step: set the scheduled lr, then forward/backward ``grad_accum_steps`` micro-batches
    (the engine steps the optimizer on the last one). Losses add up on the device (no host sync); time
    spent waiting for batches goes to ``window.data_wait_s``. With ``phases`` (a MemoryPhases: the
    first step), the peaks of its forwards, backwards and optimizer step are measured. Returns the lr."""
    from orchestration.train.engine import set_lr
    from orchestration.train.schedule import lr_for

    lr = lr_for(train, step, total_steps)
    set_lr(engine.optimizer, lr)
    end = phases.end if phases is not None else lambda phase: None
    for micro in range(train.grad_accum_steps):
        t0 = time.perf_counter()
        batch = next(batches)
        window.data_wait_s += time.perf_counter() - t0
        loss, _, _ = task.forward(engine, batch, device)
        end("forward")
        engine.backward(loss)
        end("backward")
        engine.step()  # an accumulation boundary until the last micro-batch
        end("optimizer_step" if micro == train.grad_accum_steps - 1 else "backward")
        window.loss_sum += loss.detach().float()
    return lr


def validation_metrics(engine, task: Task, device: torch.device) -> dict:
    """Val loss as the exact mean over every loss-bearing item (tokens, or examples) of every rank's
    val micro-batches, plus perplexity or accuracy. The task gives every rank the same number of
    micro-batches (ZeRO-3 gathers weights collectively), padding carrying no loss. A data mixture's
    sources are scored each on its own val set (``val_loss/<source>``); its ``val_loss`` is their mean
    at the run's weights: the loss on the distribution it trains on."""
    if task.val_sources:
        per_source = {name: _val_sums(engine, task, device, name) for name in task.val_sources}
        out = {f"val_loss/{name}": sums[0] / max(sums[1], 1.0) for name, sums in per_source.items()}
        total = sum(task.val_sources.values())
        out["val_loss"] = sum(w * out[f"val_loss/{name}"] for name, w in task.val_sources.items()) / total
        out["val_perplexity"] = math.exp(min(out["val_loss"], 50.0))
        return out
    loss_sum, items, correct = _val_sums(engine, task, device)
    out = {"val_loss": loss_sum / max(items, 1.0)}
    if task.reports_accuracy:
        out["val_accuracy"] = correct / max(items, 1.0)
    else:
        out["val_perplexity"] = math.exp(min(out["val_loss"], 50.0))
    return out


def _val_sums(engine, task: Task, device: torch.device, *source: str) -> tuple[float, float, float]:
    """(loss x items, items, correct) over every rank's val micro-batches (of one mixture ``source``)."""
    engine.eval()
    sums = torch.zeros(3, device=device)  # loss x items, items, correct
    with torch.no_grad():
        for batch in task.val_batches(*source):
            loss, items, correct = task.forward(engine, batch, device)
            sums += torch.stack([loss.float() * items, items, correct])
    engine.train()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    return tuple(float(v) for v in sums)


def data_read_per_rank(stats: dict) -> dict:
    """What each rank's train reader has read from storage (bytes, of which index bytes; rows), the
    compressed bytes of the row groups it trained on (read / needed is the read amplification of the
    data path) and the bytes of the rows it trained on as stored, per rank (a collective)."""
    everyone = _gather(stats)
    return {
        "data_read_bytes_per_rank": [s["bytes_read"] for s in everyone],
        "data_index_bytes_per_rank": [s["index_bytes_read"] for s in everyone],
        "data_needed_bytes_per_rank": [s["needed_bytes"] for s in everyone],
        "data_read_rows_per_rank": [s["rows_read"] for s in everyone],
        "data_trained_bytes_per_rank": [s["row_bytes_yielded"] for s in everyone],
    }


class EarlyStop:
    """Early stopping on val loss; its state is replayed from metrics.jsonl on resume (rank 0's copy,
    broadcast so every rank stops at the same step)."""

    def __init__(self, rule: Optional[EarlyStopping], records: list[dict], step: int, rank: int):
        self.rule, self.stopped = rule, False
        self.best, self.bad = float("inf"), 0
        if self.rule is None:
            return
        for record in records:
            if record.get("step", 0) <= step and "val_loss" in record:
                self._update(record["val_loss"])
        self.best, self.bad = _broadcast((self.best, self.bad), rank)

    def _update(self, val_loss: float) -> None:
        if val_loss < self.best - self.rule.min_delta:
            self.best, self.bad = val_loss, 0
        else:
            self.bad += 1

    def after_eval(self, val_loss: float, is_last: bool) -> dict:
        if self.rule is None:
            return {}
        self._update(val_loss)
        self.stopped = self.rule.patience > 0 and self.bad >= self.rule.patience and not is_last
        return {"best_val_loss": self.best, "evals_without_improvement": self.bad, "stopped_early": self.stopped}


class Window:
    """One log interval: steps, the summed micro-batch losses (on the device), data wait, wall time."""

    def __init__(self, device: torch.device) -> None:
        self.start, self.steps, self.data_wait_s = time.perf_counter(), 0, 0.0
        self.loss_sum = torch.zeros((), device=device)
        self.rows_sampled = 0  # DP-SGD: this rank's Poisson-sampled rows (the batch is not fixed)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def newer_checkpoint(ray_checkpoint, driver_checkpoint):
    """The checkpoint to restore: Ray's when it is at least as new as the driver's pick, else the driver's.

    Ray Train restores the newest checkpoint registered in its snapshot. A checkpoint can be complete on
    storage and never registered (a node lost between the ranks' writes and Ray's report): a re-run
    restores from the driver's pick, as it announced, instead of redoing steps. Within a run, after a
    worker failure, Ray's is the newer one."""
    if ray_checkpoint is None or driver_checkpoint is None:
        return ray_checkpoint or driver_checkpoint
    from orchestration.checkpoint_format import read_checkpoint_meta

    ray_meta, driver_meta = read_checkpoint_meta(ray_checkpoint), read_checkpoint_meta(driver_checkpoint)
    if ray_meta is not None and (driver_meta is None or ray_meta["step"] >= driver_meta["step"]):
        return ray_checkpoint
    return driver_checkpoint


def _driver_checkpoint(plan: WorkerPlan):
    """The complete checkpoint the driver picked (resume or branch) when Ray has none of its own."""
    from orchestration.artifacts import RunDir

    return RunDir.at(plan.resume_uri, plan.run.endpoint_url) if plan.resume_uri else None


def _checkpoint_dir(checkpoint, plan: WorkerPlan):
    """Ray's latest checkpoint of this run (after a worker failure) as a RunDir on its filesystem."""
    if checkpoint is None:
        return None
    import pyarrow.fs as pafs

    from orchestration.artifacts import RunDir

    local = isinstance(checkpoint.filesystem, pafs.LocalFileSystem)
    uri = checkpoint.path if local else f"{plan.run.uri.split('://', 1)[0]}://{checkpoint.path}"
    return RunDir(uri, checkpoint.filesystem, checkpoint.path, plan.run.endpoint_url)


def _memory_record(phases) -> dict:
    """Every rank's peak so far and, once, each phase's peak per rank, the baseline before the model
    was built and the init peak (the build phase's) (``orchestration.train.memory``). A collective:
    every rank calls it at each record."""
    new = phases.take_new()
    per_rank = _gather([phases.peak_bytes(), phases.baseline_bytes, new])
    out = {"peak_memory_bytes_per_rank": [peak for peak, _, _ in per_rank]}
    if new:
        out["memory_phases"] = {phase: [rank_new[phase] for _, _, rank_new in per_rank] for phase in new}
        if "build" in new:  # the model's init: at ZeRO-3 a share of the model, not all of it
            out["baseline_memory_bytes"] = [baseline for _, baseline, _ in per_rank]
            out["init_peak_memory_bytes"] = out["memory_phases"]["build"]
    return out


def _reshard_record(stats) -> dict:
    """Each rank's ``ReshardStats`` as lists by rank (a collective)."""
    per_rank = _gather(dataclasses.asdict(stats))
    return {key: [rank_stats[key] for rank_stats in per_rank] for key in per_rank[0]}


def _sum_across_ranks(value: torch.Tensor, flag: float) -> tuple[float, float]:
    """(value, flag) summed over ranks in one all-reduce and one host sync."""
    both = torch.stack([value.detach().float(), torch.tensor(flag, device=value.device)])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(both)
    total, flags = both.tolist()
    return total, flags


def _gather(value):
    out: list = [value]
    if dist.is_available() and dist.is_initialized():
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, value)
    return out


def _broadcast(obj, rank: int):
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _crash_once(marker: Optional[str]) -> None:
    if marker and not os.path.exists(marker):
        open(marker, "w").close()
        print(f"[raylm] test hook: worker exits hard at this step ({FAIL_AT_STEP_ENV})", flush=True)
        os._exit(1)
