"""bf16 on every engine in one process: the same tiny GPT, data and steps through ``wrap_model`` at
ZeRO stages 0 (DDP + autocast) to 3 (DeepSpeed bf16), one rank on a gloo process group, as the
training loop drives them (lr set on the engine's optimizer, micro-batches accumulated, the engine
stepping on the last). Run by test_train_units.py in its own process: DeepSpeed needs a process
group, which the test session's own process must not hold.

Prints one JSON line: {stage: [mean loss of each optimizer step]}.

    python tests/train/bf16_engines_run.py --port 29533 [--grad-accum-dtype bf16]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

STEPS, ACCUM, MICRO_BATCH, LR = 12, 4, 4, 3e-3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", required=True)
    ap.add_argument("--grad-accum-dtype", default=None, help="override DeepSpeed's (to measure what fp32 buys)")
    args = ap.parse_args()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=args.port, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import torch
    import torch.distributed as dist
    from engine_steps import train_losses

    from model.config import ModelConfig
    from model.gpt import GPT
    from orchestration.config import load_config
    from orchestration.train import engine as engines

    if args.grad_accum_dtype:
        made = engines.deepspeed_config

        def deepspeed_config(*a, **k) -> dict:
            return {**made(*a, **k), "data_types": {"grad_accum_dtype": args.grad_accum_dtype}}

        engines.deepspeed_config = deepspeed_config
    dist.init_process_group("gloo")
    # 16 fixed sequences the model can learn, so the loss falls and the trajectories have a shape
    corpus = torch.randint(0, 64, (16, 17), generator=torch.Generator().manual_seed(1))
    losses = {}
    for stage in (0, 1, 2, 3):
        overrides = [f"train.zero_stage={stage}", "train.precision=bf16", "train.num_workers=1"]
        overrides += [f"train.micro_batch_size={MICRO_BATCH}", f"train.grad_accum_steps={ACCUM}"]
        train = load_config(None, overrides).train
        torch.manual_seed(0)
        model = GPT(ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0))
        engine = engines.wrap_model(model, train, torch.device("cpu"))
        order = torch.Generator().manual_seed(2)
        losses[stage] = train_losses(
            engine, corpus, steps=STEPS, accum=ACCUM, micro_batch=MICRO_BATCH, lr=LR, order=order
        )
    print(json.dumps(losses))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
