"""Trial plumbing shared by the search (``sweeps.tune``) and the scaling sweep (``sweeps.scaling``).

Each trial is a Tune *function trainable* that runs ``run_training`` (a TorchTrainer). Ray Train V2
cannot be handed to a ``Tuner`` directly; the function holds no resources of its own and the
TorchTrainer's workers ask for theirs, so trials queue on worker resources. Reports reach Tune
through Ray Train's ``TuneReportCallback``, filtered to records carrying ``val_loss``.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Optional

from orchestration.artifacts import RunDir
from orchestration.config import ConfigError, PretrainConfig, build_dataclass


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


def trial_resources(train, gpu_per_trial: Optional[float]) -> Optional[float]:
    """Check a trial's GPU share; returns gpus_per_worker for run_training (None: Ray Train's default)."""
    if gpu_per_trial is None:
        return None
    if not train.use_gpu:
        raise ConfigError("gpu_per_trial needs train.use_gpu: true")
    if train.num_workers > 1 and gpu_per_trial < 1:
        raise ConfigError(
            f"gpu_per_trial={gpu_per_trial} shares a GPU between trials, which only single-worker "
            f"trials can do (train.num_workers={train.num_workers}); set num_workers: 1 or gpu_per_trial: 1"
        )
    return gpu_per_trial


def default_concurrency(train, gpus_per_worker: Optional[float], requested: Optional[int]) -> int:
    """How many trials run at once: as asked, else as many as the cluster's CPUs (and GPUs) hold, or
    can hold once its autoscaler has added the nodes its node types allow (where it publishes them)."""
    from orchestration.runtime import cluster_capacity

    if requested is not None:
        return requested
    now, most = cluster_capacity()
    resources = {k: max(now.get(k, 0), (most or {}).get(k, 0)) for k in ("CPU", "GPU")}
    fit = resources.get("CPU", 1) // max(train.num_workers * train.cpus_per_worker, 1e-9)
    if train.use_gpu:
        fit = min(fit, resources.get("GPU", 0) // (train.num_workers * (gpus_per_worker or 1.0)))
    return max(1, int(fit))


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
