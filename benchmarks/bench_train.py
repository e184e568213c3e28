"""Training throughput: a bare PyTorch loop vs the raylm path (Ray Train, one worker, DDP or ZeRO).

Same model, optimizer, precision, activation checkpointing, rows (the run's first sequences, in its
order), timed steps and torch thread count in one run; prints tokens/s of each, the ratio raylm /
bare (target >= 0.95), MFU on a GPU with a known peak (achieved FLOP/s on CPU), peak device memory on
a GPU, and per side the thread count (the bare loop is pinned to ``--threads``, the Ray worker gets
``--threads`` CPUs and reports the threads it saw), the compile scope (nanoGPT compiles the whole
model, raylm block by block) and what its precision means. With ``--json``, appends one result line
per stage to that file as it finishes (benchmarks/gpu_suite.sh builds its table from them).

    python benchmarks/bench_train.py --data runs/data/shakespeare/manifest.json --preset shakespeare
    python benchmarks/bench_train.py --data ... --gpu --precision bf16 --compile --preset gpt2-small
    python benchmarks/bench_train.py --smoke    # seconds: the tiny preset, 10 steps, on data it prepares
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from harness import local_ray, smoke_manifest


def timed_from(warmup: int, log_interval: int) -> int:
    """Steps both sides leave out of their timing: raylm's steady state starts after the first whole
    log interval past the warm-up (``raylm_path``), so the bare loop starts its clock there too."""
    return (warmup // log_interval + 1) * log_interval


def bare_loop(cfg, rows: np.ndarray, total_steps: int, start: int, device: str) -> tuple[float, int | None]:
    """(tokens/s over steps ``start``..``total_steps``, peak device bytes) of model + AdamW (same param
    groups) with no Ray and no DeepSpeed: nanoGPT's loop (whole-model compile, autocast, grad
    accumulation, clipping, fused AdamW on CUDA), with raylm's activation checkpointing."""
    from model.gpt import GPT
    from orchestration.train.engine import build_optimizer, set_lr
    from orchestration.train.schedule import lr_for

    train = cfg.train
    torch.manual_seed(train.seed)
    if device == "cuda":  # as raylm's workers do (engine.worker_device): TF32 matmuls for fp32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = GPT(cfg.model).to(device)
    model.set_activation_checkpointing(train.activation_checkpointing, every=train.activation_checkpointing_every)
    optimizer = build_optimizer(model, train)
    step_fn = torch.compile(model) if train.compile else model
    bf16 = train.precision == "bf16"
    mb = train.micro_batch_size
    t0, tokens = None, 0
    for step in range(total_steps):
        if step == start:
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        set_lr(optimizer, lr_for(train, step, total_steps))
        for micro in range(train.grad_accum_steps):
            i = (step * train.grad_accum_steps + micro) * mb  # the rows raylm reads, in its order
            batch = torch.from_numpy(rows[i : i + mb].astype(np.int64)).to(device)
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
                _, loss = step_fn(batch[:, :-1], batch[:, 1:])
            (loss / train.grad_accum_steps).backward()
            if step >= start:
                tokens += batch[:, :-1].numel()
        if train.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak_bytes = torch.cuda.max_memory_allocated() if device == "cuda" else None
    del model, optimizer, step_fn
    if device == "cuda":
        torch.cuda.empty_cache()  # the Ray worker shares this GPU next
    return tokens / seconds, peak_bytes


def raylm_path(cfg, start: int) -> tuple[float, dict, str]:
    """Steady-state tokens/s of run_training with one worker (the log intervals after step ``start``),
    its last metrics record (peak memory, torch threads, data wait) and its run directory."""
    from orchestration.train.driver import run_training

    summary = run_training(cfg, resume=False)
    with open(f"{summary['run_dir']}/metrics.jsonl") as f:
        records = [json.loads(line) for line in f if line.strip()]
    steady = [r for r in records if r["step"] > start]
    tokens = sum(r["tokens_per_s"] * r["step_time_s"] * cfg.train.log_interval for r in steady)
    seconds = sum(r["step_time_s"] * cfg.train.log_interval for r in steady)
    return tokens / seconds, records[-1], summary["run_dir"]


def main(argv: list[str] | None = None) -> list[dict]:
    """Runs the benchmark on ``argv`` (the command line when None); returns one result per stage (as
    ``--json`` writes them, plus the raylm run's directory)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="manifest.json written by `raylm prepare` (--smoke prepares one)")
    ap.add_argument("--preset", default="shakespeare")
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument(
        "--zero-stages", default="0", help="comma list, each measured against the one bare loop: 0 = DDP, 1-3 = ZeRO"
    )
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--activation-checkpointing", default="none", choices=["none", "full", "selective"])
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument(
        "--head-rows",
        type=int,
        default=None,
        help="embedding and head rows when the tokenizer has fewer tokens (model.pad_vocab_to): a large "
        "vocabulary's cost measured with a smaller tokenizer (padding rows get no probability)",
    )
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of both sides")
    ap.add_argument("--json", default=None, help="append one JSON result line per stage to this file")
    ap.add_argument("--storage", default=None, help="where the raylm side's runs go (default: a new temp dir)")
    ap.add_argument(
        "--smoke", action="store_true", help="seconds: the tiny preset, 8 timed steps; without --data, data it prepares"
    )
    args = ap.parse_args(argv)
    if args.smoke:  # smaller defaults; flags given explicitly still win
        ap.set_defaults(preset="tiny", micro_batch_size=4, steps=8, warmup=2, threads=1)
        args = ap.parse_args(argv)
    if args.data is None and not args.smoke:
        ap.error("--data is required (a manifest written by `raylm prepare`), or run with --smoke")
    args.storage = args.storage or tempfile.mkdtemp(prefix="raylm_bench_train_")

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    # The worker gets --threads CPUs (Ray sets its OMP_NUM_THREADS from them); one more logical CPU
    # runs Ray Data's reads. The bare loop runs in this process pinned to the same thread count.
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with local_ray(num_cpus=args.threads + 1, include_dashboard=False, log_to_driver=True):
            if args.data is None:
                args.data = smoke_manifest(Path(args.storage))
            return measure(args)
    finally:
        torch.set_num_threads(threads_before)  # main() may run inside another process (the smoke test)


def measure(args) -> list[dict]:
    from data_pipeline.manifest import read_manifest
    from data_pipeline.stream import sequence_dataset
    from model.flops import flops_per_token
    from model.gpt import GPT
    from orchestration.train.throughput import peak_flops_per_device

    manifest = read_manifest(args.data)
    seq_len = manifest["seq_len"]
    stages = [int(s) for s in args.zero_stages.split(",")]
    cfg = bench_config(args, manifest, stages[0])
    device = "cuda" if args.gpu else "cpu"
    # The bare loop gets the same rows (the run's first sequences, in its order), read once into memory,
    # and times the same steps as the raylm side (timed_from).
    total_steps = args.warmup + args.steps
    start = timed_from(args.warmup, cfg.train.log_interval)
    if start >= total_steps:
        raise SystemExit(f"--steps {args.steps} leaves no log interval past the warm-up: use more steps")
    n_rows = total_steps * cfg.train.grad_accum_steps * args.micro_batch_size
    rows = np.stack(
        [
            np.asarray(r["tokens"])
            for r in sequence_dataset(args.data, "train", seed=cfg.train.seed, num_sequences=n_rows).take(n_rows)
        ]
    )
    bare, bare_peak = bare_loop(cfg, rows, total_steps, start, device)
    fpt = flops_per_token(cfg.model, seq_len)
    peak = peak_flops_per_device(torch.cuda.get_device_name() if args.gpu else None, args.precision)
    n_params = sum(p.numel() for p in GPT(cfg.model).parameters())
    print(
        f"\nmodel {args.preset} ({n_params / 1e6:.2f}M params, vocabulary {cfg.model.vocab_size:,} in "
        f"{cfg.model.padded_vocab_size:,} head rows), micro batch {args.micro_batch_size} x {seq_len} "
        f"tokens, activation checkpointing {args.activation_checkpointing} (both sides), device {device}, "
        f"steps {start + 1}-{total_steps} timed on both sides"
        + (f", MFU against {peak / 1e12:.0f} TFLOP/s" if peak else "")
    )
    bare_how = f"compile {'whole model' if args.compile else 'off'}, {_precision(args.precision, deepspeed=False)}"
    print(
        f"  {'bare PyTorch loop':34s} {_side(bare, bare_peak, fpt, peak)}   torch threads {torch.get_num_threads()}"
        f"   {bare_how}"
    )
    results = []
    for stage in stages:
        ours, last, run = raylm_path(bench_config(args, manifest, stage), start)
        path = "DDP" if stage == 0 else f"ZeRO-{stage}"
        ours_peak = last["peak_memory_bytes"] if args.gpu else None
        precision = _precision(args.precision, deepspeed=stage > 0)
        ours_how = f"compile {'per block' if args.compile else 'off'}, {precision}"
        print(
            f"  {'raylm, ' + path + ', 1 Ray Train worker':34s} {_side(ours, ours_peak, fpt, peak)}   torch threads "
            f"{last['torch_threads']}   {ours_how}   ratio raylm / bare {ours / bare:.3f} (target >= 0.95)   "
            f"data wait {last['data_wait_s'] * 1e3:.2f} ms/step"
        )
        if last["torch_threads"] != torch.get_num_threads():
            print("  WARNING: the two sides ran with different thread counts; the ratio is not a fair comparison")
        result = {
            "preset": args.preset,
            "params": n_params,
            "vocab": cfg.model.vocab_size,
            "head_rows": cfg.model.padded_vocab_size,
            "path": path,
            "precision": args.precision,
            "compile": args.compile,
            "bare_how": bare_how,
            "raylm_how": ours_how,
            "timed_steps": [start + 1, total_steps],
            "seq_len": seq_len,
            "micro_batch_size": args.micro_batch_size,
            "bare_tokens_per_s": bare,
            "raylm_tokens_per_s": ours,
            "ratio": ours / bare,
            "bare_mfu": bare * fpt / peak if peak else None,
            "raylm_mfu": ours * fpt / peak if peak else None,
            "peak_flops": peak,
            "bare_peak_bytes": bare_peak,
            "raylm_peak_bytes": ours_peak,
            "threads": [torch.get_num_threads(), last["torch_threads"]],
            "run_dir": run,
        }
        results.append(result)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(result) + "\n")
    return results


def bench_config(args, manifest: dict, stage: int):
    """The one-worker run the raylm side makes (and whose model and batch the bare loop copies)."""
    from orchestration.config import load_config

    return load_config(
        None,
        [
            f"model.preset={args.preset}",
            f"model.vocab_size={manifest['tokenizer']['n_vocab']}",  # as the driver sets it for the raylm side
            *_head_rows_override(args.head_rows, manifest["tokenizer"]["n_vocab"]),
            f"model.block_size={manifest['seq_len']}",
            f"train.data={args.data}",
            f"train.storage_path={args.storage}",
            f"train.run_name=bench_zero{stage}",
            "train.num_workers=1",
            f"train.use_gpu={str(args.gpu).lower()}",
            f"train.micro_batch_size={args.micro_batch_size}",
            f"train.max_steps={args.warmup + args.steps}",
            "train.warmup_steps=2",
            f"train.zero_stage={stage}",
            f"train.precision={args.precision}",
            f"train.compile={str(args.compile).lower()}",
            f"train.activation_checkpointing={args.activation_checkpointing}",
            "train.log_interval=5",
            "train.eval_interval=0",
            "train.checkpoint_interval=0",
            f"train.cpus_per_worker={args.threads}",
        ],
    )


def _head_rows_override(head_rows: int | None, n_vocab: int) -> list[str]:
    """``model.pad_vocab_to`` giving exactly ``head_rows`` rows to a tokenizer of ``n_vocab`` tokens."""
    if head_rows is None:
        return []
    if head_rows < n_vocab:
        raise SystemExit(f"--head-rows {head_rows} is fewer than the tokenizer's {n_vocab} tokens")
    return [f"model.pad_vocab_to={head_rows}"]


def _precision(precision: str, deepspeed: bool) -> str:
    """What a side's precision means: the bare loop and raylm's DDP autocast the matmuls over fp32
    weights; DeepSpeed's bf16 casts the module and keeps fp32 masters in its optimizer."""
    if precision == "fp32":
        return "fp32"
    return f"{precision} module (DeepSpeed), fp32 masters" if deepspeed else f"{precision} autocast, fp32 weights"


def _side(tokens_per_s: float, peak_bytes, flops_per_token: float, peak_flops) -> str:
    util = (
        f"MFU {tokens_per_s * flops_per_token / peak_flops:5.1%}"
        if peak_flops
        else (f"{tokens_per_s * flops_per_token / 1e9:.2f} GFLOP/s")
    )
    memory = f"   peak {peak_bytes / 2**30:5.1f} GiB" if peak_bytes else ""
    return f"{tokens_per_s:12,.0f} tokens/s   {util}{memory}"


if __name__ == "__main__":
    main()
