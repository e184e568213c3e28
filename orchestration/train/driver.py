"""The one driver path every training job takes: validate -> plan -> TorchTrainer(worker_loop) -> summary.

``launch`` is shared by pretraining (``run_training``) and fine-tuning: run directory, resume or
branch, the same-run check, ``config.yaml``, the resource check, the trainer and its summary.
Everything that can be wrong with a run (missing manifest, shapes that do not fit, batch arithmetic,
resources) is checked before any worker starts. The driver reads only the manifest and the tokenizer
files; each worker reads its own rows of the token shards (``data_pipeline.loader.rank_batches``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from model.config import ModelConfig
from orchestration.artifacts import (
    STOP_REQUEST_FILE,
    RunDir,
    clear_stop_request,
    read_metrics,
    write_config,
    write_run_facts,
)
from orchestration.checkpoint_format import complete_checkpoint_meta, is_quantized, latest_complete_checkpoint
from orchestration.config import ConfigError, PretrainConfig, config_to_dict
from orchestration.runtime import extensions_dir, init_ray
from orchestration.train.config import TrainConfig
from orchestration.train.data_mixture import check_schedule, run_schedule, run_weights
from orchestration.train.plan import PrivacyPlan, WorkerPlan

RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train's list of a run's checkpoints
TEST_ENV_PREFIX = "RAYLM_TEST_"  # test hooks forwarded to workers (see loop.FAIL_AT_STEP_ENV)
# Checkpoint-meta keys and config fields a resumed run must share with its checkpoint: what changes
# the run (its data order, its batches, its shapes). Not num_workers (checkpoints reshard) nor
# micro_batch_size (gradient accumulation is re-derived; the global batch stays). A branch (a new
# run started from another run's checkpoint) may change the BRANCHABLE ones.
SAME_RUN_META = ("seq_len", "tokenizer_hash", "data", "mixture_weights")
SAME_RUN_FIELDS = (
    ("train", "seed"),
    ("train", "global_batch_size"),
    ("train", "zero_stage"),
    ("model", "n_layer"),
    ("model", "n_embd"),
    ("model", "n_head"),
    ("model", "document_masking"),
)
BRANCHABLE = {"train.seed", "data", "mixture_weights", "model.document_masking"}


def run_dir(train: TrainConfig) -> RunDir:
    """Where a run's outputs live: ``<train.storage_path>/<train.run_name>``."""
    return RunDir.at(f"{train.storage_path.rstrip('/')}/{train.run_name}", train.endpoint_url)


@dataclass(frozen=True)
class PretrainFacts:
    """What the driver looked up about a pretraining run's data before any worker starts."""

    manifest: dict
    seq_len: int
    vocab_size: int
    eos_id: int  # the tokenizer's end-of-text token: what ends a document in the packed rows
    tokenizer_hash: str
    total_steps: int
    val_batches: int  # val micro-batches per rank: the fixed set of train.val_sequences, split over ranks
    tokenizer_files: dict[str, bytes]


def validate(cfg: PretrainConfig) -> PretrainFacts:
    """Check a pretraining run against its data; raises ConfigError naming the key / URI and the fix.
    Reads the manifest and tokenizer files only."""
    from data_pipeline.manifest import read_manifest
    from data_pipeline.storage import join, read_bytes

    train = cfg.train
    if train.bias_probe and cfg.model.arch != "gpt":
        raise ConfigError(
            f"train.bias_probe scores a GPT's continuations; model.arch={cfg.model.arch!r} has none of the "
            "probe's shape: set train.bias_probe=false"
        )
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
    check_train_section(train, total_steps)
    val_sequences = min(train.val_sequences, int(manifest["splits"].get("val", {}).get("sequences", 0)))
    rows_per_rank = math.ceil(val_sequences / train.num_workers)
    val_batches = math.ceil(rows_per_rank / train.micro_batch_size)
    tok = manifest["tokenizer"]
    data_dir = manifest["uri"].rsplit("/", 1)[0]
    tokenizer_files = {
        name: read_bytes(join(data_dir, name), train.endpoint_url) for name in (tok["ranks_file"], tok["meta_file"])
    }
    if train.bias_probe:
        check_bias_probe_fits(tokenizer_files, cfg.model.block_size)
    if train.dp.enabled and cfg.model.arch != "gpt":
        raise ConfigError(
            "train.dp.enabled needs model.arch=gpt: Opacus has no per-sample gradients for the torch recurrent "
            f"layers of model.arch={cfg.model.arch!r}"
        )
    return PretrainFacts(
        manifest,
        seq_len,
        int(tok["n_vocab"]),
        int(tok["eot_token"]),
        tok["hash"],
        total_steps,
        val_batches,
        tokenizer_files,
    )


def resolve_model(model: ModelConfig, facts: PretrainFacts) -> ModelConfig:
    """The model a pretraining run trains: ``model`` with the data's vocabulary and, with
    document_masking, the data's end-of-text token as the token that ends a document."""
    if not model.document_masking:
        return dataclasses.replace(model, vocab_size=facts.vocab_size)
    if model.eos_id not in (None, facts.eos_id):
        raise ConfigError(
            f"model.eos_id={model.eos_id}, but the data's tokenizer ({facts.manifest['uri']}) ends documents "
            f"with token {facts.eos_id}; remove model.eos_id: document_masking takes the tokenizer's"
        )
    return dataclasses.replace(model, vocab_size=facts.vocab_size, eos_id=facts.eos_id)


def check_bias_probe_fits(tokenizer_files: dict[str, bytes], block_size: int) -> None:
    """train.bias_probe: every continuation the probe scores fits the model's context (checked before
    any worker starts, so a run never stops at its first eval for it)."""
    from data_pipeline import tokenizer as tok
    from orchestration.evaluate.suites import bias_pairs, load_bias_templates

    enc = tok.encoding(tok.from_files(tokenizer_files[tok.RANKS_FILE], tokenizer_files[tok.META_FILE]))
    longest = max(len(cont) for _, cont in bias_pairs(enc, load_bias_templates())[1])
    if longest > block_size:
        raise ConfigError(
            f"train.bias_probe: the probe's longest continuation is {longest} tokens with this tokenizer, longer "
            f"than model.block_size={block_size}; raise model.block_size or set train.bias_probe=false"
        )


def check_train_section(train: TrainConfig, total_steps: int) -> None:
    """The warm-up against the run's length, and ``train.deepspeed`` against DeepSpeed's own config."""
    if train.warmup_steps >= total_steps:
        raise ConfigError(f"train.warmup_steps ({train.warmup_steps}) must be < the run's {total_steps} steps")
    from orchestration.train.engine import check_deepspeed_passthrough

    try:
        check_deepspeed_passthrough(train)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def resume_point(
    run: RunDir, cfg, meta_now: dict, *, resume: bool, branch_from: Optional[str] = None
) -> Optional[tuple[str, dict]]:
    """(checkpoint URI, meta) the run continues from: its own newest complete checkpoint, else the
    ``branch_from`` checkpoint of another run; None for a fresh start. Raises ConfigError when the run
    exists and ``resume`` is off, or when the checkpoint was written by a different run shape/data."""
    from data_pipeline.cloud_auth import storage_hint
    from data_pipeline.storage import STORAGE_ERRORS, redact

    try:
        exists = run.exists()
    except STORAGE_ERRORS as err:  # an unreachable bucket or endpoint, refused credentials: say where to look
        raise ConfigError(
            f"train.storage_path: cannot reach {run.uri} ({redact(str(err))}); "
            f"{storage_hint(run.uri, 'train.endpoint_url')}"
        ) from None
    if exists and not resume:
        raise ConfigError(f"run directory {run.uri} already exists; pick another train.run_name or resume it")
    found = latest_complete_checkpoint(run) if exists else None
    branching = False
    if exists:
        set_aside_damaged_ray_snapshot(run, found[1]["step"] if found else None)
    if found is None and branch_from:
        branch = RunDir.at(branch_from, run.endpoint_url)
        meta = complete_checkpoint_meta(branch)
        if meta is None:
            raise ConfigError(f"branch checkpoint {branch.uri} is missing or incomplete; rerun the run it belongs to")
        if is_quantized(meta):
            raise ConfigError(
                f"branch checkpoint {branch.uri} holds quantized weights (`raylm quantize`), which nothing trains "
                f"on; branch from {meta.get('checkpoint', 'the checkpoint it was quantized from')}"
            )
        found, branching = (branch, meta), True
    if found is None:
        return None
    ckpt, meta = found
    check_same_run(meta, cfg, meta_now, ckpt.uri, branch=branching)
    print(f"[raylm] resuming {run.uri} from step {meta['step']} ({ckpt.uri})", flush=True)
    return ckpt.uri, meta


def set_aside_damaged_ray_snapshot(run: RunDir, resume_step: Optional[int]) -> None:
    """Ray Train restores from its own snapshot's newest checkpoint before the driver's pick, and refuses
    to start when a checkpoint it lists is gone. When a listed checkpoint is damaged or missing (a file
    deleted, an upload cut short), the snapshot is renamed aside (kept, not deleted) so the workers start
    from the newest complete checkpoint the driver chose; the damaged directory stays for inspection."""
    if not run.has(RAY_SNAPSHOT_FILE):
        return
    snapshot = run.read_json(RAY_SNAPSHOT_FILE)
    listed = [r["checkpoint_dir_name"] for r in snapshot.get("checkpoint_results", [])]
    damaged = [name for name in listed if complete_checkpoint_meta(run.child(name)) is None]
    if not damaged:
        return
    aside = f"{RAY_SNAPSHOT_FILE}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
    run.write_bytes(aside, run.read_bytes(RAY_SNAPSHOT_FILE))
    run.fs.delete_file(run.path_of(RAY_SNAPSHOT_FILE))
    where = f"step {resume_step}" if resume_step is not None else "the start"
    print(
        f"[raylm] warning: damaged or incomplete checkpoint(s) in {run.uri}: {', '.join(damaged)} (a file "
        f"missing or of the wrong size); skipped, resuming from {where}; Ray's snapshot listing them moved "
        f"to {aside}",
        flush=True,
    )


def check_same_run(meta: dict, cfg, meta_now: dict, uri: str, branch: bool = False) -> None:
    """A resumed run keeps what defines it (``SAME_RUN_FIELDS``, ``SAME_RUN_META``): its seed (the data
    order), global batch, shapes, tokenizer, sequence length and data. A ``branch`` (a new run from
    another run's checkpoint ``uri``) may change the seed and the data."""
    old = meta["config"]
    changed = []
    for section, key in SAME_RUN_FIELDS:
        if section not in old or key not in old[section] or not hasattr(getattr(cfg, section), key):
            continue
        before, now = old[section][key], getattr(getattr(cfg, section), key)
        if before != now:
            changed.append((f"{section}.{key}", before, now))
    changed += [
        (key, meta[key], meta_now[key])
        for key in SAME_RUN_META
        if key in meta and meta_now.get(key, meta[key]) != meta[key]
    ]
    changed = [c for c in changed if not (branch and c[0] in BRANCHABLE)]
    if not changed:
        return
    key, before, now = changed[0]
    if key in BRANCHABLE:
        fix = (
            f"to continue with the new {key} from there, start a new run from that checkpoint: "
            f"`raylm train ... train.run_name=<new name> --branch-from {uri}`"
        )
    else:
        fix = "to train with the new value, start over under a new train.run_name"
    raise ConfigError(
        f"{uri} was trained with {key}={before!r}, this run has {now!r}: resuming continues the same run, so "
        f"keep {key} as it was; {fix}"
    )


def adopt_recorded_batch(cfg, run: RunDir, branch_from: Optional[str] = None):
    """``cfg`` with the global batch its run's checkpoint recorded, when the config leaves the batch
    derived (neither train.global_batch_size nor train.grad_accum_steps given): resumed on another
    worker count or micro-batch, the run keeps its batch and re-derives gradient accumulation instead
    of being refused for a batch it never asked to change."""
    train = cfg.train
    if not train.batch_derived:
        return cfg
    try:
        found = latest_complete_checkpoint(run) if run.exists() else None
    except OSError:
        return cfg  # unreachable storage: resume_point says so, naming the key
    if found is None and branch_from:
        meta = complete_checkpoint_meta(RunDir.at(branch_from, run.endpoint_url))
        found = (None, meta) if meta else None
    recorded = found[1]["config"].get("train", {}).get("global_batch_size") if found else None
    if recorded is None or recorded == train.global_batch_size:
        return cfg
    try:
        resumed = dataclasses.replace(train, global_batch_size=recorded, grad_accum_steps=None)
    except ValueError as err:
        raise ConfigError(f"resuming {run.uri} with its recorded train.global_batch_size {recorded}: {err}") from None
    print(
        f"[raylm] keeping the run's global batch of {recorded} sequences (from its checkpoint): "
        f"{resumed.num_workers} workers x micro-batch {resumed.micro_batch_size} x {resumed.grad_accum_steps} "
        "accumulation steps",
        flush=True,
    )
    return dataclasses.replace(cfg, train=resumed)


def check_resources(train: TrainConfig, gpus_per_worker: Optional[float] = None) -> None:
    """Refuse a run the cluster can never hold: more than a Ray this process started has, or more than
    the node types of a cluster that publishes them allow. A joined cluster short of resources now may
    have an autoscaler: the run starts anyway, saying so; Ray Train's placement group asks for the
    nodes and its start is retried until they come up, for at most ``train.scale_up_timeout_s``."""
    from orchestration.runtime import cluster_capacity, joined_cluster

    workers = train.min_workers or train.num_workers  # an elastic run starts on as few as min_workers
    need = {"CPU": workers * train.cpus_per_worker}
    if train.use_gpu:
        need["GPU"] = workers * (1.0 if gpus_per_worker is None else gpus_per_worker)
    now, most = cluster_capacity()
    if all(now.get(k, 0) >= v for k, v in need.items()):
        return
    what = f"train.{'min_workers' if train.min_workers else 'num_workers'} x train.cpus_per_worker" + (
        " (and a GPU each: train.use_gpu)" if train.use_gpu else ""
    )
    have = ", ".join(f"{now.get(k, 0):g} {k}" for k in need)
    if not joined_cluster():
        raise ConfigError(
            f"{what} = {_resources(need)}, but this machine's Ray has {have}; lower them, or run on a "
            "cluster (RAY_ADDRESS, `raylm submit`)"
        )
    if most is not None and any(most.get(k, 0) < v for k, v in need.items()):
        raise ConfigError(
            f"{what} = {_resources(need)}, but the Ray cluster has {have} and its node types allow at most "
            f"{', '.join(f'{most.get(k, 0):g} {k}' for k in need)}; lower them or raise the node types' "
            "max_workers in the cluster file"
        )
    wait = "for as long as it takes" if train.scale_up_timeout_s < 0 else f"up to {train.scale_up_timeout_s:.0f} s"
    print(
        f"[raylm] the run needs {_resources(need)}; the cluster has {have} now: waiting {wait} "
        "(train.scale_up_timeout_s) for the autoscaler to add nodes",
        flush=True,
    )


def _resources(need: dict) -> str:
    return " + ".join(f"{v:g} {k}" for k, v in need.items())


CLUSTER_MAX_FAILURES = 3


def max_failures(train: TrainConfig) -> int:
    """Worker-group failures a run absorbs (restarting from its latest checkpoint): as configured, else
    3 on a cluster (a lost node or a crashed worker is routine there) and 0 on a Ray of the command's own."""
    from orchestration.runtime import joined_cluster

    if train.max_failures is not None:
        return train.max_failures
    return CLUSTER_MAX_FAILURES if joined_cluster() else 0


def start_retry_limit(train: TrainConfig) -> int:
    """Ray Train's retries of a worker-group start that timed out waiting for resources (each waits
    ``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S``, 60 s by default) that add up to ``scale_up_timeout_s``."""
    if train.scale_up_timeout_s < 0:
        return -1
    per_try = float(os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60"))
    return max(1, math.ceil(train.scale_up_timeout_s / per_try))


def resume_hint(run: RunDir) -> str:
    """What re-running a failed run does: resume from its newest complete checkpoint, or start over."""
    try:
        latest = latest_complete_checkpoint(run)
    except OSError as err:  # storage still unreachable (the outage that ended the run, say)
        return f"storage unreachable ({err}); once it is back, re-running resumes from its last complete checkpoint"
    if latest is None:
        return f"no complete checkpoint under {run.uri} yet: re-running starts from step 0"
    ckpt, meta = latest
    return f"re-running it resumes from step {meta['step']} ({ckpt.uri})"


def launch(
    cfg,
    plan: WorkerPlan,
    make_task: Callable,
    datasets: dict,
    *,
    callbacks: Sequence = (),
    gpus_per_worker: Optional[float] = None,
    checkpoint_config=None,
) -> dict:
    """Run ``plan`` with ``worker_loop`` on train.num_workers Ray Train workers; returns {run_dir,
    final_step, final_loss, final_val_loss, tokens, checkpoint, records}. Writes config.yaml first."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from orchestration.train.loop import worker_loop
    from orchestration.train.progress import ProgressPrinter
    from orchestration.train.rendezvous import LoopbackStoreConfig
    from orchestration.train.trackers import TrackerError, check_trackers

    train = cfg.train
    if train.dp.enabled and plan.privacy is None:
        raise ConfigError(
            f"train.dp.enabled is implemented for pretraining (`raylm train`), not for the {make_task.__name__} "
            "job: set train.dp.enabled=false"
        )
    try:
        check_trackers(train.trackers)
    except TrackerError as err:
        raise ConfigError(f"train.trackers: {err}") from None
    run = plan.run
    init_ray()
    check_resources(train, gpus_per_worker)
    if clear_stop_request(run):  # left by `raylm stop` for an earlier launch: this one is meant to train
        print(f"[raylm] removed {run.uri_of(STOP_REQUEST_FILE)} left from an earlier `raylm stop`", flush=True)
    write_config(run, plan.config)
    write_run_facts(
        run,
        {
            "task": make_task.__name__,
            "model": dataclasses.asdict(plan.model),
            "seq_len": plan.seq_len,
            "total_steps": plan.total_steps,
            "num_workers": train.num_workers,
            "global_batch_size": train.global_batch_size,
            **plan.checkpoint_meta,
        },
    )
    for ds in datasets.values():
        # Each worker re-iterates these streams; per-iteration progress bars from every worker flood
        # the log, and the loop already reports throughput and data-wait time every log_interval.
        ds.context.enable_progress_bars = False
        ds.context.enable_operator_progress_bars = False
    resources = {"CPU": train.cpus_per_worker}
    if train.use_gpu and gpus_per_worker is not None:
        resources["GPU"] = gpus_per_worker
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"plan": plan, "make_task": make_task},
        torch_config=LoopbackStoreConfig(),  # rank 0's rendezvous store on 127.0.0.1 on a local Ray
        scaling_config=ScalingConfig(
            num_workers=(train.min_workers, train.num_workers) if train.min_workers else train.num_workers,
            use_gpu=train.use_gpu,
            resources_per_worker=resources,
            elastic_resize_monitor_interval_s=train.resize_check_interval_s,
        ),
        run_config=RunConfig(
            name=run.name,
            storage_path=run.parent_path if "://" in run.uri else run.uri.rsplit("/", 1)[0],
            storage_filesystem=run.fs if "://" in run.uri else None,
            failure_config=FailureConfig(
                max_failures=max_failures(train), controller_failure_limit=start_retry_limit(train)
            ),
            checkpoint_config=checkpoint_config or CheckpointConfig(num_to_keep=train.num_to_keep),
            worker_runtime_env={"env_vars": _worker_env(train)},
            callbacks=list(callbacks),
        ),
        datasets=datasets,
        dataset_config=_data_config(),
    )
    progress = ProgressPrinter(run, plan.total_steps).start()
    finished = False
    try:
        result = trainer.fit()  # raises the run's error (a worker's, or Ray Train's controller's)
        finished = True
    finally:
        progress.stop()
        if not finished:
            print(f"[raylm] the run failed: {resume_hint(run)}", flush=True)
    records = read_metrics(run)
    last = records[-1] if records else {}
    val = [r for r in records if "val_loss" in r]
    checkpoint = None
    if result.checkpoint is not None:
        checkpoint = run.uri_of(result.checkpoint.path.rstrip("/").rsplit("/", 1)[-1])
    summary = {
        "run_dir": run.uri,
        "final_step": last.get("step", 0),
        "final_loss": last.get("loss"),
        "final_val_loss": val[-1]["val_loss"] if val else None,
        "tokens": last.get("tokens", 0),
        "checkpoint": checkpoint,
        "records": records,
    }
    print(
        f"[raylm] done: step {summary['final_step']}, loss {summary['final_loss']}, val {summary['final_val_loss']}; "
        f"run dir {run.uri}; checkpoint {checkpoint}",
        flush=True,
    )
    if last.get("stopped_on_request"):
        summary["stopped_on_request"] = True
        print(
            f"[raylm] stopped on request at step {summary['final_step']} of {plan.total_steps}: the same "
            "command (without --no-resume) resumes from that checkpoint",
            flush=True,
        )
    return summary


def run_training(
    cfg: PretrainConfig,
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
    final_val_loss, tokens, wall_s, checkpoint, records}.

    Hooks for Tune trials and sweeps: ``callbacks`` are Ray Train ``UserCallback``s (e.g. Tune's
    ``TuneReportCallback``); ``gpus_per_worker`` (with use_gpu) asks each worker for that share of
    a GPU, so fractional values pack several small trials on one GPU; ``branch_from`` is a complete
    checkpoint URI of another run with the same shapes that a *new* run directory starts from (its
    step, data position, weights and optimizer), e.g. a WSD decay branch off a stable-phase run.
    """
    from data_pipeline.shards import BLOCK_ROWS
    from orchestration.config import with_absolute_paths
    from orchestration.train.task import pretrain_task

    t0 = time.time()
    cfg = with_absolute_paths(cfg)  # workers run in Ray's own working directory
    run = run_dir(cfg.train)
    if resume:
        cfg = adopt_recorded_batch(cfg, run, branch_from)
    train = cfg.train
    facts = validate(cfg)
    meta_now = {"seq_len": facts.seq_len, "tokenizer_hash": facts.tokenizer_hash, "data": facts.manifest["uri"]}
    weights = run_weights(train, facts.manifest)
    if weights is not None:
        meta_now["mixture_weights"] = weights
    start = resume_point(run, cfg, meta_now, resume=resume, branch_from=branch_from)
    task = {"manifest": facts.manifest}  # ranks find row groups through the index files it names
    if weights is not None:
        task["mixture_schedule"] = meta_now["mixture_schedule"] = run_schedule(
            weights, facts.manifest, start[1] if start else None
        )
        check_schedule(train, facts.manifest, task["mixture_schedule"], facts.total_steps)

    resolved = dataclasses.replace(cfg, model=resolve_model(cfg.model, facts))
    if facts.val_batches == 0:
        print("[raylm] the data has no val split: no eval", flush=True)
    per_rank = train.global_batch_size // train.num_workers
    if per_rank % BLOCK_ROWS:
        print(
            f"[raylm] note: each rank trains on {per_rank} rows per step, not a multiple of the shards' "
            f"{BLOCK_ROWS}-row blocks: ranks read some rows they do not train on",
            flush=True,
        )
    privacy = None
    if train.dp.enabled:
        privacy = privacy_plan(train, facts.manifest, facts.total_steps)
    plan = WorkerPlan(
        config=config_to_dict(resolved),
        train=train,
        model=resolved.model,
        run=run,
        seq_len=facts.seq_len,
        total_steps=facts.total_steps,
        start_sequence=0,
        val_batches=facts.val_batches,
        checkpoint_files=facts.tokenizer_files,
        checkpoint_meta=meta_now,
        resume_uri=start[0] if start else None,
        task=task,
        privacy=privacy,
    )
    summary = launch(cfg, plan, pretrain_task, {}, callbacks=callbacks, gpus_per_worker=gpus_per_worker)
    return {**summary, "wall_s": time.time() - t0}


def privacy_plan(train: TrainConfig, manifest: dict, total_steps: int) -> PrivacyPlan:
    """DP-SGD's resolved parameters for this run (``orchestration.train.dp.resolve_privacy``), announced."""
    from orchestration.train.dp import resolve_privacy

    rows = sum(int(shard["sequences"]) for shard in manifest["splits"]["train"]["shards"])
    try:
        privacy = resolve_privacy(train, rows, total_steps)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    print(
        f"[raylm] DP-SGD (Opacus): noise multiplier {privacy.noise_multiplier:.4g}, per-row clip "
        f"{privacy.max_grad_norm:g}, Poisson sample rate {privacy.sample_rate:.4g} ({train.global_batch_size} of "
        f"{rows} rows expected per step), delta {privacy.delta:g}: epsilon {privacy.expected_epsilon:.3g} after "
        f"{total_steps} steps",
        flush=True,
    )
    return privacy


def _worker_env(train: TrainConfig) -> dict:
    env = {"TORCH_EXTENSIONS_DIR": extensions_dir()}
    if "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S" in os.environ:
        env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"]
    if not train.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    from orchestration.train.trackers import TRACKER_ENV_PREFIXES

    env.update({k: v for k, v in os.environ.items() if k.startswith((TEST_ENV_PREFIX, *TRACKER_ENV_PREFIXES))})
    return env


def _data_config():
    """Ray Data streams (fine-tuning's examples): every worker iterates the unsplit stream in position
    order and keeps its own positions.

    Ray Train's ingest options replace the dataset's own, and their default lets blocks arrive out of
    order: micro-batches would then differ between runs and a resumed run would not repeat an
    uninterrupted one. So order is preserved explicitly.
    """
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return DataConfig(datasets_to_split=[], execution_options=options)
