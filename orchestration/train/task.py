"""What differs between the jobs the one worker loop runs, and the pretraining job itself.

A ``Task`` is a small bundle of hooks the loop calls: the model it trains, the forward that turns a
micro-batch into (loss, loss-bearing items, correct predictions), the train and val batch streams,
which weight files a checkpoint holds, and early stopping. ``pretrain_task`` builds the one for
next-token pretraining on token shards (GPT or a recurrent baseline); fine-tuning builds its own in
``orchestration.finetune.task``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

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
    """The hooks of one job. ``train_batches(start_step)`` yields this rank's micro-batches from that
    optimizer step on; ``val_batches()`` this rank's val micro-batches (the same count on every rank:
    ZeRO-3 forwards are collective), or with ``val_sources`` (a data mixture: source -> weight)
    ``val_batches(source)`` those of one source; ``data_stats()`` what the train reader has read so far."""

    name: str
    model: torch.nn.Module
    forward: Forward
    train_batches: Callable[[int], Iterator[dict]]
    val_batches: Optional[Callable[..., Iterator[dict]]]  # None: the data has no val split, no eval
    flops_per_token: float
    data_stats: Optional[Callable[[], dict]] = None
    weight_files: Optional[Callable[[dict], dict[str, dict]]] = None
    checkpoint_every_eval: bool = False  # keep the best evaluation's weights (fine-tuning)
    early_stopping: Optional[EarlyStopping] = None
    reports_accuracy: bool = False
    record_extra: dict = field(default_factory=dict)  # constant fields of every metrics record
    # more of each evaluation, on every rank with the same inputs (collective at ZeRO-3): engine -> record fields
    eval_extra: Optional[Callable[[Any], dict]] = None
    banner: str = ""  # printed by rank 0 once the model is built
    # a data mixture: each source's weight in val_loss (val_loss/<source> each), and record fields of a step
    val_sources: dict[str, float] = field(default_factory=dict)
    step_extra: Optional[Callable[[int], dict]] = None


def to_device(array, device: torch.device) -> torch.Tensor:
    """A host integer array as int64 on ``device``. On CUDA it is copied from pinned memory without
    blocking the host and widened on the device (a quarter of the bytes cross the bus for uint16)."""
    host = torch.from_numpy(array)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True).long()
    return host.long()


def lm_forward(engine, batch: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token loss of a [B, T + 1] token micro-batch. Every target token carries loss, except
    those of rows with weight 0 (a val set's padding rows), which are ignored."""
    tokens = to_device(batch["tokens"], device)
    targets = tokens[:, 1:]
    if "weights" in batch:
        keep = torch.from_numpy(batch["weights"] > 0).to(device)
        targets = targets.masked_fill(~keep[:, None], -1)  # the model's loss ignores target -1
    _, loss = engine(tokens[:, :-1], targets)
    return loss, (targets != -1).sum().float(), torch.zeros((), device=device)


def dataset_batches(
    name: str, rank: int, world_size: int, micro_batch_size: int, global_batch_size: int, limit: Optional[int] = None
) -> Callable[..., Iterator[dict]]:
    """This rank's micro-batches of the Ray Data stream ``name`` the driver handed Ray Train (the
    first ``limit`` of them when given)."""
    import itertools

    import ray.train

    from data_pipeline.stream import worker_examples

    def batches(start_step: int = 0) -> Iterator[dict]:
        shard = ray.train.get_dataset_shard(name)
        skip_before = start_step * global_batch_size
        rows = worker_examples(
            shard, rank=rank, world_size=world_size, micro_batch_size=micro_batch_size, skip_before=skip_before
        )
        return itertools.islice(rows, limit)

    return batches


def pretrain_task(plan: WorkerPlan, device: torch.device, rank: int, world_size: int) -> Task:
    """Next-token pretraining of ``plan.model`` (GPT, or the RNN / GRU / LSTM of arch rnn|gru|lstm), seeded so
    every rank starts from identical weights. Each rank reads only its slice of every global batch
    straight from the shards (``data_pipeline.loader.rank_batches``), from the step it resumes at; with
    DP-SGD (``plan.privacy``) its share of each step's Poisson sample, through DP's forward."""
    from data_pipeline.loader import poisson_rank_batches, rank_batches, rank_val_batches
    from data_pipeline.mixture import MixtureOrder
    from model.flops import flops_per_token
    from orchestration.train.dp import dp_lm_forward
    from orchestration.train.rank_model import build_rank_model

    model_cfg, train = plan.model, plan.train
    # Seeded identically on every rank, built on the worker's device; at ZeRO-3 partitioned as it is
    # built, so no rank holds the whole model (orchestration.train.rank_model).
    model = build_rank_model(model_cfg, train.at_world_size(world_size), device)
    data = {"endpoint_url": train.endpoint_url, "rank": rank, "world_size": world_size}
    readers: list = []

    def train_batches(start_step: int) -> Iterator[dict]:
        if plan.privacy is not None:  # DP-SGD: per step, this rank's share of a Poisson sample of the rows
            reader = poisson_rank_batches(
                plan.task["manifest"],
                seed=train.seed,
                sample_rate=plan.privacy.sample_rate,
                start_step=start_step,
                num_steps=plan.total_steps - start_step,
                **data,
            )
        else:
            reader = rank_batches(
                plan.task["manifest"],
                seed=train.seed,
                global_batch_size=train.global_batch_size,
                micro_batch_size=train.micro_batch_size,
                start_step=start_step,
                num_steps=plan.total_steps - start_step,
                mixture_schedule=schedule,
                mixture_exhausted=train.mixture_exhausted,
                **data,
            )
        readers.append(reader)
        return ({"tokens": tokens} for tokens in reader)

    def val_batches(source: Optional[str] = None) -> Iterator[dict]:
        reader = rank_val_batches(
            plan.task["manifest"],
            num_sequences=train.val_sequences,
            micro_batch_size=train.micro_batch_size,
            source=source,
            **data,
        )
        return ({"tokens": tokens, "weights": weights} for tokens, weights in reader)

    # a data mixture: val loss per source with val rows (weighted by the run's current weights), epochs per source
    schedule = plan.task.get("mixture_schedule")
    val_sources, step_extra = {}, None
    if schedule:
        manifest = plan.task["manifest"]
        with_val = {m["name"] for m in manifest["mixture"] if m["splits"]["val"]["sequences"] > 0}
        val_sources = {name: w for name, w in schedule[-1][1].items() if name in with_val}
        order = MixtureOrder(manifest, train.seed, train.global_batch_size, schedule, train.mixture_exhausted)

        def step_extra(step: int) -> dict:
            return {f"data_epochs/{name}": epochs for name, epochs in order.epochs(step - 1).items()}

    return Task(
        name="pretrain",
        model=model,
        forward=lm_forward if plan.privacy is None else dp_lm_forward,
        train_batches=train_batches,
        val_batches=val_batches if plan.val_batches else None,
        flops_per_token=flops_per_token(model_cfg, plan.seq_len),
        data_stats=lambda: readers[-1].stats,
        eval_extra=bias_during_training(plan) if train.bias_probe else None,
        val_sources=val_sources,
        step_extra=step_extra,
    )


def bias_during_training(plan: WorkerPlan) -> Callable[[Any], dict]:
    """The bias probe at an evaluation: its overall score (nats of log odds), bootstrap CI and each
    category's mean, for the model the engine trains, with the run's tokenizer."""
    from data_pipeline import tokenizer as tok
    from orchestration.evaluate.suites import bias_scores

    enc = tok.encoding(tok.from_files(plan.checkpoint_files[tok.RANKS_FILE], plan.checkpoint_files[tok.META_FILE]))

    def probe(engine) -> dict:
        result = bias_scores(engine.module, enc)
        return {
            "bias_score": result["overall"]["mean"],
            "bias_ci": result["overall"]["ci"],
            **{f"bias/{name}": cat["mean"] for name, cat in result["categories"].items()},
        }

    return probe
