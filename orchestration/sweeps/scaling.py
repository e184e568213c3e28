"""Scaling-law sweeps (``raylm scaling``): plan points, train each as a Tune trial, reuse, fit.

A sweep is a list of *points*, each one training run of a ladder shape for a number of tokens:
``tokens`` (every size x every token count), ``budgets`` (IsoFLOP: every size at D = C /
flops_per_token(N)) and ``wsd_tokens_per_param`` (one warmup-stable run per size, a short decay
branched off it at each D = m x N). A point's key hashes its resolved config (plus, for a branch,
the stable run it starts from), so a finished point (``points/<key>.json``) is reused when the sweep
is re-run or extended; an unfinished one resumes from its run directory ``runs/<key>/``.
Outputs in ``<scaling.storage_path>/<scaling.name>/``: ``scaling_points.json``, ``scaling_fit.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from typing import Optional

from model.config import ModelConfig
from model.flops import count_params, flops_per_token
from orchestration.artifacts import SCALING_FIT_FILE, SCALING_POINTS_FILE, RunDir, read_point, write_point
from orchestration.checkpoint_format import checkpoint_dir_name
from orchestration.config import (
    ConfigError,
    PretrainConfig,
    ScalingRunConfig,
    build_dataclass,
    config_to_dict,
    with_absolute_paths,
)
from orchestration.sweeps.sweep_fit import fit_sweep

# Train fields that do not change what a run learns: left out of a point's key.
_KEY_EXCLUDED = ("run_name", "storage_path", "max_failures", "num_to_keep", "log_interval")


def ladder_shape(n_layer: int, aspect: float, head_dim: int, base: ModelConfig) -> ModelConfig:
    """One rung: n_embd = aspect x n_layer rounded to a multiple of head_dim, n_head = n_embd / head_dim;
    everything else (vocab, block size, MLP, norm, positions) from ``base``."""
    n_embd = max(head_dim, round(aspect * n_layer / head_dim) * head_dim)
    n_kv = None if base.n_kv_head is None else max(1, n_embd // head_dim // (base.n_head // base.kv_heads))
    return dataclasses.replace(
        base, preset=None, n_layer=n_layer, n_embd=n_embd, n_head=n_embd // head_dim, n_kv_head=n_kv
    )


def size_rule(cfg: ScalingRunConfig, model: ModelConfig) -> dict:
    """Per-size train fields: lr = base_lr x (ref_width / n_embd)^lr_width_power (min_lr keeps the
    train section's min_lr/lr ratio); global batch x (n_embd / ref_width)^batch_width_power,
    rounded to a multiple of micro_batch_size x num_workers (at least one)."""
    sc, train = cfg.scaling, cfg.train
    base_lr = sc.base_lr if sc.base_lr is not None else train.lr
    lr = base_lr * (sc.ref_width / model.n_embd) ** sc.lr_width_power
    per_step = train.micro_batch_size * train.num_workers
    batch = train.global_batch_size * (model.n_embd / sc.ref_width) ** sc.batch_width_power
    global_batch = max(1, round(batch / per_step)) * per_step
    return {
        "lr": lr,
        "min_lr": lr * train.min_lr / train.lr if train.lr > 0 else 0.0,
        "global_batch_size": global_batch,
        "grad_accum_steps": global_batch // per_step,
    }


def point_key(config: dict, branch: Optional[dict] = None, tokenizer_hash: str = "") -> str:
    """16 hex digits of sha256 over what decides a run's result: the model and train sections (less
    bookkeeping fields; train.data names the shards), the shards' tokenizer and, for a branch, the
    stable run and step it starts from. The data section only says how to *prepare* shards: left out."""
    train = {k: v for k, v in config["train"].items() if k not in _KEY_EXCLUDED}
    blob = json.dumps(
        {"model": config["model"], "train": train, "tokenizer": tokenizer_hash, "branch": branch},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _point(
    cfg: ScalingRunConfig,
    model: ModelConfig,
    seq_len: int,
    steps: int,
    kind: str,
    runs_dir: str,
    *,
    budget: Optional[float] = None,
    target_tokens: Optional[float] = None,
    train_extra: Optional[dict] = None,
    branch: Optional[dict] = None,
    tokenizer_hash: str = "",
) -> dict:
    rule = size_rule(cfg, model)
    tree = config_to_dict(cfg)
    tree["model"] = dataclasses.asdict(model)
    tree["train"].update(rule, max_steps=steps, max_tokens=None, storage_path=runs_dir, **(train_extra or {}))
    tree.pop("scaling")  # sweep bookkeeping, not part of the run
    key = point_key(tree, branch, tokenizer_hash)
    tree["train"]["run_name"] = key
    tokens = steps * rule["global_batch_size"] * seq_len
    fpt = flops_per_token(model, seq_len)
    point = {
        "key": key,
        "kind": kind,
        "n_layer": model.n_layer,
        "n_embd": model.n_embd,
        "params": count_params(model),
        "non_embedding_params": count_params(model, non_embedding=True),
        "tokens": tokens,
        "target_tokens": target_tokens,
        "flops": fpt * tokens,
        "budget": budget,
        "steps": steps,
        "lr": rule["lr"],
        "global_batch_size": rule["global_batch_size"],
        "run_dir": f"{runs_dir}/{key}",
        "config": tree,
    }
    if branch is not None:
        point["branch"] = branch
    return point


def plan_points(
    cfg: ScalingRunConfig, seq_len: int, vocab_size: int, sweep_dir: str, tokenizer_hash: str = ""
) -> list[dict]:
    """Every point (and WSD stable run, kind 'trunk') of the sweep, checked; no Ray, no training.

    Raises ConfigError for an empty grid or a token count / budget too small for min_steps.
    """
    sc = cfg.scaling
    if not (sc.tokens or sc.budgets or sc.wsd_tokens_per_param):
        raise ConfigError(
            "scaling: the grid is empty; set scaling.tokens (sizes x token counts), "
            "scaling.budgets (IsoFLOP FLOPs) and/or scaling.wsd_tokens_per_param"
        )
    if not sc.n_layers:
        raise ConfigError("scaling.n_layers is empty: the ladder needs at least one size")
    if cfg.model.parametrization == "mup" and sc.lr_width_power != 0:
        raise ConfigError(
            f"scaling.lr_width_power={sc.lr_width_power:g} shrinks the lr with width, which model.parametrization=mup "
            "already does layer by layer (an lr tuned at model.mup_base_width holds at every width): set "
            "scaling.lr_width_power: 0"
        )
    min_steps = max(sc.min_steps, cfg.train.warmup_steps + 1)
    runs_dir = f"{sweep_dir}/runs"
    base = dataclasses.replace(cfg.model, vocab_size=vocab_size, block_size=max(cfg.model.block_size, seq_len))
    models = sorted((ladder_shape(n, sc.aspect, sc.head_dim, base) for n in sc.n_layers), key=count_params)
    points = []
    for model in models:
        tokens_per_step = size_rule(cfg, model)["global_batch_size"] * seq_len
        for tokens in sc.tokens:
            steps = round(tokens / tokens_per_step)
            if steps < min_steps:
                raise ConfigError(
                    f"scaling.tokens {tokens:.3g} is {steps} steps of {tokens_per_step} tokens for "
                    f"n_layer={model.n_layer}, fewer than {min_steps} (scaling.min_steps and > "
                    f"train.warmup_steps); raise it to >= {min_steps * tokens_per_step:.3g}"
                )
            points.append(
                _point(
                    cfg, model, seq_len, steps, "grid", runs_dir, target_tokens=tokens, tokenizer_hash=tokenizer_hash
                )
            )
    for budget in sc.budgets:
        feasible = []
        for model in models:
            tokens_per_step = size_rule(cfg, model)["global_batch_size"] * seq_len
            steps = round(budget / flops_per_token(model, seq_len) / tokens_per_step)
            ratio = steps * tokens_per_step / count_params(model, non_embedding=sc.param_kind == "non_embedding")
            if not ((sc.min_tokens_per_param or 0) <= ratio <= (sc.max_tokens_per_param or float("inf"))):
                continue
            if steps >= min_steps:
                feasible.append(
                    _point(
                        cfg,
                        model,
                        seq_len,
                        steps,
                        "isoflop",
                        runs_dir,
                        budget=budget,
                        target_tokens=budget / flops_per_token(model, seq_len),
                        tokenizer_hash=tokenizer_hash,
                    )
                )
        if not feasible and any((sc.min_tokens_per_param, sc.max_tokens_per_param)):
            raise ConfigError(
                f"scaling.budgets {budget:.3g} FLOPs: no size has both >= {min_steps} steps and "
                f"tokens/param in [{sc.min_tokens_per_param}, {sc.max_tokens_per_param}]; widen "
                "scaling.n_layers or the tokens-per-param range"
            )
        if not feasible:
            small = models[0]
            need = min_steps * size_rule(cfg, small)["global_batch_size"] * seq_len * flops_per_token(small, seq_len)
            raise ConfigError(
                f"scaling.budgets {budget:.3g} FLOPs is too small for the smallest model "
                f"(n_layer={small.n_layer}, {count_params(small):,} params): fewer than {min_steps} "
                f"steps; raise it to >= {need:.3g} or lower scaling.min_steps"
            )
        if len(feasible) < len(models):
            print(
                f"[raylm] budget {budget:.3g}: {len(models) - len(feasible)} size(s) skipped (fewer than "
                f"{min_steps} steps or tokens/param out of range)",
                flush=True,
            )
        points.extend(feasible)
    for model in models if sc.wsd_tokens_per_param else ():
        points.extend(_wsd_points(cfg, model, seq_len, min_steps, runs_dir, tokenizer_hash))
    return points + _predict_points(cfg, base, points, seq_len, min_steps, runs_dir, tokenizer_hash)


def _predict_points(
    cfg: ScalingRunConfig,
    base: ModelConfig,
    grid: list[dict],
    seq_len: int,
    min_steps: int,
    runs_dir: str,
    tokenizer_hash: str,
) -> list[dict]:
    """The ``scaling.predict`` runs (kind 'predict'), each checked to need more compute than every run
    the law is fitted on: a prediction is an extrapolation, or it checks nothing."""
    sc = cfg.scaling
    fitted = max((p["flops"] for p in grid if p["kind"] != "trunk"), default=0.0)
    points = []
    for run in sc.predict:
        model = ladder_shape(run.n_layer, sc.aspect, sc.head_dim, base)
        tokens_per_step = size_rule(cfg, model)["global_batch_size"] * seq_len
        steps = round(run.tokens / tokens_per_step)
        point = _point(
            cfg, model, seq_len, steps, "predict", runs_dir, target_tokens=run.tokens, tokenizer_hash=tokenizer_hash
        )
        if steps < min_steps or point["flops"] <= fitted:
            raise ConfigError(
                f"scaling.predict n_layer={run.n_layer} tokens={run.tokens:.3g} is {steps} steps and "
                f"{point['flops']:.3g} FLOPs; a predicted run needs >= {min_steps} steps and more compute than "
                f"every fitted run (the largest: {fitted:.3g} FLOPs): raise its n_layer or tokens"
            )
        points.append(point)
    return points


def _wsd_points(
    cfg: ScalingRunConfig, model: ModelConfig, seq_len: int, min_steps: int, runs_dir: str, tokenizer_hash: str
) -> list[dict]:
    """One stable run (constant LR after warmup, checkpoint every k steps) and one decay branch per
    tokens-per-param multiple m: the branch resumes the stable run at step s (D ~ m N minus the
    decay) and decays linearly to min_lr over the last wsd_decay_fraction of its own steps."""
    sc = cfg.scaling
    tokens_per_step = size_rule(cfg, model)["global_batch_size"] * seq_len
    n = count_params(model, non_embedding=sc.param_kind == "non_embedding")
    totals = sorted({round(m * n / tokens_per_step) for m in sc.wsd_tokens_per_param})
    stable = [round(t * (1 - sc.wsd_decay_fraction)) for t in totals]
    if stable[0] < min_steps:
        raise ConfigError(
            f"scaling.wsd_tokens_per_param {min(sc.wsd_tokens_per_param)} gives n_layer={model.n_layer} "
            f"a stable phase of {stable[0]} steps, fewer than {min_steps}; raise it"
        )
    k = max(1, stable[0] // 4)  # branch points on a k-step checkpoint grid: within k/2 of the target
    stable = sorted({max(k, round(s / k) * k) for s in stable})
    trunk = _point(
        cfg,
        model,
        seq_len,
        stable[-1],
        "trunk",
        runs_dir,
        train_extra={"schedule": "wsd", "decay_fraction": 0.0, "checkpoint_interval": k, "num_to_keep": None},
        tokenizer_hash=tokenizer_hash,
    )
    branches = []
    for s in stable:
        decay = max(1, round(sc.wsd_decay_fraction * s / (1 - sc.wsd_decay_fraction)))
        branch = {"trunk": trunk["key"], "step": s, "from": f"{trunk['run_dir']}/{checkpoint_dir_name(s)}"}
        branches.append(
            _point(
                cfg,
                model,
                seq_len,
                s + decay,
                "wsd",
                runs_dir,
                branch=branch,
                tokenizer_hash=tokenizer_hash,
                target_tokens=(s + decay) * tokens_per_step,
                train_extra={"schedule": "wsd", "decay_fraction": decay / (s + decay), "checkpoint_interval": 0},
            )
        )
    return [trunk, *branches]


def wsd_savings(points: list[dict]) -> Optional[dict]:
    """FLOPs of the stable runs + decay branches vs one independent run per branch point.

    ``max_saved_fraction`` is the saving if every decay were free, each family costing only its longest
    run: a family of lengths 5, 10, 20, 40 x N can save at most 1 - 40/75 = 47%, whatever the decay."""
    trunks = {p["key"]: p for p in points if p["kind"] == "trunk"}
    branches = [p for p in points if p["kind"] == "wsd"]
    if not branches:
        return None
    independent = sum(p["flops"] for p in branches)
    decay = sum(p["flops"] * (p["steps"] - p["branch"]["step"]) / p["steps"] for p in branches)
    used = sum(t["flops"] for t in trunks.values()) + decay
    longest = sum(max(b["flops"] for b in branches if b["branch"]["trunk"] == key) for key in trunks)
    return {
        "independent_flops": independent,
        "wsd_flops": used,
        "saved_flops": independent - used,
        "saved_fraction": 1 - used / independent,
        "max_saved_fraction": 1 - longest / independent,
        "n_stable_runs": len(trunks),
        "n_branches": len(branches),
    }


def wsd_line(saved: dict) -> str:
    """One console line from ``wsd_savings``."""
    return (
        f"WSD: {saved['n_branches']} decay branches off {saved['n_stable_runs']} stable run(s) cost "
        f"{saved['wsd_flops']:.3g} FLOPs against {saved['independent_flops']:.3g} for independent runs: "
        f"{saved['saved_fraction']:.1%} saved (at most {saved['max_saved_fraction']:.1%} for these lengths)"
    )


# ---- running the sweep ---------------------------------------------------------------------------


def _point_trial(params: dict, *, specs: dict, sweep: RunDir, gpus_per_worker: Optional[float]) -> None:
    """One Tune trial: train the point's run (resuming its run dir), then record its result and when
    it ran (``started_s``, ``ended_s``: unix seconds, for how many trials ran at once)."""
    from orchestration.sweeps.trials import val_loss_callback
    from orchestration.train.driver import run_training

    started = time.time()
    spec = specs[params["key"]]
    cfg = build_dataclass(PretrainConfig, spec["config"], source=f"scaling point {spec['key']}")
    branch_from = spec["branch"]["from"] if "branch" in spec else None
    summary = run_training(
        cfg, resume=True, callbacks=[val_loss_callback()], gpus_per_worker=gpus_per_worker, branch_from=branch_from
    )
    if summary["final_val_loss"] is None and spec["kind"] != "trunk":
        raise RuntimeError(f"point {spec['key']} finished without a val_loss")
    record = {k: v for k, v in spec.items() if k != "config"}
    record.update(
        loss=summary["final_val_loss"],
        train_loss=summary["final_loss"],
        status="ok",
        final_step=summary["final_step"],
        wall_s=summary["wall_s"],
        checkpoint=summary["checkpoint"],
        started_s=started,
        ended_s=time.time(),
    )
    write_point(sweep, spec["key"], record)


def _run_trials(
    cfg: ScalingRunConfig, specs: list[dict], sweep: RunDir, phase: str, gpus_per_worker: Optional[float], at_once: int
) -> int:
    """Train ``specs`` as one Tune experiment (FIFO, ``at_once`` at a time, retried by FailureConfig);
    returns trials run."""
    from ray import tune

    from orchestration.sweeps.trials import function_trainable, tune_storage

    if not specs:
        return 0
    sc = cfg.scaling
    trainable = function_trainable(
        _point_trial, specs={s["key"]: s for s in specs}, sweep=sweep, gpus_per_worker=gpus_per_worker
    )
    name = f"{phase}-{time.strftime('%Y%m%d-%H%M%S')}"
    print(f"[raylm] scaling: {len(specs)} {phase} trial(s) -> {sweep.uri_of('tune')}/{name}", flush=True)
    tuner = tune.Tuner(
        trainable,
        param_space={"key": tune.grid_search([s["key"] for s in specs])},
        tune_config=tune.TuneConfig(
            max_concurrent_trials=at_once,
            trial_dirname_creator=lambda trial: f"{trial.config['key']}-{trial.trial_id}",
        ),
        run_config=tune.RunConfig(
            name=name,
            failure_config=tune.FailureConfig(max_failures=sc.max_failures),
            **tune_storage(sweep.child("tune").child(name)),
        ),
    )
    grid = tuner.fit()
    for result in grid:
        if result.error:
            print(
                f"[raylm] scaling: point {result.config['key']} failed: {str(result.error).splitlines()[0]}", flush=True
            )
    return len(specs)


def run_scaling(cfg: ScalingRunConfig, *, resume: bool = True) -> dict:
    """Plan the sweep, train the points that have no result yet, write points and fits.

    With ``resume`` (default) finished points are reused and unfinished runs continue from their
    checkpoints; ``resume=False`` makes an existing sweep directory an error. ``scaling.gpus_per_trial``
    packs points onto GPUs or runs them on CPUs (``trials.trial_resources``: a point's key includes its
    train section, so CPU and GPU points are different points). scaling_points.json gets
    ``concurrency`` (planned trials at once, null when every point was reused, and the measured peak
    over every point that recorded when it ran); scaling_fit.json gets ``wsd_compute``. Returns
    {sweep_dir, points (list), trials_run, reused, failed, fit (scaling_fit.json content), concurrency,
    wall_s}.
    """
    from orchestration.runtime import init_ray
    from orchestration.sweeps.trials import (
        check_has_val,
        concurrency_line,
        concurrency_summary,
        default_concurrency,
        trial_resources,
    )

    t0 = time.time()
    cfg = with_absolute_paths(cfg)  # trials run in their own working directories
    sc = cfg.scaling
    sweep = RunDir.at(f"{sc.storage_path.rstrip('/')}/{sc.name}", cfg.train.endpoint_url)
    if sweep.exists() and not resume:
        raise ConfigError(f"sweep directory {sweep.uri} already exists; pick another scaling.name or resume it")
    resources = trial_resources(cfg.train, sc.gpus_per_trial, "scaling.gpus_per_trial")
    trial_cfg = dataclasses.replace(cfg, train=resources.train)  # what every point starts from
    facts = check_has_val(trial_cfg)
    planned = plan_points(trial_cfg, facts.seq_len, facts.vocab_size, sweep.uri, facts.tokenizer_hash)
    done = {p["key"]: r for p in planned if (r := read_point(sweep, p["key"])) is not None}
    reused = len(done)
    pending = [p for p in planned if p["key"] not in done]
    print(
        f"[raylm] scaling {sweep.uri}: {len(planned)} runs planned, {reused} finished (reused), "
        f"{len(pending)} to train",
        flush=True,
    )
    trials_run, at_once = 0, None
    if pending:
        init_ray()
        at_once = default_concurrency(resources, sc.max_concurrent_trials)
        # Phase 1: independent points and WSD stable runs; phase 2: decay branches off finished stable runs.
        # Largest compute first: the longest run does not start last, beside nothing (LPT scheduling).
        independent = sorted((p for p in pending if p["kind"] != "wsd"), key=lambda p: -p["flops"])
        trials_run += _run_trials(cfg, independent, sweep, "points", resources.gpus_per_worker, at_once)
        ready = {p["key"] for p in planned if p["kind"] == "trunk" and read_point(sweep, p["key"]) is not None}
        branches = [p for p in pending if p["kind"] == "wsd" and p["branch"]["trunk"] in ready]
        trials_run += _run_trials(cfg, branches, sweep, "wsd-branches", resources.gpus_per_worker, at_once)
    records = []
    for p in planned:
        record = read_point(sweep, p["key"])
        if record is None:
            record = {**{k: v for k, v in p.items() if k != "config"}, "loss": None, "status": "failed"}
        records.append(record)
    points = [r for r in records if r["kind"] != "trunk"]
    trunks = [r for r in records if r["kind"] == "trunk"]
    failed = [r["key"] for r in records if r["status"] != "ok"]
    spans = [(r["started_s"], r["ended_s"]) for r in records if r.get("started_s") is not None]
    concurrency = concurrency_summary(resources, sc.gpus_per_trial, at_once, spans)
    grid = {
        "n_layers": cfg.scaling.n_layers,
        "shapes": sorted({(r["n_layer"], r["n_embd"]) for r in records}),
        "tokens": cfg.scaling.tokens,
        "budgets": cfg.scaling.budgets,
        "wsd_tokens_per_param": cfg.scaling.wsd_tokens_per_param,
        "seq_len": facts.seq_len,
        "vocab_size": facts.vocab_size,
    }
    sweep.write_json(
        SCALING_POINTS_FILE,
        {
            "points": points,
            "stable_runs": trunks,
            "grid": grid,
            "concurrency": concurrency,
            "config": dataclasses.asdict(sc),
            "run_config": config_to_dict(cfg),
        },
    )
    fit = fit_sweep(points, sc)
    fit["wsd_compute"] = wsd_savings(planned)
    sweep.write_json(SCALING_FIT_FILE, fit)
    print(points_table(points))
    lines = [*fit["messages"], concurrency_line(concurrency)]
    if fit["wsd_compute"]:
        lines.append(wsd_line(fit["wsd_compute"]))
    for line in lines:
        print(f"[raylm] {line}", flush=True)
    wall_s = time.time() - t0
    where = f"points {sweep.uri_of(SCALING_POINTS_FILE)}, fits {sweep.uri_of(SCALING_FIT_FILE)}"
    print(f"[raylm] scaling done in {wall_s:.0f} s: {trials_run} trials run, {reused} reused, {len(failed)} failed; "
          f"{where}", flush=True)  # fmt: skip
    return {
        "sweep_dir": sweep.uri,
        "points": points,
        "trials_run": trials_run,
        "reused": reused,
        "failed": failed,
        "fit": fit,
        "concurrency": concurrency,
        "wall_s": wall_s,
    }


def points_table(points: list[dict]) -> str:
    lines = [
        f"{'key':<18}{'kind':<9}{'layers':>7}{'width':>7}{'params':>13}{'tokens':>11}{'FLOPs':>10}"
        f"{'val_loss':>10}  status"
    ]
    for p in sorted(points, key=lambda p: (p["kind"], p["budget"] or 0, p["params"], p["tokens"])):
        loss = f"{p['loss']:>10.4f}" if p.get("loss") is not None else f"{'-':>10}"
        lines.append(
            f"{p['key']:<18}{p['kind']:<9}{p['n_layer']:>7}{p['n_embd']:>7}{p['params']:>13,}"
            f"{p['tokens']:>11.3g}{p['flops']:>10.2g}{loss}  {p['status']}"
        )
    return "\n".join(lines)
