"""Training throughput: a bare PyTorch loop vs the raylm path (Ray Train + DeepSpeed, one worker).

Same model, batch, optimizer, precision and data in one run; prints tokens/s of each, the ratio
raylm / bare (target >= 0.95) and MFU on a GPU with a known peak (achieved FLOP/s on CPU).

    python benchmarks/bench_train.py --data runs/data/shakespeare/manifest.json --preset shakespeare
    python benchmarks/bench_train.py --data ... --gpu --precision bf16 --compile --preset gpt2-small
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch


def bare_loop(cfg, rows: np.ndarray, steps: int, warmup: int, device: str) -> float:
    """tokens/s of model + AdamW (same param groups) with no Ray and no DeepSpeed."""
    from model.gpt import GPT
    from orchestration.train.engine import build_optimizer
    from orchestration.train.schedule import lr_for

    train = cfg.train
    torch.manual_seed(train.seed)
    if device == "cuda":  # as raylm's workers do (engine.worker_device): TF32 matmuls for fp32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    model = GPT(cfg.model).to(device)
    optimizer = build_optimizer(model, train)
    step_fn = torch.compile(model) if train.compile else model
    bf16 = train.precision == "bf16"
    mb = train.micro_batch_size
    t0, tokens = None, 0
    for step in range(warmup + steps):
        if step == warmup:
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_for(train, step, warmup + steps)
        for micro in range(train.grad_accum_steps):
            i = (step * train.grad_accum_steps + micro) * mb % (len(rows) - mb)
            batch = torch.from_numpy(rows[i : i + mb].astype(np.int64)).to(device)
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
                _, loss = step_fn(batch[:, :-1], batch[:, 1:])
            (loss / train.grad_accum_steps).backward()
            if step >= warmup:
                tokens += batch[:, :-1].numel()
        if train.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return tokens / (time.perf_counter() - t0)


def raylm_path(cfg, steps: int, warmup: int) -> tuple[float, dict]:
    """Steady-state tokens/s of run_training with one worker (log intervals after warm-up)."""
    from orchestration.train.driver import run_training

    summary = run_training(cfg, resume=False)
    with open(f"{summary['run_dir']}/metrics.jsonl") as f:
        records = [json.loads(line) for line in f if line.strip()]
    steady = [r for r in records if r["step"] > warmup + cfg.train.log_interval]
    tokens = sum(r["tokens_per_s"] * r["step_time_s"] * cfg.train.log_interval for r in steady)
    seconds = sum(r["step_time_s"] * cfg.train.log_interval for r in steady)
    return tokens / seconds, records[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="manifest.json written by `raylm prepare`")
    ap.add_argument("--preset", default="shakespeare")
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--zero-stage", type=int, default=0)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--gpu", action="store_true")
    args = ap.parse_args()

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    import ray

    from data_pipeline.loader import read_manifest, sequence_dataset
    from model.flops import flops_per_token
    from orchestration.config import load_config
    from orchestration.train.throughput import peak_flops_per_device

    manifest = read_manifest(args.data)
    seq_len = manifest["seq_len"]
    storage = tempfile.mkdtemp(prefix="raylm_bench_")
    cfg = load_config(
        None,
        [
            f"model.preset={args.preset}",
            f"model.vocab_size={manifest['tokenizer']['n_vocab']}",
            f"model.block_size={seq_len}",
            f"train.data={args.data}",
            f"train.storage_path={storage}",
            "train.run_name=bench",
            "train.num_workers=1",
            f"train.use_gpu={str(args.gpu).lower()}",
            f"train.micro_batch_size={args.micro_batch_size}",
            f"train.max_steps={args.warmup + args.steps}",
            "train.warmup_steps=2",
            f"train.zero_stage={args.zero_stage}",
            f"train.precision={args.precision}",
            f"train.compile={str(args.compile).lower()}",
            "train.log_interval=5",
            "train.eval_interval=0",
            "train.checkpoint_interval=0",
            f"train.cpus_per_worker={os.cpu_count()}",
        ],
    )
    device = "cuda" if args.gpu else "cpu"
    # The worker gets every core (as the bare loop does); one more logical CPU runs Ray Data's reads.
    ray.init(num_cpus=os.cpu_count() + 1, include_dashboard=False, log_to_driver=True)
    # The bare loop gets the same rows (the run's first sequences), read once into memory.
    n_rows = (args.warmup + args.steps) * args.micro_batch_size
    rows = np.stack(
        [
            np.asarray(r["tokens"])
            for r in sequence_dataset(args.data, "train", seed=cfg.train.seed, num_sequences=n_rows).take(n_rows)
        ]
    )

    bare = bare_loop(cfg, rows, args.steps, args.warmup, device)
    ours, last = raylm_path(cfg, args.steps, args.warmup)
    fpt = flops_per_token(cfg.model, seq_len)
    peak = peak_flops_per_device(torch.cuda.get_device_name() if args.gpu else None, args.precision)
    print(
        f"\nmodel {args.preset} ({sum(p.numel() for p in __import__('model.gpt', fromlist=['GPT']).GPT(cfg.model).parameters()) / 1e6:.2f}M params), "  # noqa: E501
        f"micro batch {args.micro_batch_size} x {seq_len} tokens, {args.precision}, ZeRO-{args.zero_stage}, "
        f"compile={args.compile}, device {device}, torch threads {torch.get_num_threads()}"
    )
    for name, tps in (("bare PyTorch loop", bare), ("raylm (Ray Train + DeepSpeed, 1 worker)", ours)):
        util = f"MFU {tps * fpt / peak:.1%}" if peak else f"{tps * fpt / 1e9:.2f} GFLOP/s"
        print(f"  {name:42s} {tps:12,.0f} tokens/s   {util}")
    print(
        f"  ratio raylm / bare: {ours / bare:.3f} (target >= 0.95); raylm data wait {last['data_wait_s'] * 1e3:.2f} ms/step"  # noqa: E501
    )


if __name__ == "__main__":
    main()
