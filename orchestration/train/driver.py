"""The training driver: validate -> plan -> TorchTrainer(train_loop_per_worker) -> summary.

Everything that can be wrong with a run (missing manifest, shapes that do not fit, batch arithmetic,
resources) is checked here, before any worker starts. The driver reads only the manifest and the
tokenizer files; Ray Data streams the token shards straight to the workers.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Optional, Sequence

import yaml

from orchestration.config import Config, ConfigError, config_to_dict
from orchestration.runtime import DEFAULT_EXTENSIONS_DIR, init_ray
from orchestration.train.checkpoint import latest_complete_checkpoint

TEST_ENV_PREFIX = "RAYLM_TEST_"  # test hooks forwarded to workers (see train_loop.FAIL_AT_STEP_ENV)


def run_uri(cfg: Config) -> str:
    """Where a run's outputs live: ``<train.storage_path>/<train.run_name>``."""
    storage = cfg.train.storage_path
    if "://" not in storage:
        storage = str(Path(storage).expanduser().absolute())
    return f"{storage.rstrip('/')}/{cfg.train.run_name}"


def validate(cfg: Config) -> dict:
    """Check the run against its data and return the facts the workers need (the ``plan``).

    Raises ConfigError naming the key / URI and the fix. Reads the manifest and tokenizer files only.
    """
    from data_pipeline.loader import read_manifest
    from data_pipeline.storage import join, read_bytes

    train = cfg.train
    try:
        manifest = read_manifest(train.data, endpoint_url=train.endpoint_url)
    except Exception as err:  # the loader's own error names the URI; add which key pointed there
        raise ConfigError(
            f"train.data = {train.data!r}: cannot read the data manifest ({err}); run "
            "`raylm prepare` first or point train.data at its manifest.json"
        ) from err
    seq_len = int(manifest["seq_len"])
    if seq_len > cfg.model.block_size:
        raise ConfigError(
            f"the manifest's seq_len ({seq_len}) is longer than model.block_size "
            f"({cfg.model.block_size}); set model.block_size={seq_len} or re-prepare with a "
            "shorter output.seq_len"
        )
    total_steps = train.total_steps(seq_len)
    if train.warmup_steps >= total_steps:
        raise ConfigError(f"train.warmup_steps ({train.warmup_steps}) must be < the run's {total_steps} steps")
    val_sequences = int(manifest["splits"].get("val", {}).get("sequences", 0))
    val_batches = min(train.eval_steps, val_sequences // (train.num_workers * train.micro_batch_size))
    tok = manifest["tokenizer"]
    data_dir = manifest["uri"].rsplit("/", 1)[0]
    tokenizer_files = {
        name: read_bytes(join(data_dir, name), train.endpoint_url) for name in (tok["ranks_file"], tok["meta_file"])
    }
    return {
        "manifest": manifest,
        "seq_len": seq_len,
        "vocab_size": int(tok["n_vocab"]),
        "tokenizer_hash": tok["hash"],
        "total_steps": total_steps,
        "val_batches": val_batches,
        "tokenizer_files": tokenizer_files,
    }


def _worker_resources(train, gpus_per_worker: Optional[float]) -> dict:
    resources = {"CPU": train.cpus_per_worker}
    if train.use_gpu and gpus_per_worker is not None:
        resources["GPU"] = gpus_per_worker
    return resources


def _check_resources(train, gpus_per_worker: Optional[float] = None) -> None:
    import ray

    resources = ray.cluster_resources()
    need_cpu = train.num_workers * train.cpus_per_worker
    if resources.get("CPU", 0) < need_cpu:
        raise ConfigError(
            f"train.num_workers x train.cpus_per_worker = {need_cpu} CPUs but the Ray cluster "
            f"has {resources.get('CPU', 0)}; lower them or add nodes"
        )
    need_gpu = train.num_workers * (1.0 if gpus_per_worker is None else gpus_per_worker)
    if train.use_gpu and resources.get("GPU", 0) < need_gpu:
        raise ConfigError(
            f"train.use_gpu with {train.num_workers} workers needs {need_gpu} GPUs; "
            f"the Ray cluster has {resources.get('GPU', 0)}"
        )


def _branch_checkpoint(uri: str, endpoint_url: Optional[str]) -> tuple[str, dict]:
    """(uri, meta) of the complete checkpoint a branch run starts from."""
    from data_pipeline.storage import filesystem_for
    from orchestration.train.checkpoint import is_complete

    fs, path = filesystem_for(uri, endpoint_url)
    meta = is_complete(fs, path)
    if meta is None:
        raise ConfigError(f"branch checkpoint {uri} is missing or incomplete; rerun the run it belongs to")
    return uri.rstrip("/"), meta


def _storage(cfg: Config):
    """(pyarrow filesystem, path of the run dir, RunConfig storage_path, storage_filesystem or None)."""
    from data_pipeline.storage import filesystem_for

    uri = run_uri(cfg)
    fs, path = filesystem_for(uri, cfg.train.endpoint_url)
    storage_fs = fs if cfg.train.storage_path.startswith("s3://") and cfg.train.endpoint_url else None
    storage_path = path.rsplit("/", 1)[0] if storage_fs is not None else uri.rsplit("/", 1)[0]
    return fs, path, storage_path, storage_fs


def _worker_env(train) -> dict:
    env = {
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", DEFAULT_EXTENSIONS_DIR),
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2"),
    }
    if not train.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    env.update({k: v for k, v in os.environ.items() if k.startswith(TEST_ENV_PREFIX)})
    return env


def run_training(
    cfg: Config,
    *,
    resume: bool = True,
    callbacks: Sequence = (),
    gpus_per_worker: Optional[float] = None,
    branch_from: Optional[str] = None,
) -> dict:
    """Pretrain ``cfg.model`` on ``cfg.train.data`` with Ray Train + DeepSpeed; return a summary.

    The run directory ``<storage_path>/<run_name>`` gets the resolved config, ``metrics.jsonl`` and
    ``checkpoint_<step>/`` directories. With ``resume`` (default) a run name that already has a
    complete checkpoint continues from it (model, optimizer, schedule, data position, RNG); without
    it, an existing run directory is an error. Returns {run_dir, final_step, final_loss,
    final_val_loss, tokens, wall_s, checkpoint}.

    Hooks for Tune trials and sweeps: ``callbacks`` are Ray Train ``UserCallback``s (e.g. Tune's
    ``TuneReportCallback``); ``gpus_per_worker`` (with use_gpu) asks each worker for that share of
    a GPU, so fractional values pack several small trials on one GPU; ``branch_from`` is a complete
    checkpoint URI of another run with the same shapes that a *new* run directory starts from (its
    step, data position, weights and optimizer), e.g. a WSD decay branch off a stable-phase run.
    """
    from data_pipeline.loader import sequence_dataset
    from data_pipeline.storage import write_bytes
    from orchestration.train.loop import train_loop_per_worker
    from orchestration.train.throughput import read_metrics

    t0 = time.time()
    train = cfg.train
    facts = validate(cfg)
    fs, run_path, _, _ = _storage(cfg)
    uri = run_uri(cfg)
    run_exists = fs.get_file_info(run_path).type.name == "Directory"
    if run_exists and not resume:
        raise ConfigError(f"run directory {uri} already exists; pick another train.run_name or resume it")
    latest = latest_complete_checkpoint(uri, train.endpoint_url) if resume and run_exists else None
    if latest is None and branch_from:
        latest = _branch_checkpoint(branch_from, train.endpoint_url)
    start_step = latest[1]["step"] if latest else 0
    if latest:
        _check_same_run(latest[1], cfg, uri)
        print(f"[raylm] resuming {uri} from step {start_step} ({latest[0]})", flush=True)
    start_sequence = start_step * train.global_batch_size
    total_sequences = facts["total_steps"] * train.global_batch_size

    init_ray()
    _check_resources(train, gpus_per_worker)
    resolved = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=facts["vocab_size"]))
    write_bytes(fs, f"{run_path}/config.yaml", yaml.safe_dump(config_to_dict(resolved), sort_keys=False).encode())

    datasets = {
        "train": sequence_dataset(
            train.data,
            "train",
            seed=train.seed,
            start_sequence=start_sequence,
            num_sequences=total_sequences - start_sequence,
            expected_tokenizer_hash=facts["tokenizer_hash"],
            expected_seq_len=facts["seq_len"],
            endpoint_url=train.endpoint_url,
        )
    }
    if facts["val_batches"] > 0:
        datasets["val"] = sequence_dataset(
            train.data,
            "val",
            seed=train.seed,
            num_sequences=facts["val_batches"] * train.num_workers * train.micro_batch_size,
            expected_tokenizer_hash=facts["tokenizer_hash"],
            expected_seq_len=facts["seq_len"],
            endpoint_url=train.endpoint_url,
        )
    else:
        print("[raylm] the val split is smaller than one micro-batch per worker: no eval", flush=True)
    for ds in datasets.values():
        # Each worker re-iterates these streams; per-iteration progress bars from every worker flood
        # the log, and the loop already reports throughput and data-wait time every log_interval.
        ds.context.enable_progress_bars = False
        ds.context.enable_operator_progress_bars = False
    plan = {
        "config": config_to_dict(resolved),
        "vocab_size": facts["vocab_size"],
        "seq_len": facts["seq_len"],
        "total_steps": facts["total_steps"],
        "start_sequence": start_sequence,
        "val_batches": facts["val_batches"],
        "tokenizer_files": facts["tokenizer_files"],
        "resume_uri": latest[0] if latest else None,
    }
    trainer = make_trainer(
        cfg, train_loop_per_worker, plan, datasets, callbacks=callbacks, gpus_per_worker=gpus_per_worker
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    records = read_metrics(fs, f"{run_path}/metrics.jsonl")
    last = records[-1] if records else {}
    val = [r for r in records if "val_loss" in r]
    summary = {
        "run_dir": uri,
        "final_step": last.get("step", start_step),
        "final_loss": last.get("loss"),
        "final_val_loss": val[-1]["val_loss"] if val else None,
        "tokens": last.get("tokens", 0),
        "wall_s": time.time() - t0,
        "checkpoint": _checkpoint_uri(result, uri),
    }
    print(
        f"[raylm] done: step {summary['final_step']}, loss {summary['final_loss']}, val {summary['final_val_loss']}; "
        f"run dir {uri}; checkpoint {summary['checkpoint']}",
        flush=True,
    )
    return summary


def make_trainer(
    cfg: Config,
    loop,
    plan: dict,
    datasets: dict,
    *,
    callbacks: Sequence = (),
    gpus_per_worker: Optional[float] = None,
    checkpoint_config=None,
):
    """The TorchTrainer every raylm job runs: ``loop(plan)`` on train.num_workers workers, the run dir as
    Ray's storage, worker-failure retries, ordered data ingest and the worker environment."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    train = cfg.train
    _, _, storage_path, storage_fs = _storage(cfg)
    return TorchTrainer(
        loop,
        train_loop_config=plan,
        scaling_config=ScalingConfig(
            num_workers=train.num_workers,
            use_gpu=train.use_gpu,
            resources_per_worker=_worker_resources(train, gpus_per_worker),
        ),
        run_config=RunConfig(
            name=train.run_name,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            failure_config=FailureConfig(max_failures=train.max_failures),
            checkpoint_config=checkpoint_config or CheckpointConfig(num_to_keep=train.num_to_keep),
            worker_runtime_env={"env_vars": _worker_env(train)},
            callbacks=list(callbacks),
        ),
        datasets=datasets,
        dataset_config=_data_config(),
    )


def _data_config():
    """Every worker streams the whole unsplit dataset in position order and keeps its own positions.

    Ray Train's ingest options replace the dataset's own, and their default lets blocks arrive out of
    order: micro-batches would then differ between runs and a resumed run would not repeat an
    uninterrupted one. So order is preserved explicitly.
    """
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return DataConfig(datasets_to_split=[], execution_options=options)


def _check_same_run(meta: dict, cfg: Config, uri: str) -> None:
    """A resumed run must keep the shapes its checkpoint was written with."""
    old = meta["config"]
    for section, key in (
        ("train", "num_workers"),
        ("train", "global_batch_size"),
        ("train", "micro_batch_size"),
        ("train", "zero_stage"),
        ("model", "n_layer"),
        ("model", "n_embd"),
        ("model", "n_head"),
    ):
        before, now = old[section][key], getattr(getattr(cfg, section), key)
        if before != now:
            raise ConfigError(
                f"{uri} was trained with {section}.{key}={before}, this config has {now}; "
                "resume with the original value or use a new train.run_name"
            )


def _checkpoint_uri(result, uri: str) -> Optional[str]:
    if result.checkpoint is None:
        return None
    return f"{uri}/{result.checkpoint.path.rstrip('/').rsplit('/', 1)[-1]}"
