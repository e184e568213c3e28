"""What differs between the jobs the one worker loop runs, and the pretraining job itself.

A ``Task`` is a small bundle of hooks the loop calls: the model it trains, the forward that turns a
micro-batch into (loss, loss-bearing items, correct predictions), the train and val batch streams,
which weight files a checkpoint holds, and early stopping. ``pretrain_task`` builds the one for
next-token pretraining on token shards (GPT or the LSTM baseline); fine-tuning builds its own in
``orchestration.finetune.task``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch

from orchestration.train.plan import WorkerPlan

# (engine, micro-batch {column: array}, device) -> (mean loss, items that carry loss, correct predictions)
Forward = Callable[[object, dict, torch.device], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@dataclass
class EarlyStopping:
    """Stop when the val loss has not improved by ``min_delta`` for ``patience`` evaluations."""

    patience: int
    min_delta: float


@dataclass
class Task:
    """The hooks of one job. ``train_batches(skip_before)`` yields this rank's micro-batches from
    stream position ``skip_before`` on; ``val_batches()`` this rank's val micro-batches."""

    name: str
    model: torch.nn.Module
    forward: Forward
    train_batches: Callable[[int], Iterator[dict]]
    val_batches: Callable[[], Iterator[dict]]
    flops_per_token: float
    weight_files: Optional[Callable[[dict], dict[str, dict]]] = None
    checkpoint_every_eval: bool = False  # keep the best evaluation's weights (fine-tuning)
    early_stopping: Optional[EarlyStopping] = None
    reports_accuracy: bool = False
    record_extra: dict = field(default_factory=dict)  # constant fields of every metrics record
    banner: str = ""  # printed by rank 0 once the model is built


def lm_forward(engine, batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token loss of a [B, T + 1] token micro-batch; every target token carries loss."""
    tokens = torch.from_numpy(batch["tokens"]).to(device, dtype=torch.long, non_blocking=True)
    _, loss = engine(tokens[:, :-1], tokens[:, 1:])
    items = torch.tensor(float(tokens[:, 1:].numel()), device=device)
    return loss, items, torch.zeros((), device=device)


def dataset_batches(name: str, rank: int, world_size: int, micro_batch_size: int) -> Callable[..., Iterator[dict]]:
    """This rank's micro-batches of the Ray Data stream ``name`` the driver handed Ray Train."""
    import ray.train

    from data_pipeline.loader import worker_examples

    def batches(skip_before: int = 0) -> Iterator[dict]:
        shard = ray.train.get_dataset_shard(name)
        return iter(
            worker_examples(
                shard, rank=rank, world_size=world_size, micro_batch_size=micro_batch_size, skip_before=skip_before
            )
        )

    return batches


def pretrain_task(plan: WorkerPlan, device: torch.device, rank: int, world_size: int) -> Task:
    """Next-token pretraining of ``plan.model_config`` (GPT, or the LSTM with arch=lstm), seeded so
    every rank starts from identical weights."""
    from model.config import ModelConfig
    from model.flops import flops_per_token
    from model.lstm import build_model
    from orchestration.train.engine import seed_everything

    model_cfg = ModelConfig(**plan.model_config)
    seed_everything(plan.config["train"]["seed"])
    micro = plan.config["train"]["micro_batch_size"]
    return Task(
        name="pretrain",
        model=build_model(model_cfg).to(device),
        forward=lm_forward,
        train_batches=dataset_batches("train", rank, world_size, micro),
        val_batches=dataset_batches("val", rank, world_size, micro),
        flops_per_token=flops_per_token(model_cfg, plan.seq_len),
    )
