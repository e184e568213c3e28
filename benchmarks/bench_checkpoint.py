"""Checkpoint stall: seconds the step loop is blocked per save, and bytes written per rank.

Ray Train workers (gloo on CPU, NCCL with ``--gpu``) build a model (default: the gpt2-small preset,
124M parameters), take one AdamW step so the optimizer holds its state, then time ``save_checkpoint``
in the same process, same engine, both ways:

- ``interval``: what every save but the last does now: each rank writes its own engine files (and RNG
  state); nothing is gathered;
- ``consolidated``: the run's last save, and what every save did before this round: the same plus
  each parameter's full fp32 master gathered to rank 0 and written to ``model.safetensors``.

The stall is the slowest rank's wall time of the local write (the upload to storage is async in
``raylm train``); the ratio consolidated / interval is what an interval save no longer pays.

    python benchmarks/bench_checkpoint.py                      # gpt2-small, 2 CPU workers, ZeRO-1 and ZeRO-3
    python benchmarks/bench_checkpoint.py --preset shakespeare --stages 0,1,2,3 --saves 3
    python benchmarks/bench_checkpoint.py --smoke      # seconds: the tiny preset, ZeRO-1, one save of each kind

``--reshard``: what a resume on another worker count costs each rank. Two workers take one step and
write a checkpoint to storage as ``raylm train`` does (``--storage s3://...``, or by default a local
directory read as remote storage is: downloaded through pyarrow, every byte counted); then one and
three workers resume from it
(``orchestration.train.reshard``): the first resize converts it to a universal checkpoint (once, next
to it), the second reuses that. Per rank: bytes downloaded to load its partition, its share (the
universal checkpoint / workers), temp disk at the peak, conversions; and whether every parameter's
fp32 master came back bit for bit and Adam's moments whole (their totals over every partition, to
summation order). Last line ``reshard: conversions C, downloaded/share max R``, C the
most conversions any one checkpoint took over its two resizes (1: converted once, then reused).

    python benchmarks/bench_checkpoint.py --reshard               # gpt2-small, ZeRO-1 and ZeRO-3
    python benchmarks/bench_checkpoint.py --reshard --smoke       # the tiny preset, ZeRO-1, 2 -> 3 only
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import time

import pyarrow.fs as pafs
from harness import local_ray, ship_by_value

from orchestration.artifacts import RunDir


def save_timings(config: dict) -> dict:
    """Ray Train worker: one training step, then ``saves`` timed saves of each kind."""
    import ray.train
    import torch
    import torch.distributed as dist

    from model.config import model_config_from_preset
    from model.gpt import GPT
    from orchestration.train.checkpoint import save_checkpoint
    from orchestration.train.config import TrainConfig
    from orchestration.train.engine import worker_device, wrap_model

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    train = TrainConfig(
        zero_stage=config["stage"],
        num_workers=world,
        micro_batch_size=1,
        grad_accum_steps=1,
        use_gpu=config["gpu"],
        precision="bf16" if config["gpu"] else "fp32",
        compile=False,
    )
    device = worker_device(train)
    model_cfg = model_config_from_preset(config["preset"], vocab_size=config["vocab"], block_size=config["seq_len"])
    torch.manual_seed(0)
    model = GPT(model_cfg)
    params = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them
    engine = wrap_model(model, train, device)
    x = torch.randint(0, config["vocab"], (1, config["seq_len"]), device=device)
    _, loss = engine(x, x)
    engine.backward(loss)
    engine.step()
    timings: dict[str, list] = {"interval": [], "consolidated": []}
    for _ in range(config["saves"]):
        for kind in timings:
            dist.barrier()
            t0 = time.perf_counter()
            path, bytes_per_rank = save_checkpoint(
                engine,
                model,
                step=1,
                consumed_sequences=world,
                rank=rank,
                world_size=world,
                model_config=model_cfg,
                files={},
                meta={"zero_stage": train.zero_stage},
                consolidate=kind == "consolidated",
            )
            seconds = time.perf_counter() - t0
            everyone: list = [None] * world
            dist.all_gather_object(everyone, seconds)
            timings[kind].append({"stall_s": max(everyone), "bytes_per_rank": bytes_per_rank})
            shutil.rmtree(path, ignore_errors=True)
    return {"params": params, **timings}  # rank 0's is the result


def run_stage(args, stage: int) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from orchestration.train.rendezvous import LoopbackStoreConfig

    trainer = TorchTrainer(
        save_timings,
        torch_config=LoopbackStoreConfig(),  # as raylm train: rank 0's store on 127.0.0.1 on a local Ray
        train_loop_config={
            "stage": stage,
            "preset": args.preset,
            "vocab": args.vocab,
            "seq_len": args.seq_len,
            "saves": args.saves,
            "threads": args.threads,
            "gpu": args.gpu,
        },
        scaling_config=ScalingConfig(
            num_workers=args.workers, use_gpu=args.gpu, resources_per_worker={"CPU": args.threads}
        ),
        run_config=RunConfig(name=f"bench_checkpoint_zero{stage}", storage_path=args.storage),
    )
    return trainer.fit().return_value


def reshard_worker(config: dict) -> dict:
    """Ray Train worker. ``save``: one AdamW step, then a checkpoint in storage (each rank's files, the
    marker last). ``resume``: on this worker count, reshard (``ensure_universal``, ``fetched_universal``)
    and restore. Both return the sums of each parameter's fp32 master and Adam moments (rank 0's
    result) and each rank's stats."""
    import dataclasses

    import ray.train
    import torch
    import torch.distributed as dist

    from model.config import model_config_from_preset
    from orchestration.checkpoint_format import CHECKPOINT_META_FILE, UNIVERSAL_DIR
    from orchestration.train.checkpoint import fetched_checkpoint, restore_checkpoint, save_checkpoint
    from orchestration.train.config import TrainConfig
    from orchestration.train.consolidate import full_fp32_param
    from orchestration.train.engine import worker_device, wrap_model
    from orchestration.train.rank_model import build_rank_model
    from orchestration.train.reshard import ReshardStats, ensure_universal, fetched_universal

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    train = TrainConfig(
        zero_stage=config["stage"], num_workers=world, micro_batch_size=1, grad_accum_steps=1, compile=False
    )
    device = worker_device(train)
    model_cfg = model_config_from_preset(config["preset"], vocab_size=config["vocab"], block_size=config["seq_len"])
    torch.manual_seed(0)
    model = build_rank_model(model_cfg, train, device)
    ckpt = storage_dir(config["checkpoint"], config["endpoint"])
    stats = ReshardStats()
    if config["phase"] == "save":
        engine = wrap_model(model, train, device)
        x = torch.randint(0, config["vocab"], (1, config["seq_len"]), device=device)
        _, loss = engine(x, x)
        engine.backward(loss)
        engine.step()
        meta = {"zero_stage": train.zero_stage, "config": {"train": dataclasses.asdict(train)}}
        local, _ = save_checkpoint(
            engine, model, step=1, consumed_sequences=world, rank=rank, world_size=world,
            model_config=model_cfg, files={}, meta=meta, consolidate=False,
        )  # fmt: skip
        marker = os.path.join(local, CHECKPOINT_META_FILE)
        marker_bytes = open(marker, "rb").read() if rank == 0 else None
        if rank == 0:
            os.remove(marker)
        pafs.copy_files(local, ckpt.path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=ckpt.fs)
        shutil.rmtree(local, ignore_errors=True)
        dist.barrier()
        if rank == 0:
            ckpt.write_bytes(CHECKPOINT_META_FILE, marker_bytes)  # complete once every rank's files are in
    else:
        with fetched_checkpoint(ckpt, rank, world) as (local, meta):
            universal_at = ckpt.child(UNIVERSAL_DIR)  # the checkpoint is this run's own
            universal = ensure_universal(ckpt, meta, universal_at, rank, stats)
            engine = wrap_model(model, train, device, load_universal=True)
            with fetched_universal(universal_at, universal, engine, rank, world, stats) as universal_dir:
                restore_checkpoint(engine, local, meta, rank=rank, world_size=world, universal_dir=universal_dir)
    sums = [float(full_fp32_param(param).double().sum()) for param in model.parameters()]  # collective
    moments = torch.zeros(4, dtype=torch.float64)  # Adam's moments over every rank's partition: sum, sum of squares
    for state in engine.optimizer.optimizer.state.values():
        for i, key in enumerate(("exp_avg", "exp_avg_sq")):
            value = state[key].double()
            moments[2 * i : 2 * i + 2] += torch.stack([value.sum(), value.square().sum()])
    dist.all_reduce(moments)
    sums += moments.tolist()
    everyone: list = [None] * world
    dist.all_gather_object(everyone, dataclasses.asdict(stats))
    return {"sums": sums, "stats": everyone}


def run_reshard_phase(args, stage: int, phase: str, workers: int, checkpoint: str, endpoint) -> dict:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from orchestration.train.rendezvous import LoopbackStoreConfig

    cpus = min(args.threads, ray.cluster_resources().get("CPU", 1) / workers)  # 3 workers on a 2-CPU Ray too
    trainer = TorchTrainer(
        reshard_worker,
        torch_config=LoopbackStoreConfig(),
        train_loop_config={
            "phase": phase,
            "stage": stage,
            "checkpoint": checkpoint,
            "endpoint": endpoint,
            "preset": args.preset,
            "vocab": args.vocab,
            "seq_len": args.seq_len,
            "threads": args.threads,
        },
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(name=f"bench_reshard_zero{stage}_{phase}{workers}", storage_path=args.local_storage),
    )
    return trainer.fit().return_value


def storage_dir(uri: str, endpoint) -> RunDir:
    """``uri`` as a RunDir; a local path behind pyarrow's SubTreeFileSystem, which raylm treats as
    remote storage (it downloads through it rather than reading in place), so its bytes are counted
    as an object store's would be. moto, the test suite's S3, fails GB-sized multipart uploads."""
    if "://" in uri:
        return RunDir.at(uri, endpoint)
    return RunDir(uri, pafs.SubTreeFileSystem("/", pafs.LocalFileSystem()), uri.lstrip("/"))


def main_reshard(args) -> float:
    """``--reshard``: prints one line per rank of each resize, then the worst downloaded/share."""
    resizes = (3,) if args.smoke else (1, 3)  # the smoke: one resize, one conversion
    print(f"{args.preset}, 2 workers -> {' and '.join(map(str, resizes))}, {args.threads} CPU per worker, fp32")
    print("| ZeRO | resize | rank | downloaded MB | share MB | downloaded/share | temp peak MB | conversions |")
    print("|---|---|---|---|---|---|---|---|")
    worst, conversions, mb = 0.0, 0, 1e6  # conversions: the most of any one checkpoint
    ship_by_value(__name__)
    storage = args.storage if "://" in args.storage else os.path.abspath(args.storage)
    storage, endpoint = storage.rstrip("/") + "/reshard", args.endpoint_url
    with local_ray(num_cpus=3 * args.threads, log_to_driver=False):
        for stage in (int(s) for s in args.stages.split(",")):
            checkpoint = f"{storage}/zero{stage}/checkpoint_00000001"
            written = storage_dir(checkpoint, endpoint)
            written.fs.delete_dir_contents(written.path, missing_dir_ok=True)  # an earlier run's
            saved = run_reshard_phase(args, stage, "save", 2, checkpoint, endpoint)
            converted = 0
            for workers in resizes:
                resumed = run_reshard_phase(args, stage, "resume", workers, checkpoint, endpoint)
                masters_equal = resumed["sums"][:-4] == saved["sums"][:-4]  # per parameter, bit for bit
                moments_equal = all(  # totals over all partitions: equal but for summation order
                    math.isclose(a, b, rel_tol=1e-12) for a, b in zip(resumed["sums"][-4:], saved["sums"][-4:])
                )
                if not (masters_equal and moments_equal):
                    raise SystemExit(f"ZeRO-{stage} 2 -> {workers}: restored masters or moments differ from the saved")
                for rank, stats in enumerate(resumed["stats"]):
                    share = stats["universal_bytes"] / workers
                    ratio = stats["downloaded_bytes"] / share
                    worst, converted = max(worst, ratio), converted + stats["conversions"]
                    print(
                        f"| {stage} | 2 -> {workers} | {rank} | {stats['downloaded_bytes'] / mb:,.1f} "
                        f"(+{stats['conversion_downloaded_bytes'] / mb:,.1f} converting) | {share / mb:,.1f} "
                        f"| {ratio:.2f} | {stats['temp_peak_bytes'] / mb:,.1f} | {stats['conversions']} |",
                        flush=True,
                    )
            conversions = max(conversions, converted)
            written.fs.delete_dir(written.path)  # what this stage wrote to the store
    print("restored at every resize: fp32 masters bit for bit, Adam moments' totals to 1e-12; share = loaded / workers")
    print(f"reshard: conversions {conversions}, downloaded/share max {worst:.2f}")
    return worst


def main(argv: list[str] | None = None) -> dict[int, float]:
    """Runs the benchmark on ``argv`` (the command line when None); returns consolidated / interval
    stall per ZeRO stage (with ``--reshard``: {0: the worst rank's downloaded / share})."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2-small")
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="CPUs (torch threads) per worker")
    parser.add_argument("--stages", default="1,3", help="comma-separated ZeRO stages (0 = DDP)")
    parser.add_argument("--saves", type=int, default=2, help="timed saves of each kind per stage")
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--storage", default="/tmp/raylm_bench_checkpoint")
    parser.add_argument("--smoke", action="store_true", help="seconds: tiny preset, vocab 512, ZeRO-1, one save each")
    parser.add_argument("--reshard", action="store_true", help="resume on 1 and 3 workers from a 2-worker checkpoint")
    parser.add_argument("--endpoint-url", help="--reshard with --storage s3://... on an S3-compatible endpoint")
    parser.add_argument("--local-storage", default="/tmp/raylm_bench_checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:  # smaller defaults; flags given explicitly still win
        parser.set_defaults(preset="tiny", vocab=512, seq_len=32, stages="1", saves=1)
        args = parser.parse_args(argv)

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if args.gpu else "cpu")
    if args.reshard:
        if args.gpu:
            parser.error("--reshard measures on CPU workers")
        return {0: main_reshard(args)}
    ratios = {}
    print(f"{args.preset}, {args.workers} workers x {args.threads} CPU, seq_len {args.seq_len}, {args.saves} saves")
    print("| ZeRO | params | interval save: stall s | bytes/rank | consolidated save: stall s | bytes/rank | ratio |")
    print("|---|---|---|---|---|---|---|")
    ship_by_value(__name__)
    with local_ray(num_cpus=args.workers * args.threads, log_to_driver=False):
        for stage in (int(s) for s in args.stages.split(",")):
            result = run_stage(args, stage)
            best = {kind: min(result[kind], key=lambda r: r["stall_s"]) for kind in ("interval", "consolidated")}
            mb = {kind: "/".join(f"{b / 1e6:,.0f}M" for b in best[kind]["bytes_per_rank"]) for kind in best}
            ratios[stage] = best["consolidated"]["stall_s"] / best["interval"]["stall_s"]
            print(
                f"| {stage} | {result['params'] / 1e6:.1f}M | {best['interval']['stall_s']:.2f} | {mb['interval']} "
                f"| {best['consolidated']['stall_s']:.2f} | {mb['consolidated']} | {ratios[stage]:.2f} |",
                flush=True,
            )
    print("stall = slowest rank's local write, best of the saves; ratio = consolidated / interval")
    return ratios


if __name__ == "__main__":
    main()
