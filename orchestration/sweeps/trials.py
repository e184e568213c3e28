"""Trial plumbing shared by the search (``sweeps.tune``) and the scaling sweep (``sweeps.scaling``).

Each trial is a Tune *function trainable* that runs ``run_training`` (a TorchTrainer). Ray Train V2
cannot be handed to a ``Tuner`` directly; the function holds no resources of its own and the
TorchTrainer's workers ask for theirs, so trials queue on worker resources. Reports reach Tune
through Ray Train's ``TuneReportCallback``, filtered to records carrying ``val_loss``. What a trial's
workers hold (``gpus_per_trial``: a GPU each, a share of one, or none), how many trials run at once
(planned from the cluster's CPUs and GPUs, measured from the trials' wall-time spans) are here too.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

from orchestration.artifacts import RunDir
from orchestration.config import ConfigError, PretrainConfig, build_dataclass
from orchestration.train.config import TrainConfig


def function_trainable(fn: Callable, **params):
    """``fn(config, **params)`` as a Tune trainable asking for no resources of its own
    (``{"cpu": 0, "memory": 1}``: an all-zero request is refused)."""
    from ray import tune

    return tune.with_resources(tune.with_parameters(fn, **params), {"cpu": 0, "memory": 1})


def tune_storage(where: RunDir) -> dict:
    """Tune's ``storage_path`` / ``storage_filesystem`` for an experiment directory ``where``."""
    if "://" not in where.uri:
        return {"storage_path": where.uri.rsplit("/", 1)[0]}
    return {"storage_path": where.parent_path, "storage_filesystem": where.fs}


def resolve_trial_config(base: dict, overrides: dict, **train_fields: Any) -> PretrainConfig:
    """The pretraining part of config dict ``base`` with dotted-path ``overrides`` (and train fields)
    set, validated: what one trial trains."""
    tree = {name: copy.deepcopy(base[name]) for name in ("model", "data", "train")}
    for path, value in overrides.items():
        node = tree
        *parents, leaf = path.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value.item() if hasattr(value, "item") else value  # numpy scalars from samplers
    tree["train"].update(train_fields)
    return build_dataclass(PretrainConfig, tree, source=f"trial overrides {overrides}")


def val_loss_callback():
    """Ray Train's TuneReportCallback forwarding only reports that carry ``val_loss``.

    Tune's scheduler and searcher need the metric in every result; the loop logs train-only records
    between evals. Must be built inside a Tune trial.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    class ValLossReportCallback(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if "val_loss" in metrics[0]:
                super().after_report(run_context, metrics, checkpoint)

    return ValLossReportCallback()


@dataclass(frozen=True)
class TrialResources:
    """How each trial of a sweep runs: the train section it starts from, the GPU share handed to
    ``run_training`` and what each of its workers holds, as Ray Train asks for it."""

    train: TrainConfig  # use_gpu false (precision, compile at their CPU defaults) for CPU-only trials
    gpus_per_worker: Optional[float]  # run_training's: None = Ray Train's default (a whole GPU each with use_gpu)
    worker: dict[str, float]  # {"CPU": c} or {"CPU": c, "GPU": g}, per worker

    @property
    def per_trial(self) -> dict[str, float]:
        return {k: v * self.train.num_workers for k, v in self.worker.items()}


def trial_resources(train: TrainConfig, gpus_per_trial: Optional[float], key: str) -> TrialResources:
    """Resolve ``gpus_per_trial`` (the config key ``key``, e.g. tune.gpus_per_trial) against the train section.

    None: as the train section says (a whole GPU per worker with use_gpu). 0: CPU-only trials: use_gpu
    false, and precision / compile back to their CPU defaults (fp32, off), since a GPU config's bf16 and
    torch.compile are choices for the GPU. In (0, 1]: single-worker trials each holding that share of
    one GPU (0.25: four on a GPU). No Ray needed; raises ConfigError naming ``key`` and the fix.
    """
    if gpus_per_trial == 0 and train.use_gpu:
        train = dataclasses.replace(train, use_gpu=False, precision=None, compile=None)
    gpus_per_worker = None if not gpus_per_trial else gpus_per_trial
    if gpus_per_worker is not None and not train.use_gpu:
        raise ConfigError(
            f"{key}={gpus_per_trial:g} gives each trial a share of a GPU, but train.use_gpu is false; "
            f"set train.use_gpu: true, or {key}: 0 for CPU-only trials"
        )
    if gpus_per_worker is not None and train.num_workers > 1:
        raise ConfigError(
            f"{key}={gpus_per_trial:g} is the GPU share of a single-worker trial, but train.num_workers="
            f"{train.num_workers} (the ranks of one run cannot share a GPU); set train.num_workers: 1 to pack "
            f"trials onto GPUs, or {key}: null for a whole GPU per worker"
        )
    worker = {"CPU": train.cpus_per_worker}
    if train.use_gpu:
        worker["GPU"] = 1.0 if gpus_per_worker is None else gpus_per_worker
    return TrialResources(train=train, gpus_per_worker=gpus_per_worker, worker=worker)


def trial_concurrency(resources: TrialResources, capacity: dict[str, float], requested: Optional[int]) -> int:
    """How many trials run at once (Tune's max_concurrent_trials): ``requested`` if set, else as many
    as ``capacity`` ({"CPU": n, "GPU": m}) holds of the trial's resources, at least one."""
    if requested is not None:
        return requested
    # Ray accounts fractional resources to 1e-4: 0.3 GPUs hold three trials of 0.1
    fits = [math.floor(capacity.get(k, 0.0) / need + 1e-6) for k, need in resources.per_trial.items() if need > 0]
    return max(1, min(fits, default=1))


def default_concurrency(resources: TrialResources, requested: Optional[int]) -> int:
    """``trial_concurrency`` on the cluster's CPUs and GPUs, or on what it can hold once its autoscaler
    has added the nodes its node types allow (where it publishes them)."""
    from orchestration.runtime import cluster_capacity

    now, most = cluster_capacity()
    capacity = {k: max(now.get(k, 0.0), (most or {}).get(k, 0.0)) for k in ("CPU", "GPU")}
    return trial_concurrency(resources, capacity, requested)


def peak_concurrency(spans: list[tuple[float, float]], resolution_s: float = 0.0) -> int:
    """The most (start, end) wall-time spans open at one moment; spans within ``resolution_s`` of
    each other's end do not count as overlapping (timestamps rounded to it cannot tell)."""
    return max(
        (
            sum(1 for j, (s2, e2) in enumerate(spans) if j == i or (s2 <= start < e2 - resolution_s))
            for i, (start, _) in enumerate(spans)
        ),
        default=0,
    )


def concurrency_summary(
    resources: TrialResources, gpus_per_trial: Optional[float], planned: Optional[int], spans: list
) -> dict:
    """The ``concurrency`` record of tune_results.json and scaling_points.json: what each trial held,
    how many Tune was allowed to run at once (None: no trial ran) and the most that did (from the
    trials' (start, end) ``spans``, at 1 s: Tune's timestamps are whole seconds)."""
    return {
        "gpus_per_trial": gpus_per_trial,
        "use_gpu": resources.train.use_gpu,
        "workers_per_trial": resources.train.num_workers,
        "resources_per_worker": resources.worker,
        "max_concurrent_trials": planned,
        "peak_concurrent_trials": peak_concurrency(spans, resolution_s=1.0) if spans else None,
        "trials_timed": len(spans),
    }


def concurrency_line(record: dict) -> str:
    """One console line from a ``concurrency`` record."""
    held = ", ".join(f"{v:g} {k}" for k, v in record["resources_per_worker"].items())
    planned = record["max_concurrent_trials"]
    peak = record["peak_concurrent_trials"]
    return (
        f"trials at once: planned {planned if planned is not None else '- (no trial ran)'} "
        f"(max_concurrent_trials; each trial {record['workers_per_trial']} worker(s) x {held}), "
        f"measured peak {peak if peak is not None else '-'} over {record['trials_timed']} timed trial(s)"
    )


def check_has_val(cfg: PretrainConfig):
    """``train.driver.validate`` plus: the run must evaluate (the metric is val_loss). Returns its facts."""
    from orchestration.train.driver import validate

    facts = validate(cfg)
    if facts.val_batches == 0:
        raise ConfigError(
            f"{cfg.train.data}: the val split is empty, so there is no val_loss to optimize; prepare with a "
            "larger data.output.val_fraction"
        )
    return facts
