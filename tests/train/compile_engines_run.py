"""Compile x activation checkpointing x engine in one process: the same tiny GPT, data and steps
built by ``build_rank_model`` and wrapped by ``wrap_model`` at ZeRO stage 0 (DDP) and 3 (DeepSpeed, so
built under zero.Init), activation checkpointing none/full, compile off/on, fp32, one rank on a gloo
process group, driven as the training loop drives them.
Compiled runs use the aot_eager backend: Dynamo and AOTAutograd trace, partition and recompute as
with inductor (where graph breaks and checkpointing inside compile live), without generating
kernels, which take minutes on 2 cores. Run by test_train_units.py in its own process: DeepSpeed
needs a process group, which the test session's own process must not hold.

Prints one JSON line: {"stage/checkpointing/compile": {"losses": [...], "graph_breaks": n, "graphs": n}}.

    python tests/train/compile_engines_run.py --port 29533 [--dropout 0.1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

STEPS, ACCUM, MICRO_BATCH, LR = 6, 2, 4, 3e-3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", required=True)
    ap.add_argument("--dropout", type=float, default=0.0)
    args = ap.parse_args()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=args.port, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import torch
    import torch.distributed as dist
    from engine_steps import train_losses
    from torch._dynamo.utils import counters

    from model.config import ModelConfig
    from orchestration.config import load_config
    from orchestration.train.engine import wrap_model
    from orchestration.train.rank_model import build_rank_model

    dist.init_process_group("gloo")
    corpus = torch.randint(0, 64, (16, 17), generator=torch.Generator().manual_seed(1))
    runs = {}
    for stage in (0, 3):
        for checkpointing in ("none", "full"):
            for compiled in (False, True):
                overrides = [f"train.zero_stage={stage}", "train.num_workers=1", "train.precision=fp32"]
                overrides += [f"train.activation_checkpointing={checkpointing}", f"train.compile={compiled}"]
                overrides += ["train.compile_backend=aot_eager", f"train.micro_batch_size={MICRO_BATCH}"]
                overrides += [f"train.grad_accum_steps={ACCUM}"]
                train = load_config(None, overrides).train
                cfg = ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=args.dropout)
                # ZeRO-3 builds under zero.Init: the same seeded weights, drawn one gathered parameter at a time
                engine = wrap_model(build_rank_model(cfg, train, torch.device("cpu")), train, torch.device("cpu"))
                counters.clear()
                torch.manual_seed(3)  # the dropout masks
                order = torch.Generator().manual_seed(2)
                losses = train_losses(
                    engine, corpus, steps=STEPS, accum=ACCUM, micro_batch=MICRO_BATCH, lr=LR, order=order
                )
                runs[f"{stage}/{checkpointing}/{'on' if compiled else 'off'}"] = {
                    "losses": losses,
                    "graph_breaks": sum(counters["graph_break"].values()),
                    "graphs": counters["stats"]["unique_graphs"],
                }
                torch._dynamo.reset()
    print(json.dumps(runs))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
