"""The training loop's step, as the engine-comparison scripts (bf16_engines_run.py,
compile_engines_run.py) drive an engine: lr set on its optimizer, micro-batches accumulated, the
engine stepping on the last. Not a test module: imported by those scripts from their own directory."""

from __future__ import annotations


def train_losses(engine, corpus, *, steps: int, accum: int, micro_batch: int, lr: float, order) -> list[float]:
    """The mean loss of each of ``steps`` optimizer steps over batches drawn from ``corpus`` (rows of
    tokens) with the generator ``order``."""
    import torch

    from orchestration.train.engine import set_lr

    losses = []
    for _ in range(steps):
        set_lr(engine.optimizer, lr)
        total = 0.0
        for _ in range(accum):
            batch = corpus[torch.randint(0, len(corpus), (micro_batch,), generator=order)]
            _, loss = engine(batch[:, :-1], batch[:, 1:])  # in fp32 on every engine (model.loss)
            engine.backward(loss)
            engine.step()
            total += loss.item() / accum
        losses.append(total)
    return losses
