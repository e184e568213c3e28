"""Per-rank peak memory of one ZeRO stage: 2 ranks (processes) on a gloo group, a GPT of ~60M
parameters (fp32 weights ~240 MB, so model state, not the process, dominates), set up as a worker
sets it up (``configure_allocator``, ``MemoryPhases``, ``wrap_model``) and trained 2 steps of one
micro-batch each. Run by test_train_units.py, one process per stage: DeepSpeed needs process groups
the test session must not hold, and each stage's peaks must start from a fresh process.

Prints one JSON line: {"peak": [bytes per rank], "phases": {phase: [bytes per rank]}, "fp32_model": bytes}.

    python tests/train/zero_memory_run.py --stage 3 --port 29533
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

WORLD, STEPS = 2, 2


def rank_main(rank: int, stage: int, port: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), WORLD_SIZE=str(WORLD))
    os.environ.update(LOCAL_RANK=str(rank), DS_ACCELERATOR="cpu")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import torch
    import torch.distributed as dist

    from model.build import build_model, materialize
    from model.config import ModelConfig
    from orchestration.config import load_config
    from orchestration.train.engine import wrap_model
    from orchestration.train.memory import MemoryPhases, configure_allocator

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    device = torch.device("cpu")
    configure_allocator(device, stage)
    phases = MemoryPhases(device)
    cfg = ModelConfig(vocab_size=4096, block_size=64, n_layer=8, n_head=12, n_embd=768)
    model = materialize(build_model(cfg, device="meta"), device, seed=0)
    phases.end("build")
    overrides = [f"train.zero_stage={stage}", f"train.num_workers={WORLD}", "train.micro_batch_size=1"]
    engine = wrap_model(model, load_config(None, overrides).train, device)
    phases.end("engine_init")
    batch = torch.randint(0, 4096, (1, 65), generator=torch.Generator().manual_seed(rank))
    for _ in range(STEPS):
        _, loss = engine(batch[:, :-1], batch[:, 1:])
        phases.end("forward")
        engine.backward(loss)
        phases.end("backward")
        engine.step()
        phases.end("optimizer_step")
    gathered = [None] * WORLD
    dist.all_gather_object(gathered, (phases.peak_bytes(), phases.take_new()))
    if rank == 0:
        fp32_model = 4 * sum(p.numel() for p in build_model(cfg, device="meta").parameters())
        by_phase = {phase: [peaks[phase] for _, peaks in gathered] for phase in gathered[0][1]}
        print(json.dumps({"peak": [peak for peak, _ in gathered], "phases": by_phase, "fp32_model": fp32_model}))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", type=int, required=True)
    ap.add_argument("--port", required=True)
    args = ap.parse_args()
    import torch.multiprocessing as mp

    mp.spawn(rank_main, args=(args.stage, args.port), nprocs=WORLD)


if __name__ == "__main__":
    main()
