"""Hyperparameter search: search-space parsing and checks, trials' GPU shares and how many run at once,
the learning rate across widths (fast); one real ASHA search (slow).

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


def gpu_train(*overrides):
    """A single-worker GPU train section, loaded as a config file would be (no GPU needed to build it)."""
    return load_config(None, ["train.use_gpu=true", "train.num_workers=1", "train.cpus_per_worker=1", *overrides]).train


def test_fractional_gpu_trials_reach_ray_train_and_pack_four_to_a_gpu():
    from ray.train import ScalingConfig

    from orchestration.sweeps.trials import trial_concurrency, trial_resources

    r = trial_resources(gpu_train(), 0.25, "tune.gpus_per_trial")
    assert r.gpus_per_worker == 0.25 and r.train.use_gpu and r.worker == {"CPU": 1.0, "GPU": 0.25}
    # what run_training's TorchTrainer asks Ray Train for (train/driver.py launch), read back from Ray's own config
    ray_asks = ScalingConfig(
        num_workers=r.train.num_workers,
        use_gpu=r.train.use_gpu,
        resources_per_worker={"CPU": r.train.cpus_per_worker, "GPU": r.gpus_per_worker},
    )
    assert ray_asks._resources_per_worker_not_none == r.worker and ray_asks.total_resources == r.per_trial
    assert trial_concurrency(r, {"CPU": 16.0, "GPU": 2.0}, None) == 8  # 2 GPUs / 0.25
    assert trial_concurrency(r, {"CPU": 6.0, "GPU": 2.0}, None) == 6  # the CPUs run out first
    assert trial_concurrency(r, {"CPU": 16.0, "GPU": 2.0}, 3) == 3  # tune.max_concurrent_trials wins
    tenth = trial_resources(gpu_train("train.cpus_per_worker=0.5"), 0.1, "tune.gpus_per_trial")
    assert trial_concurrency(tenth, {"CPU": 16.0, "GPU": 0.3}, None) == 3  # not 2: 0.3 / 0.1 < 3 in floats
    whole = trial_resources(gpu_train("train.num_workers=2"), None, "tune.gpus_per_trial")
    assert whole.gpus_per_worker is None and whole.per_trial == {"CPU": 2.0, "GPU": 2.0}
    assert trial_concurrency(whole, {"CPU": 16.0, "GPU": 8.0}, None) == 4


def test_cpu_only_trials_turn_a_gpu_config_into_cpu_runs():
    from orchestration.sweeps.trials import trial_concurrency, trial_resources

    train = gpu_train("train.precision=fp16")  # fp16 cannot run on CPU: the CPU trials take fp32
    assert train.use_gpu and train.compile
    r = trial_resources(train, 0, "tune.gpus_per_trial")
    assert not r.train.use_gpu and r.train.precision == "fp32" and not r.train.compile
    assert r.gpus_per_worker is None and r.worker == {"CPU": 1.0}
    assert trial_concurrency(r, {"CPU": 4.0}, None) == 4  # a cluster without GPUs holds them
    same = trial_resources(load_config(None, ["train.precision=bf16"]).train, 0, "tune.gpus_per_trial")
    assert same.train.precision == "bf16"  # a CPU config is left as it is


@pytest.mark.parametrize(
    "overrides, gpus, message",
    [
        ((), 0.25, r"tune.gpus_per_trial=0.25 gives each trial a share of a GPU, but train.use_gpu is false"),
        (
            ("train.use_gpu=true", "train.num_workers=2"),
            0.5,
            r"tune.gpus_per_trial=0.5 is the GPU share of a single-worker trial, but train.num_workers=2.*"
            r"set train.num_workers: 1",
        ),
        (("train.use_gpu=true", "train.num_workers=2"), 1.0, r"tune.gpus_per_trial: null for a whole GPU"),
    ],
)
def test_gpu_shares_that_cannot_run_are_refused_naming_the_key(overrides, gpus, message):
    from orchestration.sweeps.trials import trial_resources

    with pytest.raises(ConfigError, match=message):
        trial_resources(load_config(None, list(overrides)).train, gpus, "tune.gpus_per_trial")


def test_a_gpu_share_that_cannot_run_fails_before_any_trial(tmp_path):
    from orchestration.sweeps.tune import run_tune

    cfg = load_config(
        None,
        [
            "tune.search_space={train.lr: {uniform: [1e-3, 2e-3]}}",
            "tune.gpus_per_trial=0.5",
            f"tune.storage_path={tmp_path}",
        ],
    )
    with pytest.raises(ConfigError, match="tune.gpus_per_trial=0.5 .* train.use_gpu is false"):
        run_tune(cfg)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "override, message",
    [
        ("tune.gpus_per_trial=1.5", r"key 'tune.gpus_per_trial' = 1.5 is out of range; allowed \[0.0, 1.0\]"),
        ("tune.gpu_per_trial=0.5", r"unknown key 'tune.gpu_per_trial' \(did you mean 'tune.gpus_per_trial'\?\)"),
    ],
)
def test_gpus_per_trial_is_checked_at_load(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_peak_concurrency_is_the_most_spans_open_at_once():
    from orchestration.sweeps.trials import peak_concurrency

    assert peak_concurrency([]) == 0
    assert peak_concurrency([(0, 10), (5, 15), (12, 20)]) == 2
    assert peak_concurrency([(0, 10), (10, 20), (20, 30)]) == 1  # one ends as the next starts
    assert peak_concurrency([(0, 100), (1, 50), (2, 40), (3, 30), (60, 70)]) == 4
    assert peak_concurrency([(0, 10), (9.5, 20)]) == 2
    assert peak_concurrency([(0, 10), (9.5, 20)], resolution_s=1.0) == 1  # within Tune's 1 s timestamps
    assert peak_concurrency([(5, 5)]) == 1


def test_trial_span_from_tunes_result_fields():
    import pandas as pd

    from orchestration.sweeps.tune import trial_span

    # two reports, then a retry (time_total_s restarts): the span is the first start to the last report
    frame = pd.DataFrame({"timestamp": [105, 120, 150], "time_total_s": [5.2, 20.2, 9.0], "val_loss": [4, 3, 2]})
    assert trial_span(frame) == pytest.approx((99.8, 150.0))
    assert trial_span(pd.DataFrame()) == (None, None) and trial_span(None) == (None, None)


def lr_grid_trials(lrs=(1e-3, 2e-3, 4e-3, 8e-3), widths=(64, 128, 256)) -> list[dict]:
    """Trials of a grid over lr x width x parametrization whose val loss is lowest at lr 8e-3 x 64 / width
    under sp (the optimum moves 2 grid steps over 64-256) and at 4e-3 at every width under mup."""
    import math

    trials = []
    for p in ("sp", "mup"):
        for w in widths:
            best = 8e-3 * 64 / w if p == "sp" else 4e-3
            for lr in lrs:
                trials.append(
                    {
                        "trial_id": f"{p}-{w}-{lr:g}",
                        "overrides": {"train.lr": lr, "model.n_embd": w, "model.parametrization": p},
                        "final_val_loss": 3.0 + 0.1 * math.log2(lr / best) ** 2 - 0.001 * w / 64,
                        "status": "completed",
                    }
                )
    return trials


def test_lr_transfer_finds_the_best_lr_per_width_and_how_far_it_moves():
    from orchestration.sweeps.tune import lr_transfer, lr_transfer_lines

    trials = lr_grid_trials()
    trials.append(dict(trials[0], trial_id="again", final_val_loss=trials[0]["final_val_loss"] + 0.2))  # a repeat
    trials.append(dict(trials[1], trial_id="cut", status="stopped", final_val_loss=9.0))  # ASHA's: left out
    out = lr_transfer(trials, "sp")
    assert out["best_lr"] == {
        "mup": {"64": 4e-3, "128": 4e-3, "256": 4e-3},
        "sp": {"64": 8e-3, "128": 4e-3, "256": 2e-3},
    }
    assert out["optimum_shift_steps"] == {"mup": 0, "sp": 2}
    assert out["lr_grid"]["sp"] == [1e-3, 2e-3, 4e-3, 8e-3] and out["trials_left_out"] == 1
    (repeat,) = [q for q in out["points"] if (q["parametrization"], q["width"], q["lr"]) == ("sp", 64, 1e-3)]
    assert repeat["trials"] == 2 and repeat["val_loss"] == pytest.approx(trials[0]["final_val_loss"] + 0.1)
    assert "sp: the best lr moves 2 step(s) of a 4-value lr grid across widths 64-256" in lr_transfer_lines(out)[1]
    # without model.parametrization in the search, the base config's names the one panel
    plain = [dict(t, overrides={k: v for k, v in t["overrides"].items() if "param" not in k}) for t in trials[:12]]
    assert lr_transfer(plain, "sp")["optimum_shift_steps"] == {"sp": 2}
    assert lr_transfer([{"overrides": {"train.lr": 1e-3}}], "sp") is None  # no width searched


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
    at_once = results["concurrency"]  # tune_tiny.yaml: max_concurrent_trials 2
    assert at_once["max_concurrent_trials"] == 2 and at_once["trials_timed"] == 3
    assert 1 <= at_once["peak_concurrent_trials"] <= 2 and all(t["started_s"] < t["ended_s"] for t in trials)
    assert results["lr_transfer"] is None  # no width searched
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
