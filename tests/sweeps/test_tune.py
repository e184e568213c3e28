"""Hyperparameter search: search-space parsing and checks (fast), one real ASHA search (slow).

The slow test runs 3 tiny single-worker trials as Ray Tune function trainables wrapping a
TorchTrainer, with the data, the trials' runs and the experiment on the S3 server (the scaling sweep's
test writes locally), writes a report there, then re-runs the command to show the experiment is
restored from object storage, not repeated.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import tiny_corpus_on_s3

from orchestration.config import ConfigError, TuneRunConfig
from orchestration.config import load_config as load_any

CONFIGS = Path(__file__).parents[2] / "configs"


def load_config(path=None, overrides=()):
    return load_any(path, overrides, schema=TuneRunConfig)


def test_search_space_parses_and_numeric_strings_become_numbers():
    cfg = load_config(
        None,
        [
            "tune.search_space={train.lr: {loguniform: [1e-4, 1e-2]}, "
            "train.warmup_steps: {choice: [10, 50]}, train.weight_decay: {uniform: [0, 0.2]}, "
            "train.micro_batch_size: {randint: [2, 9]}, model.dropout: {grid: [0.0, 0.1]}}"
        ],
    )
    space = cfg.tune.search_space
    assert space["train.lr"] == {"loguniform": [1e-4, 1e-2]}  # "1e-4" is a string in YAML 1.1
    assert space["train.warmup_steps"] == {"choice": [10, 50]}


def test_search_space_to_ray_domains():
    from ray.tune.search.sample import Categorical, Float, Integer

    from orchestration.sweeps.tune import tune_space

    space = tune_space(
        {
            "train.lr": {"loguniform": [1e-4, 1e-2]},
            "train.warmup_steps": {"choice": [10, 50]},
            "train.micro_batch_size": {"randint": [2, 9]},
            "model.dropout": {"grid": [0.0, 0.1]},
        }
    )
    assert isinstance(space["train.lr"], Float) and space["train.lr"].lower == 1e-4
    assert isinstance(space["train.warmup_steps"], Categorical) and space["train.warmup_steps"].categories == [10, 50]
    assert isinstance(space["train.micro_batch_size"], Integer)
    assert space["model.dropout"] == {"grid_search": [0.0, 0.1]}


@pytest.mark.parametrize(
    "entry, message",
    [
        ("{train.lr: {normal: [0, 1]}}", "unknown kind 'normal'"),
        ("{train.lr: {loguniform: [0, 1]}}", "positive bounds"),
        ("{train.lr: {uniform: [0.2, 0.1]}}", "must be < high"),
        ("{train.lr: 0.1}", "one-key mapping"),
    ],
)
def test_bad_search_space_shape_fails_at_load(entry, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"tune.search_space={entry}"])


@pytest.mark.parametrize(
    "entry, message",
    [
        ("{train.learning_rate: {uniform: [0.1, 0.2]}}", "'train.learning_rate' is not a config field"),
        ("{train.warmup_steps: {uniform: [1, 20]}}", "integer; use randint or choice"),
        ("{train.lr: {loguniform: [1e-5, 1e-2]}}", "min_lr .* must be <= lr"),  # min_lr 1e-4 > lr 1e-5
        ("{train.zero_stage: {choice: [1, 5]}}", "train.zero_stage"),
        ("{tune.num_samples: {choice: [1, 2]}}", "only model"),
    ],
)
def test_search_space_keys_and_values_checked_against_the_config(entry, message):
    from orchestration.sweeps.tune import check_search_space

    cfg = load_config(None, [f"tune.search_space={entry}"])
    with pytest.raises(ConfigError, match=message):
        check_search_space(cfg)


def test_resolve_trial_config_applies_overrides():
    from orchestration.config import config_to_dict
    from orchestration.sweeps.trials import resolve_trial_config

    base = config_to_dict(load_config(None))
    cfg = resolve_trial_config(base, {"train.lr": 2e-3, "model.n_layer": 3}, run_name="t1")
    assert (cfg.train.lr, cfg.model.n_layer, cfg.train.run_name) == (2e-3, 3, "t1")
    assert base["train"]["lr"] == 1e-3  # base untouched


def test_missing_search_package_names_the_pip_install():
    import importlib.util

    from orchestration.sweeps.tune import search_algorithm

    cfg = load_config(None, ["tune.search_space={train.lr: {uniform: [1e-3, 2e-3]}}", "tune.search_alg=optuna"])
    if importlib.util.find_spec("optuna") is not None:
        pytest.skip("optuna is installed here")
    with pytest.raises(ConfigError, match="pip install optuna"):
        search_algorithm(cfg.tune, "val_loss", "min", 2)


def test_shipped_tune_configs_load():
    for name in ("tune_tiny.yaml", "tune_gpt2_small.yaml"):
        cfg = load_config(CONFIGS / name)
        assert cfg.tune.search_space, name


@pytest.mark.slow
def test_asha_search_on_s3_writes_results_best_config_and_report_and_restores(tmp_path, ray_session, s3_server, capsys):
    from orchestration.artifacts import TUNE_RESULTS_FILE, RunDir, read_metrics
    from orchestration.report.write import write_report
    from orchestration.sweeps.tune import run_tune

    endpoint = s3_server["endpoint_url"]
    manifest = tiny_corpus_on_s3(tmp_path, endpoint, "raylm-tune")
    overrides = [
        f"train.data={manifest}",
        f"train.endpoint_url={endpoint}",
        "tune.storage_path=s3://raylm-tune/tune",
        "model.block_size=32",
        "train.max_steps=20",
        "train.eval_interval=5",
        "train.val_sequences=32",
        "train.checkpoint_interval=10",
        "tune.num_samples=3",
        "tune.grace_period=5",
        "tune.max_t=20",
        "tune.search_space={train.lr: {loguniform: [1e-3, 1e-2]}, train.warmup_steps: {choice: [2, 4]}}",
    ]
    cfg = load_config(CONFIGS / "tune_tiny.yaml", overrides)
    summary = run_tune(cfg)

    out = RunDir.at(summary["tune_dir"], endpoint)
    assert out.uri == "s3://raylm-tune/tune/tune_tiny" and out.has(TUNE_RESULTS_FILE)
    results = out.read_json(TUNE_RESULTS_FILE)
    trials = results["trials"]
    assert len(trials) == 3 and results["best_trial"] == summary["best"]["trial_id"]
    for t in trials:
        assert t["status"] in ("completed", "stopped"), t
        assert set(t["overrides"]) == {"train.lr", "train.warmup_steps"}
        assert t["final_val_loss"] is not None and t["steps"] >= 5
        assert t["run_dir"] == out.uri_of(f"runs/{t['trial_id']}")  # each trial's run sits in the experiment
        if t["status"] == "completed":  # a stopped trial's metrics end where its last flush did
            assert read_metrics(RunDir.at(t["run_dir"], endpoint))[-1]["step"] == t["steps"]
    assert any(t["status"] == "completed" and t["steps"] == 20 for t in trials)
    assert summary["best_config"] == out.uri_of("best_config.yaml")
    (tmp_path / "best_config.yaml").write_text(out.read_text("best_config.yaml"))
    best = load_any(tmp_path / "best_config.yaml")  # a full config `raylm train --config` accepts
    assert best.train.lr == pytest.approx(summary["best"]["overrides"]["train.lr"])
    assert best.train.run_name == "tune_tiny-best" and best.train.data == manifest
    assert "trial" in capsys.readouterr().out  # the results table
    assert write_report(out.uri, endpoint_url=endpoint)["report.html"] == out.uri_of("report.html")

    again = run_tune(cfg)  # the finished experiment is restored from S3, not re-run
    assert sorted(t["trial_id"] for t in again["trials"]) == sorted(t["trial_id"] for t in trials)
    assert again["wall_s"] < summary["wall_s"]
    with pytest.raises(ConfigError, match="already exists"):
        run_tune(cfg, resume=False)
