"""Fine-tuning data on the driver: labelled rows (classification, SFT) -> token arrays -> an ordered
Ray Data stream of examples with positions, shuffled per epoch as the pretraining loader shuffles shards.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import numpy as np

if TYPE_CHECKING:
    from orchestration.config import FinetuneRunConfig


def task_rows(cfg: FinetuneRunConfig) -> tuple[list[dict], list[dict]]:
    """(train rows, val rows) of a classification/SFT task; val capped at finetune.max_val_examples."""
    from data_pipeline.task_data import SHIPPED_TASKS, load_examples, spread

    ft = cfg.finetune
    kwargs = {"max_per_document": ft.max_per_document} if ft.data in SHIPPED_TASKS else {}
    train_rows = load_examples(ft.data, ft.task, "train", endpoint_url=cfg.train.endpoint_url, **kwargs)
    val_rows = load_examples(ft.data, ft.task, "val", endpoint_url=cfg.train.endpoint_url, **kwargs)
    return train_rows, spread(val_rows, ft.max_val_examples)


def encode_rows(task: str, enc, rows: list[dict], seq_len: int, labels: Optional[list[str]]) -> dict[str, np.ndarray]:
    from data_pipeline.task_data import encode_classification, encode_sft

    if task == "classification":
        tokens, lengths, label_ids = encode_classification(enc, rows, seq_len, labels)
        return {"tokens": tokens, "lengths": lengths, "labels": label_ids}
    tokens, targets, dropped = encode_sft(enc, rows, seq_len)
    if dropped:
        print(
            f"[raylm] {dropped} of {len(rows)} SFT rows dropped: the response alone does not fit {seq_len} tokens",
            flush=True,
        )
    return {"tokens": tokens, "targets": targets}


def task_seq_len(task: str, enc, rows: list[dict], block_size: int) -> int:
    """The longest encoded example, rounded up to a multiple of 8 and capped by the context."""
    if task == "classification":
        longest = max(len(enc.encode_ordinary(r["text"])) for r in rows)
    else:
        longest = max(len(enc.encode_ordinary(r["prompt"])) + len(enc.encode_ordinary(r["response"])) + 1 for r in rows)
    return min(block_size, -(-longest // 8) * 8)


def gather_rows(batch: dict, *, columns: dict, order: np.ndarray) -> dict:
    """Stream positions -> the example each one holds (epoch-shuffled order computed on the driver)."""
    positions = batch["id"]
    return {"position": positions, **{k: v[order[positions]] for k, v in columns.items()}}


def example_stream(columns: dict[str, np.ndarray], num_rows: int, seed: int, shuffle: bool):
    """A Ray dataset of ``num_rows`` stream positions over the examples: epoch e visits them in
    ``rng(seed, e)`` order (train) or file order (val), as the pretraining loader does for shards."""
    import ray.data

    n = len(next(iter(columns.values())))
    epochs = -(-num_rows // n)
    order = np.concatenate(
        [np.random.default_rng([seed, e]).permutation(n) if shuffle else np.arange(n) for e in range(epochs)]
    )[:num_rows]
    ds = ray.data.range(num_rows, override_num_blocks=max(1, min(16, num_rows // 256))).map_batches(
        gather_rows, batch_format="numpy", fn_kwargs={"columns": columns, "order": order}
    )
    ds.context.execution_options.preserve_order = True
    return ds
