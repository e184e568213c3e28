"""Per-rank memory of a training step, measured on this machine: what ``raylm model-info --measure``
prints beside its estimate, before anyone rents a cluster to find out.

Each rank is set up as a Ray Train worker sets itself up (``configure_allocator``, ``MemoryPhases``,
``build_rank_model``, ``wrap_model``) and runs the loop's own ``optimizer_step`` twice on
random tokens, so the second step holds everything a steady step holds (Adam's state exists from
the first). No Ray and no data set: ``train.num_workers`` local processes on a process group over
127.0.0.1, gloo on CPU, NCCL with one GPU each. Fresh processes per measurement: each peak starts
from a process that has held nothing else, and DeepSpeed's process group is theirs alone.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass

import numpy as np

from model.config import ModelConfig
from orchestration.train.config import TrainConfig

STEPS = 2


@dataclass
class MeasuredMemory:
    """One measurement: bytes per rank. ``peak`` is the lifetime peak; ``phases`` each phase's peak
    (build, engine_init, forward, backward, optimizer_step); ``baseline`` the process before the model
    (resident set on CPU; 0 on a GPU, whose allocator held nothing yet)."""

    device: str
    peak: list[int]
    baseline: list[int]
    phases: dict[str, list[int]]


def measure_step_memory(
    model_cfg: ModelConfig, train: TrainConfig, seq_len: int, build_only: bool = False
) -> MeasuredMemory:
    """Spawn ``train.num_workers`` ranks (one GPU each when ``train.use_gpu``), train ``STEPS`` steps of
    ``train.global_batch_size`` random sequences of ``seq_len`` tokens, and return each rank's peaks
    (``build_only``: only build the model, the init phase)."""
    import torch
    import torch.multiprocessing as mp

    if seq_len > model_cfg.block_size:
        raise ValueError(f"seq_len {seq_len} is longer than the model's block_size {model_cfg.block_size}")
    if train.use_gpu and torch.cuda.device_count() < train.num_workers:
        raise ValueError(
            f"measuring {train.num_workers} workers on GPUs needs {train.num_workers} visible GPUs, this machine "
            f"has {torch.cuda.device_count()}: measure fewer workers, or on CPU"
        )
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(
        _rank_main,
        args=(_free_port(), model_cfg, train, seq_len, build_only, results),
        nprocs=train.num_workers,
        join=True,
    )
    return results.get()


def _rank_main(
    rank: int, port: int, model_cfg: ModelConfig, train: TrainConfig, seq_len: int, build_only: bool, results
) -> None:
    world = train.num_workers
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ["LOCAL_RANK"] = str(rank)
    if not train.use_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"  # before DeepSpeed is imported, as a CPU worker does
    import torch
    import torch.distributed as dist

    from orchestration.train.engine import wrap_model
    from orchestration.train.loop import Window, optimizer_step
    from orchestration.train.memory import MemoryPhases, configure_allocator
    from orchestration.train.rank_model import build_rank_model
    from orchestration.train.task import Task, lm_forward

    if train.use_gpu:
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))  # the cores shared as workers share them
    dist.init_process_group("nccl" if train.use_gpu else "gloo")
    try:
        configure_allocator(device, train.zero_stage)
        phases = MemoryPhases(device)
        model = build_rank_model(model_cfg, train, device)
        phases.end("build")
        if not build_only:
            engine = wrap_model(model, train, device)
            phases.end("engine_init")
            rng = np.random.default_rng(train.seed + rank)
            shape = (train.micro_batch_size, seq_len + 1)
            batches = ({"tokens": rng.integers(0, model_cfg.vocab_size, shape)} for _ in iter(int, 1))
            task = Task("measure", model, lm_forward, lambda step: batches, None, flops_per_token=0.0)
            for step in range(STEPS):
                optimizer_step(engine, train, step, STEPS, batches, Window(device), task, device, phases)
        everyone = [None] * world
        dist.all_gather_object(everyone, (phases.peak_bytes(), phases.baseline_bytes, phases.take_new()))
        if rank == 0:
            results.put(
                MeasuredMemory(
                    device=torch.cuda.get_device_name(device) if train.use_gpu else "cpu",
                    peak=[peak for peak, _, _ in everyone],
                    baseline=[baseline for _, baseline, _ in everyone],
                    phases={phase: [new[phase] for _, _, new in everyone] for phase in everyone[0][2]},
                )
            )
        dist.barrier()  # no rank tears its group down while a peer still uses it (gloo can abort then)
    finally:
        dist.destroy_process_group()
    # Measured and handed over: leave without the interpreter's teardown, where a library thread still
    # joinable at exit aborted a rank once in a loaded CI run (SIGABRT, "terminate called without an
    # active exception") after its work was done, failing a measurement that had succeeded.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measured_rows(
    model_cfg: ModelConfig, train: TrainConfig, seq_len: int, stages: list[int], offload_optimizer: bool = False
):
    """``raylm model-info --measure``: a header, then one line per ZeRO stage as it is measured, its
    largest rank's peak beside ``estimate_training_memory`` plus that rank's process baseline, and
    each phase's peak. ``train`` gives workers, micro-batch, precision, checkpointing, compile and
    ``train.deepspeed``; the stage and offload are set per row as the estimate sets them."""
    import dataclasses

    from model.flops import estimate_training_memory

    gib = 2**30
    yield (
        f"measured        {train.num_workers} local {'GPU' if train.use_gpu else 'CPU'} ranks, {STEPS} steps of "
        f"{train.micro_batch_size} x {seq_len} random tokens, {train.precision}: each rank's peak over the run "
        "(GPU: allocated; CPU: resident) beside the estimate plus the rank's process before the model"
    )
    phases = ("build", "engine_init", "forward", "backward", "optimizer_step")
    yield (
        f"{'ZeRO':>6}{'estimate':>10}{'measured':>10}{'ratio':>7}{'init est':>10}"
        + "".join(f"{p:>15}" for p in phases)
        + "  (GiB; init est: the estimate of build)"
    )
    for stage in stages:
        offload = offload_optimizer and stage > 0
        run = dataclasses.replace(
            train, zero_stage=stage, offload_optimizer=offload, deepspeed=train.deepspeed if stage else {}
        )
        measured = measure_step_memory(model_cfg, run, seq_len)
        worst = max(range(len(measured.peak)), key=measured.peak.__getitem__)
        estimate = estimate_training_memory(
            model_cfg,
            micro_batch_size=train.micro_batch_size,
            seq_len=seq_len,
            num_workers=train.num_workers,
            precision=train.precision,
            zero_stage=stage,
            offload_optimizer=offload,
            activation_checkpointing=train.activation_checkpointing,
            checkpoint_every=train.activation_checkpointing_every,
        )
        # on CPU the resident set also holds what the estimate puts in CPU memory (offloaded state)
        expected = estimate["total_bytes"] + measured.baseline[worst] + (0 if train.use_gpu else estimate["cpu_bytes"])
        peak, init = measured.peak[worst], estimate["init_bytes"] + measured.baseline[worst]
        row = f"{stage:>6}{expected / gib:>10.2f}{peak / gib:>10.2f}{peak / expected:>7.2f}{init / gib:>10.2f}"
        yield row + "".join(f"{max(measured.phases.get(p, [0])) / gib:>15.2f}" for p in phases)
