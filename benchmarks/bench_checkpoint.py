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
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

from harness import local_ray, ship_by_value


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


def main(argv: list[str] | None = None) -> dict[int, float]:
    """Runs the benchmark on ``argv`` (the command line when None); returns consolidated / interval
    stall per ZeRO stage."""
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
    args = parser.parse_args(argv)
    if args.smoke:  # smaller defaults; flags given explicitly still win
        parser.set_defaults(preset="tiny", vocab=512, seq_len=32, stages="1", saves=1)
        args = parser.parse_args(argv)

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if args.gpu else "cpu")
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
