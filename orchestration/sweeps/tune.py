"""Hyperparameter search with Ray Tune over the Ray Train pretraining run (``raylm tune``).

Each trial is a Tune *function trainable* that runs ``run_training`` (a TorchTrainer) on its
sampled config overrides. Ray Train V2 cannot be handed to a ``Tuner`` directly; the function holds
no resources of its own (``{"cpu": 0, "memory": 1}``, an all-zero request is refused) and the
TorchTrainer's workers ask for theirs, so trials queue on worker resources. Reports reach Tune
through Ray Train's ``TuneReportCallback``, filtered to records carrying ``val_loss``, with the
optimizer step as ASHA's clock. Outputs in ``<tune.storage_path>/<tune.name>/``: Tune's experiment
state (restored when the command is re-run), ``runs/<trial_id>/`` (each trial's run directory),
``tune_results.json`` and ``best_config.yaml``.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Optional

from orchestration.artifacts import BEST_CONFIG_FILE, TUNE_RESULTS_FILE, RunDir, write_config
from orchestration.config import ConfigError, PretrainConfig, TuneRunConfig, config_to_dict, with_absolute_paths
from orchestration.sweeps.trials import (
    check_has_val,
    default_concurrency,
    function_trainable,
    resolve_trial_config,
    trial_resources,
    tune_storage,
    val_loss_callback,
)

# ---- search space ------------------------------------------------------------------------------


def tune_space(search_space: dict) -> dict:
    """{override path: {kind: args}} -> {override path: Ray Tune domain}."""
    from ray import tune

    makers = {
        "loguniform": lambda a: tune.loguniform(a[0], a[1]),
        "uniform": lambda a: tune.uniform(a[0], a[1]),
        "randint": lambda a: tune.randint(int(a[0]), int(a[1])),
        "quniform": lambda a: tune.quniform(a[0], a[1], a[2]),
        "choice": tune.choice,
        "grid": tune.grid_search,
    }
    return {path: makers[kind](args) for path, spec in search_space.items() for kind, args in spec.items()}


def _field_type(path: str) -> Any:
    """The annotated type of the pretraining config field at a dotted path; ConfigError when there is none."""
    tp: Any = PretrainConfig
    for part in path.split("."):
        if not (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
            raise ConfigError(f"tune.search_space key '{path}': '{part}' is not inside a config section")
        hints = typing.get_type_hints(tp)
        if part not in hints:
            raise ConfigError(
                f"tune.search_space key '{path}' is not a config field; allowed in that section: {', '.join(hints)}"
            )
        tp = hints[part]
    return tp


def check_search_space(cfg: TuneRunConfig) -> None:
    """Every search-space key names a config field and its extreme values make a valid config.

    Raises ConfigError before any trial starts (a bad key would otherwise fail every trial).
    """
    for path, spec in cfg.tune.search_space.items():
        if path.split(".")[0] in ("tune", "scaling"):
            raise ConfigError(f"tune.search_space key '{path}': only model.*, data.* and train.* can be searched")
        tp = _field_type(path)
        ((kind, args),) = spec.items()
        ints = tp is int or int in typing.get_args(tp)
        if kind in ("uniform", "loguniform", "quniform") and ints and float not in typing.get_args(tp):
            raise ConfigError(f"tune.search_space.{path}: the field is an integer; use randint or choice, not {kind}")
        samples = args[:2] if kind in ("uniform", "loguniform", "quniform", "randint") else args
        if kind == "randint":
            samples = [args[0], args[1] - 1]  # randint's high is exclusive
        for value in samples:
            resolve_trial_config(config_to_dict(cfg), {path: value})


# ---- the search ----------------------------------------------------------------------------------


def _tune_trial(params: dict, *, base: dict, runs_dir: str, gpus_per_worker: Optional[float]) -> None:
    from ray import tune

    from orchestration.train.driver import run_training

    trial_id = tune.get_context().get_trial_id()
    cfg = resolve_trial_config(base, params["overrides"], storage_path=runs_dir, run_name=trial_id)
    run_training(cfg, resume=True, callbacks=[val_loss_callback()], gpus_per_worker=gpus_per_worker)


def search_algorithm(tc, metric: str, mode: str, concurrency: int):
    """Tune limits concurrency only for Searchers; the random/grid generator takes it itself."""
    if tc.search_alg == "random":
        from ray.tune.search import BasicVariantGenerator

        return BasicVariantGenerator(max_concurrent=concurrency, random_state=tc.seed)
    if any("grid" in spec for spec in tc.search_space.values()):
        raise ConfigError(
            f"tune.search_space 'grid' entries work only with tune.search_alg: random "
            f"(got {tc.search_alg}); use choice instead"
        )
    try:
        if tc.search_alg == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            return OptunaSearch(metric=metric, mode=mode, seed=tc.seed)
        from ray.tune.search.hyperopt import HyperOptSearch

        return HyperOptSearch(metric=metric, mode=mode, random_state_seed=tc.seed)
    except (ImportError, AssertionError) as err:  # Ray's wrappers assert the package imported
        raise ConfigError(
            f"tune.search_alg: {tc.search_alg} needs the {tc.search_alg} package: "
            f"`pip install {tc.search_alg}` (or use search_alg: random) ({err})"
        ) from None


def run_tune(cfg: TuneRunConfig, *, resume: bool = True) -> dict:
    """Search ``cfg.tune.search_space`` around ``cfg`` with Ray Tune; minimize val_loss.

    Re-running with the same tune.storage_path/name restores the experiment (finished trials stay,
    unfinished ones resume from their run checkpoints); ``resume=False`` makes an existing experiment
    an error. Returns {tune_dir, trials (list of dicts as in tune_results.json), best (one of them),
    best_config (path), wall_s}.
    """
    import time

    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from orchestration.runtime import init_ray

    t0 = time.time()
    cfg = with_absolute_paths(cfg)  # trials run in their own working directories
    tc = cfg.tune
    if not tc.search_space:
        raise ConfigError("tune.search_space is empty; declare e.g. train.lr: {loguniform: [1e-4, 1e-2]}")
    check_search_space(cfg)
    facts = check_has_val(cfg)
    out = RunDir.at(f"{tc.storage_path.rstrip('/')}/{tc.name}", cfg.train.endpoint_url)
    base = config_to_dict(cfg)
    total_steps = facts.total_steps
    if cfg.train.eval_interval == 0 or cfg.train.eval_interval >= total_steps:
        print(
            "[raylm] note: train.eval_interval gives one val_loss per trial (at the end); ASHA has nothing "
            "to stop early on. Set train.eval_interval below the run length.",
            flush=True,
        )

    init_ray()
    gpus_per_worker = trial_resources(cfg.train, tc.gpu_per_trial)
    concurrency = default_concurrency(cfg.train, gpus_per_worker, tc.max_concurrent_trials)
    trainable = function_trainable(_tune_trial, base=base, runs_dir=out.uri_of("runs"), gpus_per_worker=gpus_per_worker)
    storage = tune_storage(out)
    restore_path = out.uri if "://" not in out.uri else out.path
    if tune.Tuner.can_restore(restore_path, storage_filesystem=storage.get("storage_filesystem")):
        if not resume:
            raise ConfigError(f"tune experiment {out.uri} already exists; pick another tune.name or resume it")
        print(f"[raylm] restoring tune experiment {out.uri}", flush=True)
        tuner = tune.Tuner.restore(
            restore_path, trainable, resume_errored=True, storage_filesystem=storage.get("storage_filesystem")
        )
    else:
        scheduler = (
            ASHAScheduler(
                time_attr="step",
                grace_period=tc.grace_period,
                reduction_factor=tc.reduction_factor,
                max_t=tc.max_t or total_steps,
            )
            if tc.scheduler == "asha"
            else FIFOScheduler()
        )
        tuner = tune.Tuner(
            trainable,
            param_space={"overrides": tune_space(tc.search_space)},
            tune_config=tune.TuneConfig(
                metric="val_loss",
                mode="min",
                num_samples=tc.num_samples,
                search_alg=search_algorithm(tc, "val_loss", "min", concurrency),
                scheduler=scheduler,
                # the random generator limits itself; Tune wraps a Searcher
                max_concurrent_trials=None if tc.search_alg == "random" else concurrency,
                trial_dirname_creator=lambda trial: trial.trial_id,
            ),
            run_config=tune.RunConfig(
                name=tc.name, failure_config=tune.FailureConfig(max_failures=tc.max_failures), **storage
            ),
        )
    grid = tuner.fit()
    trials = [_trial_summary(result, base, out, facts.seq_len) for result in grid]
    trials.sort(key=lambda t: (t["final_val_loss"] is None, t["final_val_loss"] or 0.0))
    best = _pick_best(trials)
    best_path = None
    if best is not None:
        best_cfg = resolve_trial_config(
            base, best["overrides"], run_name=f"{tc.name}-best", storage_path=cfg.train.storage_path
        )
        best_path = write_config(out, config_to_dict(best_cfg), BEST_CONFIG_FILE)
    results = {"metric": "val_loss", "mode": "min", "best_trial": best and best["trial_id"], "trials": trials}
    results_uri = out.write_json(TUNE_RESULTS_FILE, results)
    print(results_table(trials, best))
    wall_s = time.time() - t0
    print(
        f"[raylm] tune done in {wall_s:.0f} s: {len(trials)} trials; results {results_uri}; "
        f"best config {best_path or '(none: no trial reported a val_loss)'}",
        flush=True,
    )
    return {"tune_dir": out.uri, "trials": trials, "best": best, "best_config": best_path, "wall_s": wall_s}


def _trial_summary(result, base: dict, out: RunDir, seq_len: int) -> dict:
    trial_id = result.path.rstrip("/").rsplit("/", 1)[-1]
    overrides = dict((result.config or {}).get("overrides", {}))
    frame = result.metrics_dataframe
    vals = [] if frame is None or "val_loss" not in frame else [v for v in frame["val_loss"].tolist() if v == v]
    metrics = result.metrics or {}
    step = int(metrics["step"]) if "step" in metrics else 0
    total = resolve_trial_config(base, overrides).train.total_steps(seq_len)
    status = "error" if result.error else ("completed" if step >= total else "stopped")
    return {
        "trial_id": trial_id,
        "overrides": _plain(overrides),
        "final_val_loss": vals[-1] if vals else None,
        "best_val_loss": min(vals) if vals else None,
        "steps": step,
        "total_steps": total,
        "status": status,
        "error": str(result.error).splitlines()[0] if result.error else None,
        "run_dir": out.uri_of(f"runs/{trial_id}"),
    }


def _plain(values: dict) -> dict:
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in values.items()}


def _pick_best(trials: list[dict]) -> Optional[dict]:
    """Lowest final val_loss among trials that ran to the end (ASHA's survivors); else among all."""
    done = [t for t in trials if t["status"] == "completed" and t["final_val_loss"] is not None]
    pool = done or [t for t in trials if t["final_val_loss"] is not None]
    return min(pool, key=lambda t: t["final_val_loss"]) if pool else None


def results_table(trials: list[dict], best: Optional[dict]) -> str:
    """One line per trial: id, status, steps, final / best val loss, overrides."""
    lines = [f"{'trial':<14}{'status':<11}{'steps':>8}{'val_loss':>10}{'best_val':>10}  overrides"]
    for t in trials:
        mark = " *" if best is not None and t["trial_id"] == best["trial_id"] else ""
        fmt = lambda v: f"{v:>10.4f}" if v is not None else f"{'-':>10}"  # noqa: E731
        over = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t["overrides"].items())
        lines.append(
            f"{t['trial_id']:<14}{t['status']:<11}{t['steps']:>8}{fmt(t['final_val_loss'])}"
            f"{fmt(t['best_val_loss'])}  {over}{mark}"
        )
    return "\n".join(lines)
