"""The fine-tuning driver: validate -> task data -> before metrics -> TorchTrainer -> best checkpoint ->
after metrics -> ``finetune_summary.json`` / ``finetune.md`` in the run dir.

Shares the pretraining machinery (run directories, resume, resources, checkpoints, DeepSpeed) and
adds what fine-tuning needs: the pretrained checkpoint's model and tokenizer, task rows tokenized on
the driver (small labelled sets) or token shards for continued pretraining, and early stopping.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Optional

import numpy as np
import yaml

from model.config import ModelConfig
from orchestration.config import Config, ConfigError, config_to_dict
from orchestration.train.config import TrainConfig

SUMMARY_JSON, SUMMARY_MD = "finetune_summary.json", "finetune.md"


def _check_config(cfg: Config) -> None:
    ft, train = cfg.finetune, cfg.train
    if not ft.checkpoint:
        raise ConfigError("finetune.checkpoint is required: a pretrained checkpoint_<step> dir or run dir")
    if not ft.data:
        raise ConfigError(
            "finetune.data is required: a manifest (task lm), a shipped task "
            "(shakespeare-genre, shakespeare-play-qa) or a JSONL URI with {split}"
        )
    if train.data != TrainConfig().data:
        raise ConfigError("fine-tuning reads finetune.data; train.data is for pretraining, remove it")
    if train.eval_steps != TrainConfig().eval_steps:
        raise ConfigError(
            "fine-tuning scores finetune.max_val_examples val rows at every evaluation; "
            "set that instead of train.eval_steps"
        )
    changed = [
        f.name
        for f in dataclasses.fields(ModelConfig)
        if f.name != "dropout" and getattr(cfg.model, f.name) != getattr(ModelConfig(), f.name)
    ]
    if changed:
        raise ConfigError(
            f"the model shape comes from the checkpoint; remove model.{', model.'.join(changed)} "
            "(only model.dropout may be set for fine-tuning)"
        )
    if train.eval_interval == 0 and ft.patience > 0:
        raise ConfigError(
            "early stopping (finetune.patience > 0) needs train.eval_interval > 0; "
            "set an interval or finetune.patience=0"
        )
    if train.checkpoint_interval not in (0, train.eval_interval):
        raise ConfigError(
            "fine-tuning checkpoints at every evaluation (to keep the best one); set "
            f"train.checkpoint_interval to train.eval_interval ({train.eval_interval}) or 0"
        )


def _with_absolute_paths(cfg: Config) -> Config:
    """Workers run in Ray's own working directory: local checkpoint/data paths must be absolute."""
    from data_pipeline.task_data import SHIPPED_TASKS
    from orchestration.config import absolute_uri, with_absolute_paths

    ft = cfg.finetune
    data = ft.data if ft.data in SHIPPED_TASKS else absolute_uri(ft.data)
    return dataclasses.replace(
        with_absolute_paths(cfg), finetune=dataclasses.replace(ft, checkpoint=absolute_uri(ft.checkpoint), data=data)
    )


def _model_config(local: str, cfg: Config) -> ModelConfig:
    from orchestration.train.checkpoint import MODEL_CONFIG_FILE

    model_cfg = ModelConfig(**json.loads((Path(local) / MODEL_CONFIG_FILE).read_text()))
    ft = cfg.finetune
    if model_cfg.arch != "gpt" and (ft.mode != "full" or ft.task == "classification"):
        raise ConfigError(
            f"finetune.mode={ft.mode} / task={ft.task} need a GPT checkpoint; {ft.checkpoint} "
            f"is arch {model_cfg.arch!r} (use mode full with task lm or sft)"
        )
    if ft.mode == "partial" and ft.freeze_blocks > model_cfg.n_layer:
        raise ConfigError(f"finetune.freeze_blocks={ft.freeze_blocks} but the model has {model_cfg.n_layer} blocks")
    return dataclasses.replace(model_cfg, dropout=cfg.model.dropout)


def task_rows(cfg: Config) -> tuple[list[dict], list[dict]]:
    """(train rows, val rows) of a classification/SFT task; val capped at finetune.max_val_examples."""
    from data_pipeline.task_data import SHIPPED_TASKS, load_examples, spread

    ft = cfg.finetune
    kwargs = {"max_per_document": ft.max_per_document} if ft.data in SHIPPED_TASKS else {}
    train_rows = load_examples(ft.data, ft.task, "train", endpoint_url=cfg.train.endpoint_url, **kwargs)
    val_rows = load_examples(ft.data, ft.task, "val", endpoint_url=cfg.train.endpoint_url, **kwargs)
    return train_rows, spread(val_rows, ft.max_val_examples)


def _encode(cfg: Config, enc, rows: list[dict], seq_len: int, labels: Optional[list[str]]) -> dict[str, np.ndarray]:
    from data_pipeline.task_data import encode_classification, encode_sft

    if cfg.finetune.task == "classification":
        tokens, lengths, label_ids = encode_classification(enc, rows, seq_len, labels)
        return {"tokens": tokens, "lengths": lengths, "labels": label_ids}
    tokens, targets, dropped = encode_sft(enc, rows, seq_len)
    if dropped:
        print(
            f"[raylm] {dropped} of {len(rows)} SFT rows dropped: the response alone does not fit {seq_len} tokens",
            flush=True,
        )
    return {"tokens": tokens, "targets": targets}


def _task_seq_len(cfg: Config, enc, rows: list[dict], block_size: int) -> int:
    """The longest encoded example, rounded up to a multiple of 8 and capped by the context."""
    if cfg.finetune.task == "classification":
        longest = max(len(enc.encode_ordinary(r["text"])) for r in rows)
    else:
        longest = max(len(enc.encode_ordinary(r["prompt"])) + len(enc.encode_ordinary(r["response"])) + 1 for r in rows)
    return min(block_size, -(-longest // 8) * 8)


def _gather_rows(batch: dict, *, columns: dict, order: np.ndarray) -> dict:
    """Stream positions -> the example each one holds (epoch-shuffled order computed on the driver)."""
    positions = batch["id"]
    return {"position": positions, **{k: v[order[positions]] for k, v in columns.items()}}


def _stream(columns: dict[str, np.ndarray], num_rows: int, seed: int, shuffle: bool):
    """A Ray dataset of ``num_rows`` stream positions over the examples: epoch e visits them in
    ``rng(seed, e)`` order (train) or file order (val), as the pretraining loader does for shards."""
    import ray.data

    n = len(next(iter(columns.values())))
    epochs = -(-num_rows // n)
    order = np.concatenate(
        [np.random.default_rng([seed, e]).permutation(n) if shuffle else np.arange(n) for e in range(epochs)]
    )[:num_rows]
    ds = ray.data.range(num_rows, override_num_blocks=max(1, min(16, num_rows // 256))).map_batches(
        _gather_rows, batch_format="numpy", fn_kwargs={"columns": columns, "order": order}
    )
    ds.context.execution_options.preserve_order = True
    return ds


def _before_after(
    cfg: Config,
    uri: str,
    val: dict,
    rows_val: list[dict],
    rows_train: list[dict],
    labels: Optional[list[str]],
    tuned: bool,
) -> dict:
    """Task metrics of the pretrained (tuned=False) or fine-tuned checkpoint on the val rows."""
    from orchestration.evaluate.load import evaluate, load_checkpoint_model
    from orchestration.finetune.scores import classifier_metrics, majority_accuracy, sft_metrics, zero_shot_metrics

    ft = cfg.finetune
    if ft.task == "lm":
        return evaluate(uri, ft.data, max_sequences=ft.max_val_examples, endpoint_url=cfg.train.endpoint_url)
    if ft.task == "sft":
        model, _, enc, _ = load_checkpoint_model(uri, endpoint_url=cfg.train.endpoint_url)
        return sft_metrics(model, enc, val["tokens"], val["targets"], rows_val, sample_prompts=ft.sample_prompts)
    if tuned:
        model = load_classifier(uri, len(labels), cfg.train.endpoint_url)
        return classifier_metrics(model, val["tokens"], val["lengths"], val["labels"], labels)
    model, model_cfg, enc, _ = load_checkpoint_model(uri, endpoint_url=cfg.train.endpoint_url)
    return {
        "zero_shot": zero_shot_metrics(model, enc, rows_val, labels, max_len=model_cfg.block_size),
        "majority_class": majority_accuracy(rows_train, rows_val),
    }


def load_classifier(uri: str, num_classes: int, endpoint_url: Optional[str] = None):
    """A fine-tuned GPTClassifier (backbone + head files) in eval mode."""
    from safetensors.torch import load_file

    from model.classifier import GPTClassifier
    from orchestration.evaluate.load import _local_copy, _resolve
    from orchestration.finetune.task import HEAD_FILE
    from orchestration.train.checkpoint import MODEL_CONFIG_FILE, load_consolidated_state, load_weights

    local = _local_copy(_resolve(uri, endpoint_url), endpoint_url)
    state, cfg_dict, _, _ = load_consolidated_state(local)
    model = GPTClassifier(ModelConfig(**cfg_dict), num_classes)
    load_weights(model.backbone, state, f"{uri} ({MODEL_CONFIG_FILE})")
    model.head.load_state_dict({k[len("head.") :]: v for k, v in load_file(str(Path(local) / HEAD_FILE)).items()})
    return model.eval()


def run_finetune(cfg: Config, *, resume: bool = True) -> dict:
    """Fine-tune ``cfg.finetune.checkpoint`` on ``cfg.finetune.data``; return the summary (also written
    to ``<run dir>/finetune_summary.json`` and ``finetune.md``)."""
    from ray.train import CheckpointConfig

    from data_pipeline.loader import check_manifest, read_manifest, sequence_dataset
    from data_pipeline.storage import write_bytes
    from data_pipeline.tokenizer import encoding, load_spec, to_files
    from orchestration.evaluate.load import _local_copy, _resolve
    from orchestration.finetune.task import finetune_loop_per_worker
    from orchestration.runtime import init_ray
    from orchestration.train.checkpoint import checkpoint_dir_name, latest_complete_checkpoint
    from orchestration.train.driver import _check_resources, _check_same_run, _storage, make_trainer, run_uri
    from orchestration.train.throughput import read_metrics

    t0 = time.time()
    _check_config(cfg)
    cfg = _with_absolute_paths(cfg)
    ft, train = cfg.finetune, cfg.train
    init_uri = _resolve(ft.checkpoint, train.endpoint_url)
    local = _local_copy(init_uri, train.endpoint_url)
    model_cfg = _model_config(local, cfg)
    spec = load_spec(local)
    enc = encoding(spec)
    init_ray()

    # --- task data: token shards (lm) or labelled rows tokenized here (classification, sft)
    labels, rows_train, rows_val, val_arrays = None, [], [], {}
    if ft.task == "lm":
        manifest = read_manifest(ft.data, train.endpoint_url)
        try:
            check_manifest(manifest, spec["hash"], None)
        except ValueError as err:
            raise ConfigError(
                f"{err}. Prepare the domain corpus with the checkpoint's tokenizer: `raylm prepare "
                f"data.tokenizer.kind=file data.tokenizer.path={init_uri}`"
            ) from None
        seq_len = int(manifest["seq_len"])
        if seq_len > model_cfg.block_size:
            raise ConfigError(f"{ft.data} holds seq_len {seq_len} > the model's block_size {model_cfg.block_size}")
        n_val = min(ft.max_val_examples, int(manifest["splits"].get("val", {}).get("sequences", 0)))
        datasets = {
            "train": sequence_dataset(
                ft.data,
                "train",
                seed=train.seed,
                num_sequences=train.total_steps(seq_len) * train.global_batch_size,
                expected_tokenizer_hash=spec["hash"],
                endpoint_url=train.endpoint_url,
            )
        }
        if n_val:
            datasets["val"] = sequence_dataset(
                ft.data,
                "val",
                seed=train.seed,
                num_sequences=n_val,
                expected_tokenizer_hash=spec["hash"],
                endpoint_url=train.endpoint_url,
            )
    else:
        rows_train, rows_val = task_rows(cfg)
        if ft.task == "classification":
            labels = ft.labels or sorted({r["label"] for r in rows_train})
        seq_len = _task_seq_len(cfg, enc, rows_train + rows_val, model_cfg.block_size)
        train_arrays = _encode(cfg, enc, rows_train, seq_len, labels)
        val_arrays = _encode(cfg, enc, rows_val, seq_len, labels)
        n_val = len(val_arrays["tokens"])
        datasets = {
            "train": _stream(
                train_arrays, train.total_steps(seq_len) * train.global_batch_size, train.seed, shuffle=True
            ),
            "val": _stream(val_arrays, n_val, train.seed, shuffle=False),
        }
        print(
            f"[raylm] {ft.data}: {len(train_arrays['tokens'])} train / {n_val} val examples, {seq_len} tokens each"
            + (f", labels {labels}" if labels else ""),
            flush=True,
        )
    val_batches = n_val // (train.num_workers * train.micro_batch_size)
    if val_batches == 0:
        raise ConfigError(
            f"{ft.data}: {n_val} val examples are fewer than one micro-batch per worker "
            f"({train.num_workers} x {train.micro_batch_size}); fine-tuning needs a val split"
        )
    total_steps = train.total_steps(seq_len)
    if train.warmup_steps >= total_steps:
        raise ConfigError(f"train.warmup_steps ({train.warmup_steps}) must be < the run's {total_steps} steps")
    for ds in datasets.values():
        ds.context.enable_progress_bars = False
        ds.context.enable_operator_progress_bars = False

    # --- run directory, resume, before-metrics (skipped when resuming: they are in the summary draft)
    fs, run_path, _, _ = _storage(cfg)
    uri = run_uri(cfg)
    run_exists = fs.get_file_info(run_path).type.name == "Directory"
    if run_exists and not resume:
        raise ConfigError(f"run directory {uri} already exists; pick another train.run_name or resume it")
    latest = latest_complete_checkpoint(uri, train.endpoint_url) if run_exists else None
    if latest:
        _check_same_run(latest[1], dataclasses.replace(cfg, model=model_cfg), uri)
        print(f"[raylm] resuming {uri} from step {latest[1]['step']}", flush=True)
    _check_resources(train)
    print("[raylm] scoring the pretrained checkpoint on the val rows (before)", flush=True)
    before = _before_after(cfg, init_uri, val_arrays, rows_val, rows_train, labels, tuned=False)
    resolved = dataclasses.replace(cfg, model=model_cfg)
    write_bytes(fs, f"{run_path}/config.yaml", yaml.safe_dump(config_to_dict(resolved), sort_keys=False).encode())

    finetune_info = {
        "task": ft.task,
        "mode": ft.mode,
        "labels": labels,
        "base_checkpoint": init_uri,
        "data": ft.data,
        "seq_len": seq_len,
        "lora": (
            {"rank": ft.lora_rank, "alpha": ft.lora_alpha, "targets": ft.lora_targets} if ft.mode == "lora" else None
        ),
    }
    plan = {
        "config": config_to_dict(resolved),
        "model_config": dataclasses.asdict(model_cfg),
        "init_uri": init_uri,
        "labels": labels,
        "seq_len": seq_len,
        "total_steps": total_steps,
        "val_batches": val_batches,
        "tokenizer_files": to_files(spec),
        "finetune_info": finetune_info,
        "resume_uri": latest[0] if latest else None,
    }
    # every evaluation checkpoints; Ray keeps the best num_to_keep by val loss, and always the latest
    trainer = make_trainer(
        cfg,
        finetune_loop_per_worker,
        plan,
        datasets,
        checkpoint_config=CheckpointConfig(
            num_to_keep=train.num_to_keep, checkpoint_score_attribute="val_loss", checkpoint_score_order="min"
        ),
    )
    result = trainer.fit()
    if result.error:
        raise result.error

    # --- the best evaluation's checkpoint, scored the same way as the pretrained one
    records = read_metrics(fs, f"{run_path}/metrics.jsonl")
    evals = [r for r in records if "val_loss" in r]
    best = min(evals, key=lambda r: r["val_loss"])
    best_uri = f"{uri}/{checkpoint_dir_name(best['step'])}"
    print(f"[raylm] scoring the best checkpoint (step {best['step']}, val {best['val_loss']:.4f}) (after)", flush=True)
    after = _before_after(cfg, best_uri, val_arrays, rows_val, rows_train, labels, tuned=True)
    summary = {
        **finetune_info,
        "run_dir": uri,
        "best_checkpoint": best_uri,
        "best_step": best["step"],
        "final_step": records[-1]["step"],
        "total_steps": total_steps,
        "stopped_early": bool(evals[-1].get("stopped_early")),
        "trainable_params": records[-1]["trainable_params"],
        "train_examples": len(rows_train) or None,
        "val_examples": n_val,
        "before": before,
        "after": after,
        "wall_s": time.time() - t0,
    }
    write_bytes(fs, f"{run_path}/{SUMMARY_JSON}", json.dumps(summary, indent=2).encode())
    write_bytes(fs, f"{run_path}/{SUMMARY_MD}", summary_markdown(summary).encode())
    print(summary_markdown(summary), flush=True)
    return summary


def headline(task: str, metrics: dict, tuned: bool) -> dict[str, Optional[float]]:
    """The comparable numbers of one side of a before/after table."""
    if task == "lm":
        return {"val loss": metrics["loss"], "perplexity": metrics["perplexity"]}
    if task == "sft":
        kinds = metrics.get("exact_match_by_kind", {})
        return {
            "response loss": metrics["response_loss"],
            "exact match": metrics["exact_match"],
            **({f"exact match: {k}": v for k, v in kinds.items()} if len(kinds) > 1 else {}),
        }
    if tuned:
        return {"accuracy": metrics["accuracy"], "loss": metrics["loss"]}
    return {
        "accuracy": metrics["zero_shot"]["accuracy"],
        "majority-class accuracy": metrics["majority_class"]["accuracy"],
    }


def summary_markdown(summary: dict) -> str:
    """A before/after table (plus SFT answers) for the run's finetune.md and the report."""
    task = summary["task"]
    before, after = headline(task, summary["before"], False), headline(task, summary["after"], True)
    lines = [
        f"# Fine-tune: {task}, mode {summary['mode']}",
        "",
        f"Base {summary['base_checkpoint']}; best checkpoint {summary['best_checkpoint']} "
        f"(step {summary['best_step']} of {summary['total_steps']}"
        + (", stopped early" if summary["stopped_early"] else "")
        + f"); {summary['trainable_params']:,} "
        "trainable parameters.",
        "",
        "| metric | before | after |",
        "|---|---|---|",
    ]
    for key in dict.fromkeys([*before, *after]):
        lines.append(f"| {key} | {_fmt(before.get(key))} | {_fmt(after.get(key))} |")
    if task == "classification":
        lines += [
            "",
            "Before: the pretrained LM scoring each label after the template "
            f"{summary['before']['zero_shot']['template']!r} (zero-shot); the majority class always answers "
            f"{summary['before']['majority_class']['label']!r}.",
        ]
    if task == "sft" and summary["after"].get("samples"):
        lines += ["", "| prompt (end) | reference | before | after |", "|---|---|---|---|"]
        for b, a in zip(summary["before"]["samples"], summary["after"]["samples"]):
            cell = lambda t: t.replace("\n", " / ").replace("|", "\\|")  # noqa: E731
            lines.append(
                f"| {cell(a['prompt'][-80:])} | {cell(a['reference'])} | {cell(b['answer'])} | {cell(a['answer'])} |"
            )
    return "\n".join(lines) + "\n"


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.4f}"
