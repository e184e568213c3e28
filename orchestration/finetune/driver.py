"""The fine-tuning driver: validate -> task data -> before metrics -> the shared ``launch`` -> best
checkpoint -> after metrics -> ``finetune_summary.json`` / ``finetune.md`` in the run dir.

Shares the pretraining driver path (run directory, resume, same-run check, resources, trainer) and
adds what fine-tuning needs: the pretrained checkpoint's model and tokenizer, task rows tokenized on
the driver (small labelled sets) or token shards for continued pretraining and distillation (teacher
and student: ``orchestration.finetune.distill``), and early stopping.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from model.config import ModelConfig
from orchestration.config import ConfigError, FinetuneRunConfig, config_to_dict
from orchestration.train.plan import WorkerPlan


def check_config(cfg: FinetuneRunConfig) -> None:
    """What the schema alone cannot check: required keys and how evaluation, checkpoints and early
    stopping fit together."""
    ft, train = cfg.finetune, cfg.train
    if ft.task == "distill":
        if not ft.teacher:
            raise ConfigError("finetune.teacher is required for task distill: a checkpoint_<step> dir or run dir")
        if ft.student is None and not ft.checkpoint:
            raise ConfigError(
                "task distill needs a student: finetune.student (the teacher's shape with some keys changed, "
                "e.g. {n_layer: 2, n_embd: 64}, freshly initialised) or finetune.checkpoint (a student checkpoint)"
            )
    elif not ft.checkpoint:
        raise ConfigError("finetune.checkpoint is required: a pretrained checkpoint_<step> dir or run dir")
    if not ft.data:
        raise ConfigError(
            "finetune.data is required: a manifest (task lm, distill), a shipped task "
            "(shakespeare-genre, shakespeare-play-qa) or a JSONL URI with {split}"
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


def with_absolute_paths(cfg: FinetuneRunConfig) -> FinetuneRunConfig:
    """Workers run in Ray's own working directory: local checkpoint/data paths must be absolute."""
    from data_pipeline.task_data import SHIPPED_TASKS
    from orchestration.artifacts import absolute_uri
    from orchestration.config import with_absolute_paths as with_absolute_run_paths

    ft = cfg.finetune
    data = ft.data if ft.data in SHIPPED_TASKS else absolute_uri(ft.data)
    checkpoint = absolute_uri(ft.checkpoint) if ft.checkpoint else None
    teacher = absolute_uri(ft.teacher) if ft.teacher else None
    return dataclasses.replace(
        with_absolute_run_paths(cfg),
        finetune=dataclasses.replace(ft, checkpoint=checkpoint, data=data, teacher=teacher),
    )


def checkpoint_model_config(local: str, cfg: FinetuneRunConfig) -> ModelConfig:
    """The pretrained checkpoint's ModelConfig with the fine-tune's dropout, checked against the task."""
    from orchestration.checkpoint_format import MODEL_CONFIG_FILE

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


@dataclass
class TaskData:
    """A fine-tune's data as the driver prepared it: Ray datasets for the workers and, for labelled
    tasks, the rows and token arrays the before/after metrics score."""

    datasets: dict
    seq_len: int
    n_val: int
    labels: Optional[list[str]] = None
    rows_train: list[dict] = field(default_factory=list)
    rows_val: list[dict] = field(default_factory=list)
    val_arrays: dict = field(default_factory=dict)


def task_data(cfg: FinetuneRunConfig, enc, tokenizer_hash: str, block_size: int, tokenizer_uri: str) -> TaskData:
    """Token shards (task lm and distill, read by Ray Data) or labelled rows tokenized here (classification,
    sft). ``tokenizer_uri``: the checkpoint whose tokenizer the shards must use (the teacher's for distill)."""
    from data_pipeline.manifest import check_manifest, read_manifest
    from data_pipeline.stream import sequence_dataset
    from orchestration.finetune.data import encode_rows, example_stream, task_rows, task_seq_len

    ft, train = cfg.finetune, cfg.train
    if ft.task in ("lm", "distill"):
        manifest = read_manifest(ft.data, train.endpoint_url)
        try:
            check_manifest(manifest, tokenizer_hash, None)
        except ValueError as err:
            owner = "teacher" if ft.task == "distill" else "checkpoint"
            raise ConfigError(
                f"{err}. Prepare the corpus with the {owner}'s tokenizer: `raylm prepare "
                f"data.tokenizer.kind=file data.tokenizer.path={tokenizer_uri}`"
            ) from None
        seq_len = int(manifest["seq_len"])
        if seq_len > block_size:
            raise ConfigError(f"{ft.data} holds seq_len {seq_len} > the model's block_size {block_size}")
        n_val = min(ft.max_val_examples, int(manifest["splits"].get("val", {}).get("sequences", 0)))
        shards = {"seed": train.seed, "expected_tokenizer_hash": tokenizer_hash, "endpoint_url": train.endpoint_url}
        datasets = {
            "train": sequence_dataset(
                ft.data, "train", num_sequences=train.total_steps(seq_len) * train.global_batch_size, **shards
            )
        }
        if n_val:
            datasets["val"] = sequence_dataset(ft.data, "val", num_sequences=n_val, **shards)
        return TaskData(datasets, seq_len, n_val)
    rows_train, rows_val = task_rows(cfg)
    labels = (ft.labels or sorted({r["label"] for r in rows_train})) if ft.task == "classification" else None
    seq_len = task_seq_len(ft.task, enc, rows_train + rows_val, block_size)
    train_arrays = encode_rows(ft.task, enc, rows_train, seq_len, labels)
    val_arrays = encode_rows(ft.task, enc, rows_val, seq_len, labels)
    n_val = len(val_arrays["tokens"])
    print(
        f"[raylm] {ft.data}: {len(train_arrays['tokens'])} train / {n_val} val examples, {seq_len} tokens each"
        + (f", labels {labels}" if labels else ""),
        flush=True,
    )
    datasets = {
        "train": example_stream(
            train_arrays, train.total_steps(seq_len) * train.global_batch_size, train.seed, shuffle=True
        ),
        "val": example_stream(val_arrays, n_val, train.seed, shuffle=False),
    }
    return TaskData(datasets, seq_len, n_val, labels, rows_train, rows_val, val_arrays)


def before_after(cfg: FinetuneRunConfig, uri: str, data: TaskData, tuned: bool) -> dict:
    """Task metrics of the pretrained (tuned=False) or fine-tuned checkpoint on the val rows."""
    from orchestration.evaluate.lm import evaluate_lm
    from orchestration.evaluate.load import load_checkpoint_model
    from orchestration.finetune.scores import classifier_metrics, majority_accuracy, sft_metrics, zero_shot_metrics

    ft, endpoint_url, val = cfg.finetune, cfg.train.endpoint_url, data.val_arrays
    if ft.task in ("lm", "distill"):
        return evaluate_lm(uri, ft.data, max_sequences=ft.max_val_examples, endpoint_url=endpoint_url)
    if ft.task == "sft":
        model, _, enc, _ = load_checkpoint_model(uri, endpoint_url=endpoint_url)
        return sft_metrics(model, enc, val["tokens"], val["targets"], data.rows_val, sample_prompts=ft.sample_prompts)
    if tuned:
        model = load_classifier(uri, len(data.labels), endpoint_url)
        return classifier_metrics(model, val["tokens"], val["lengths"], val["labels"], data.labels)
    model, model_cfg, enc, _ = load_checkpoint_model(uri, endpoint_url=endpoint_url)
    return {
        "zero_shot": zero_shot_metrics(model, enc, data.rows_val, data.labels, max_len=model_cfg.block_size),
        "majority_class": majority_accuracy(data.rows_train, data.rows_val),
    }


def load_classifier(uri: str, num_classes: int, endpoint_url: Optional[str] = None):
    """A fine-tuned GPTClassifier (backbone + head files) in eval mode."""
    from safetensors.torch import load_file

    from model.classifier import GPTClassifier
    from orchestration.checkpoint_format import HEAD_FILE, MODEL_CONFIG_FILE
    from orchestration.evaluate.load import local_checkpoint_copy, resolve_checkpoint
    from orchestration.train.checkpoint import load_consolidated_state, load_weights

    local = local_checkpoint_copy(resolve_checkpoint(uri, endpoint_url), endpoint_url)
    state, cfg_dict, _, _ = load_consolidated_state(local)
    model = GPTClassifier(ModelConfig(**cfg_dict), num_classes)
    load_weights(model.backbone, state, f"{uri} ({MODEL_CONFIG_FILE})")
    model.head.load_state_dict({k[len("head.") :]: v for k, v in load_file(str(Path(local) / HEAD_FILE)).items()})
    return model.eval()


def run_finetune(cfg: FinetuneRunConfig, *, resume: bool = True) -> dict:
    """Fine-tune ``cfg.finetune.checkpoint`` on ``cfg.finetune.data``; return the summary (also written
    to ``<run dir>/finetune_summary.json`` and ``finetune.md``)."""
    from ray.train import CheckpointConfig

    from data_pipeline.tokenizer import encoding, load_spec, to_files
    from orchestration.artifacts import FINETUNE_MARKDOWN_FILE, FINETUNE_SUMMARY_FILE
    from orchestration.checkpoint_format import FINETUNE_FILE, checkpoint_dir_name
    from orchestration.evaluate.load import local_checkpoint_copy, resolve_checkpoint
    from orchestration.finetune.summary import summary_blocks
    from orchestration.finetune.task import finetune_task
    from orchestration.report.render import markdown
    from orchestration.train.driver import check_train_section, launch, resume_point, run_dir

    t0 = time.time()
    check_config(cfg)
    cfg = with_absolute_paths(cfg)
    ft, train = cfg.finetune, cfg.train
    distill = None
    if ft.task == "distill":  # the teacher, and the student: fresh (init_uri None) or from a checkpoint
        from orchestration.finetune.distill import check_same_distillation, distill_models

        distill = distill_models(cfg)
        init_uri, model_cfg, spec = distill.student_uri, distill.student, distill.spec
    else:
        init_uri = resolve_checkpoint(ft.checkpoint, train.endpoint_url)
        local = local_checkpoint_copy(init_uri, train.endpoint_url)
        model_cfg = checkpoint_model_config(local, cfg)
        spec = load_spec(local)

    # --- task data: token shards (lm, distill) or labelled rows tokenized here (classification, sft)
    tokenizer_uri = distill.teacher_uri if distill else init_uri
    data = task_data(cfg, encoding(spec), spec["hash"], model_cfg.block_size, tokenizer_uri)
    val_batches = data.n_val // (train.num_workers * train.micro_batch_size)
    if val_batches == 0:
        raise ConfigError(
            f"{ft.data}: {data.n_val} val examples are fewer than one micro-batch per worker "
            f"({train.num_workers} x {train.micro_batch_size}); fine-tuning needs a val split"
        )
    total_steps = train.total_steps(data.seq_len)
    check_train_section(train, total_steps)

    # --- run directory, resume, before-metrics
    run = run_dir(train)
    meta_now = {"seq_len": data.seq_len, "tokenizer_hash": spec["hash"], "data": ft.data, "base_checkpoint": init_uri}
    if distill:
        meta_now["teacher"] = distill.teacher_uri
    start = resume_point(run, cfg, meta_now, resume=resume)
    if distill and start:
        check_same_distillation(start[1], cfg, start[0], distill.teacher_uri)
    before = teacher = None
    if init_uri is not None:  # a fresh student has nothing to score before training
        print("[raylm] scoring the pretrained checkpoint on the val rows (before)", flush=True)
        before = before_after(cfg, init_uri, data, tuned=False)
    if distill:
        print(f"[raylm] scoring the teacher {distill.teacher_uri} on the val rows", flush=True)
        teacher = before_after(cfg, distill.teacher_uri, data, tuned=False)
    finetune_info = {
        "task": ft.task,
        "mode": ft.mode,
        "labels": data.labels,
        "base_checkpoint": init_uri,
        "data": ft.data,
        "seq_len": data.seq_len,
        "lora": (
            {"rank": ft.lora_rank, "alpha": ft.lora_alpha, "targets": ft.lora_targets} if ft.mode == "lora" else None
        ),
    }
    if distill:
        from model.flops import count_params

        finetune_info["distill"] = {
            "teacher": distill.teacher_uri,
            "temperature": ft.temperature,
            "alpha": ft.alpha,
            "teacher_params": count_params(distill.teacher),
            "student_params": count_params(distill.student),
        }
    plan = WorkerPlan(
        config=config_to_dict(cfg),
        train=train,
        model=model_cfg,
        run=run,
        seq_len=data.seq_len,
        total_steps=total_steps,
        start_sequence=0,
        val_batches=val_batches,
        checkpoint_files={**to_files(spec), FINETUNE_FILE: json.dumps(finetune_info, indent=2).encode()},
        checkpoint_meta=meta_now,
        resume_uri=start[0] if start else None,
        task={
            "finetune": ft,
            "init_uri": init_uri,
            "labels": data.labels,
            "teacher_uri": distill.teacher_uri if distill else None,
        },
    )
    # every evaluation checkpoints; Ray keeps the best num_to_keep by val loss, and always the latest
    trained = launch(
        cfg,
        plan,
        finetune_task,
        data.datasets,
        checkpoint_config=CheckpointConfig(
            num_to_keep=train.num_to_keep, checkpoint_score_attribute="val_loss", checkpoint_score_order="min"
        ),
    )

    # --- the best evaluation's checkpoint, scored the same way as the pretrained one
    records = trained["records"]
    evals = [r for r in records if "val_loss" in r]
    best = min(evals, key=lambda r: r["val_loss"])
    best_uri = run.uri_of(checkpoint_dir_name(best["step"]))
    print(f"[raylm] scoring the best checkpoint (step {best['step']}, val {best['val_loss']:.4f}) (after)", flush=True)
    after = before_after(cfg, best_uri, data, tuned=True)
    summary = {
        **finetune_info,
        "run_dir": run.uri,
        "best_checkpoint": best_uri,
        "best_step": best["step"],
        "final_step": records[-1]["step"],
        "total_steps": total_steps,
        "stopped_early": bool(evals[-1].get("stopped_early")),
        "trainable_params": records[-1]["trainable_params"],
        "train_examples": len(data.rows_train) or None,
        "val_examples": data.n_val,
        "before": before,
        "after": after,
        **({"teacher": teacher} if distill else {}),
        "wall_s": time.time() - t0,
    }
    run.write_json(FINETUNE_SUMMARY_FILE, summary)
    text = markdown(f"Fine-tune: {ft.task}, mode {ft.mode}", [("Before / after", summary_blocks(summary))])
    run.write_text(FINETUNE_MARKDOWN_FILE, text)
    print(text, flush=True)
    return summary
