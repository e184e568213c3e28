"""Hyperparameter search with Ray Tune over the Ray Train pretraining run (``raylm tune``).

Each trial is a Tune *function trainable* that runs ``run_training`` (a TorchTrainer) on its
sampled config overrides. Ray Train V2 cannot be handed to a ``Tuner`` directly; the function holds
no resources of its own (``{"cpu": 0, "memory": 1}``, an all-zero request is refused) and the
TorchTrainer's workers ask for theirs, so trials queue on worker resources. Reports reach Tune
through Ray Train's ``TuneReportCallback``, filtered to records carrying ``val_loss``, with the
optimizer step as ASHA's clock. Outputs in ``<tune.storage_path>/<tune.name>/``: Tune's experiment
state (restored when the command is re-run), ``runs/<trial_id>/`` (each trial's run directory),
``tune_results.json`` (trials, how many ran at once, the lr-across-widths view) and ``best_config.yaml``.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Optional

from orchestration.artifacts import BEST_CONFIG_FILE, TUNE_RESULTS_FILE, RunDir, write_config
from orchestration.config import ConfigError, PretrainConfig, TuneRunConfig, config_to_dict, with_absolute_paths
from orchestration.sweeps.trials import (
    check_has_val,
    concurrency_line,
    concurrency_summary,
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
    an error. ``tune.gpus_per_trial`` packs trials onto GPUs (or runs them on CPUs: ``trial_resources``);
    a restored experiment keeps the concurrency it was started with. tune_results.json holds the
    trials, ``concurrency`` (planned and measured trials at once) and ``lr_transfer`` (the best lr per
    width, when the search varies both). Returns {tune_dir, trials (list of dicts as in
    tune_results.json), best (one of them), best_config (path), concurrency, wall_s}.
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
    resources = trial_resources(cfg.train, tc.gpus_per_trial, "tune.gpus_per_trial")
    trial_cfg = dataclasses.replace(cfg, train=resources.train)  # what every trial starts from
    check_search_space(trial_cfg)
    facts = check_has_val(trial_cfg)
    out = RunDir.at(f"{tc.storage_path.rstrip('/')}/{tc.name}", cfg.train.endpoint_url)
    base = config_to_dict(trial_cfg)
    total_steps = facts.total_steps
    if cfg.train.eval_interval == 0 or cfg.train.eval_interval >= total_steps:
        print(
            "[raylm] note: train.eval_interval gives one val_loss per trial (at the end); ASHA has nothing "
            "to stop early on. Set train.eval_interval below the run length.",
            flush=True,
        )

    init_ray()
    concurrency = default_concurrency(resources, tc.max_concurrent_trials)
    trainable = function_trainable(
        _tune_trial, base=base, runs_dir=out.uri_of("runs"), gpus_per_worker=resources.gpus_per_worker
    )
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
    if best is not None:  # the user's train section (a CPU-only search of a GPU config gives a GPU config)
        best_cfg = resolve_trial_config(
            config_to_dict(cfg), best["overrides"], run_name=f"{tc.name}-best", storage_path=cfg.train.storage_path
        )
        best_path = write_config(out, config_to_dict(best_cfg), BEST_CONFIG_FILE)
    spans = [(t["started_s"], t["ended_s"]) for t in trials if t["started_s"] is not None]
    results = {
        "metric": "val_loss",
        "mode": "min",
        "best_trial": best and best["trial_id"],
        "concurrency": concurrency_summary(resources, tc.gpus_per_trial, concurrency, spans),
        "lr_transfer": lr_transfer(trials, base["model"]["parametrization"]),
        "trials": trials,
    }
    results_uri = out.write_json(TUNE_RESULTS_FILE, results)
    print(results_table(trials, best))
    print(f"[raylm] {concurrency_line(results['concurrency'])}", flush=True)
    for line in lr_transfer_lines(results["lr_transfer"]):
        print(f"[raylm] {line}", flush=True)
    wall_s = time.time() - t0
    print(
        f"[raylm] tune done in {wall_s:.0f} s: {len(trials)} trials; results {results_uri}; "
        f"best config {best_path or '(none: no trial reported a val_loss)'}",
        flush=True,
    )
    return {
        "tune_dir": out.uri,
        "trials": trials,
        "best": best,
        "best_config": best_path,
        "concurrency": results["concurrency"],
        "wall_s": wall_s,
    }


def _trial_summary(result, base: dict, out: RunDir, seq_len: int) -> dict:
    trial_id = result.path.rstrip("/").rsplit("/", 1)[-1]
    overrides = dict((result.config or {}).get("overrides", {}))
    frame = result.metrics_dataframe
    vals = [] if frame is None or "val_loss" not in frame else [v for v in frame["val_loss"].tolist() if v == v]
    metrics = result.metrics or {}
    step = int(metrics["step"]) if "step" in metrics else 0
    total = resolve_trial_config(base, overrides).train.total_steps(seq_len)
    status = "error" if result.error else ("completed" if step >= total else "stopped")
    started, ended = trial_span(frame)
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
        "started_s": started,
        "ended_s": ended,
    }


def trial_span(frame) -> tuple[Optional[float], Optional[float]]:
    """(start, end) unix seconds of a trial from Tune's auto-filled result fields: each result's
    ``timestamp`` (whole seconds) less its ``time_total_s`` is when the trial's function began (the
    earliest over retries); its last result, when it ended. (None, None) when it reported nothing."""
    if frame is None or len(frame) == 0 or not {"timestamp", "time_total_s"} <= set(frame.columns):
        return None, None
    return float((frame["timestamp"] - frame["time_total_s"]).min()), float(frame["timestamp"].max())


def _plain(values: dict) -> dict:
    return {k: (v.item() if hasattr(v, "item") else v) for k, v in values.items()}


def _pick_best(trials: list[dict]) -> Optional[dict]:
    """Lowest final val_loss among trials that ran to the end (ASHA's survivors); else among all."""
    done = [t for t in trials if t["status"] == "completed" and t["final_val_loss"] is not None]
    pool = done or [t for t in trials if t["final_val_loss"] is not None]
    return min(pool, key=lambda t: t["final_val_loss"]) if pool else None


# ---- the learning rate across widths -------------------------------------------------------------

LR_TRANSFER_KEYS = ("train.lr", "model.n_embd")  # a search over both (and maybe model.parametrization)


def lr_transfer(trials: list[dict], base_parametrization: str) -> Optional[dict]:
    """Whether the best learning rate moves with width, when the search varies train.lr and model.n_embd.

    Over the trials that ran to the end (a stopped trial's loss is from fewer steps): the mean final
    val loss at each (parametrization, width, lr), the best lr per width, and ``optimum_shift_steps``:
    how many steps of the parametrization's lr grid (its distinct lrs, sorted) separate the smallest
    and the largest best lr over the widths (0: the optimum transfers). Keys are strings (JSON's).
    None when the search does not vary both.
    """
    if not trials or not all(set(LR_TRANSFER_KEYS) <= set(t["overrides"]) for t in trials):
        return None
    losses: dict[tuple, list[float]] = {}
    for t in trials:
        if t["status"] == "completed" and t["final_val_loss"] is not None:
            o = t["overrides"]
            key = (o.get("model.parametrization", base_parametrization), int(o["model.n_embd"]), float(o["train.lr"]))
            losses.setdefault(key, []).append(t["final_val_loss"])
    points = [
        {"parametrization": p, "width": w, "lr": lr, "val_loss": sum(v) / len(v), "trials": len(v)}
        for (p, w, lr), v in sorted(losses.items())
    ]
    best_lr: dict[str, dict[str, float]] = {}
    best_loss: dict[str, dict[str, float]] = {}
    for point in points:
        p, w = point["parametrization"], str(point["width"])
        if w not in best_loss.get(p, {}) or point["val_loss"] < best_loss[p][w]:
            best_lr.setdefault(p, {})[w] = point["lr"]
            best_loss.setdefault(p, {})[w] = point["val_loss"]
    grid = {p: sorted({q["lr"] for q in points if q["parametrization"] == p}) for p in best_lr}
    shift = {
        p: max(map(grid[p].index, lrs.values())) - min(map(grid[p].index, lrs.values())) for p, lrs in best_lr.items()
    }
    return {
        "points": points,
        "best_lr": best_lr,
        "best_val_loss": best_loss,
        "lr_grid": grid,
        "optimum_shift_steps": shift,
        "trials_left_out": len(trials) - sum(q["trials"] for q in points),
    }


def lr_transfer_lines(transfer: Optional[dict]) -> list[str]:
    """One line per parametrization: how far the best lr moves across widths, and where it sits."""
    if transfer is None:
        return []
    lines = []
    for p, lrs in transfer["best_lr"].items():
        widths = sorted(lrs, key=int)
        steps = transfer["optimum_shift_steps"][p]
        where = ", ".join(f"{w}: {lrs[w]:.3g}" for w in widths)
        lines.append(
            f"{p}: the best lr moves {steps} step(s) of a {len(transfer['lr_grid'][p])}-value lr grid across "
            f"widths {widths[0]}-{widths[-1]} (best lr per width {where})"
        )
    return lines


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
