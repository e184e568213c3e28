"""Scaling sweeps: ladder shapes, grids, point keys, WSD branch plans, fits (fast); one real CPU
sweep of 2 sizes at one IsoFLOP budget, re-run to show finished points are reused (slow). The sweep
writes to local storage; tests/sweeps/test_tune.py runs its search on S3, so between them the sweep
drivers' local and object-storage paths are both exercised."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from model.config import ModelConfig
from model.flops import count_params, flops_per_token
from orchestration.config import ConfigError, ScalingRunConfig
from orchestration.config import load_config as load_any
from orchestration.train.schedule import lr_for


def load_config(path=None, overrides=()):
    return load_any(path, overrides, schema=ScalingRunConfig)


CONFIGS = Path(__file__).parents[2] / "configs"
SEQ_LEN, VOCAB = 32, 512


def sweep(*overrides):
    base = [
        "train.num_workers=1",
        "train.micro_batch_size=4",
        "train.warmup_steps=2",
        "train.lr=3e-3",
        "train.min_lr=3e-4",
        "model.block_size=32",
        "scaling.n_layers=[1,2]",
        "scaling.min_steps=15",
    ]
    return load_config(None, base + list(overrides))


def test_ladder_shape_keeps_aspect_and_head_dim():
    from orchestration.sweeps.scaling import ladder_shape

    base = ModelConfig(vocab_size=4096, block_size=256, mlp="swiglu", norm="rmsnorm", pos_encoding="rope", bias=False)
    shapes = [ladder_shape(n, aspect=64, head_dim=64, base=base) for n in (4, 6, 8, 20)]
    assert [(m.n_layer, m.n_embd, m.n_head) for m in shapes] == [(4, 256, 4), (6, 384, 6), (8, 512, 8), (20, 1280, 20)]
    assert all(m.mlp == "swiglu" and m.vocab_size == 4096 and m.preset is None for m in shapes)
    assert ladder_shape(3, aspect=30, head_dim=16, base=base).n_embd == 96  # 90 -> nearest multiple of 16
    sizes = [count_params(m) for m in shapes]
    assert sizes == sorted(sizes)


def test_size_rule_scales_lr_with_width_and_rounds_batch():
    from orchestration.sweeps.scaling import ladder_shape, size_rule

    cfg = sweep(
        "scaling.ref_width=64",
        "scaling.lr_width_power=1.0",
        "scaling.batch_width_power=0.5",
        "train.global_batch_size=8",
    )
    narrow, wide = (ladder_shape(n, 32, 16, cfg.model) for n in (2, 8))  # widths 64, 256
    r_narrow, r_wide = size_rule(cfg, narrow), size_rule(cfg, wide)
    assert r_narrow["lr"] == pytest.approx(3e-3) and r_wide["lr"] == pytest.approx(3e-3 / 4)
    assert r_wide["min_lr"] == pytest.approx(r_wide["lr"] / 10)  # the train section's min_lr/lr ratio
    assert r_narrow["global_batch_size"] == 8 and r_wide["global_batch_size"] == 16  # x sqrt(4)
    assert r_wide["grad_accum_steps"] == 4


def test_grid_and_isoflop_points():
    from orchestration.sweeps.scaling import plan_points

    cfg = sweep("scaling.tokens=[4000,8000]", "scaling.budgets=[2e9,4e9]")
    points = plan_points(cfg, SEQ_LEN, VOCAB, "/sweep")
    grid = [p for p in points if p["kind"] == "grid"]
    iso = [p for p in points if p["kind"] == "isoflop"]
    assert len(grid) == 4 and len(iso) == 4
    assert {p["tokens"] for p in grid} == {round(4000 / 128) * 128, round(8000 / 128) * 128}
    for p in iso:
        model = ModelConfig(**p["config"]["model"])
        assert p["params"] == count_params(model) and p["non_embedding_params"] == count_params(model, True)
        assert p["flops"] == pytest.approx(p["budget"], rel=0.05)  # D = C / flops_per_token, rounded to steps
        assert p["flops"] == pytest.approx(flops_per_token(model, SEQ_LEN) * p["tokens"])
        assert p["config"]["train"]["max_steps"] == p["steps"] and p["config"]["train"]["run_name"] == p["key"]
        assert p["run_dir"] == f"/sweep/runs/{p['key']}"
    small = [p for p in iso if p["n_layer"] == 1]
    assert small[1]["steps"] > small[0]["steps"]  # more compute, same size: more tokens
    assert len({p["key"] for p in points}) == len(points)


def test_point_key_is_the_resolved_config():
    from orchestration.sweeps.scaling import plan_points

    keys = lambda *o: [p["key"] for p in plan_points(sweep("scaling.budgets=[2e9]", *o), SEQ_LEN, VOCAB, "/s")]  # noqa: E731
    assert keys() == keys()
    assert keys() == keys("train.run_name=other", "train.storage_path=/elsewhere", "train.log_interval=3")
    assert keys() == [
        k for k in keys("scaling.n_layers=[1,2,3]", "scaling.min_steps=15") if k in keys()
    ]  # extending the ladder keeps the old points' keys
    assert set(keys()).isdisjoint(keys("train.weight_decay=0.05"))
    assert set(keys()).isdisjoint(keys("train.seed=7"))
    retokenized = [p["key"] for p in plan_points(sweep("scaling.budgets=[2e9]"), SEQ_LEN, VOCAB, "/s", "other-hash")]
    assert set(keys()).isdisjoint(retokenized)  # same manifest path, re-prepared with another tokenizer


@pytest.mark.parametrize(
    "overrides, message",
    [
        ((), "the grid is empty"),
        (("scaling.budgets=[1e6]",), "too small for the smallest model"),
        (("scaling.tokens=[500]",), "fewer than 15"),
        (("scaling.wsd_tokens_per_param=[0.01]",), "stable phase"),
    ],
)
def test_bad_sweeps_fail_while_planning(overrides, message):
    from orchestration.sweeps.scaling import plan_points

    with pytest.raises(ConfigError, match=message):
        plan_points(sweep(*overrides), SEQ_LEN, VOCAB, "/s")


def test_unknown_sweep_key_fails_at_load():
    with pytest.raises(ConfigError, match="unknown key 'scaling.budget'.*did you mean 'scaling.budgets'"):
        load_config(None, ["scaling.budget=[1e9]"])


def test_wsd_branches_resume_the_stable_run_and_save_compute():
    from orchestration.sweeps.scaling import plan_points, wsd_savings

    cfg = sweep("scaling.n_layers=[1]", "scaling.wsd_tokens_per_param=[0.1,0.2,0.4]", "scaling.wsd_decay_fraction=0.2")
    points = plan_points(cfg, SEQ_LEN, VOCAB, "/s")
    (trunk,) = [p for p in points if p["kind"] == "trunk"]
    branches = [p for p in points if p["kind"] == "wsd"]
    assert len(branches) == 3
    t = trunk["config"]["train"]
    assert t["schedule"] == "wsd" and t["decay_fraction"] == 0.0 and t["num_to_keep"] is None
    assert trunk["steps"] == max(b["branch"]["step"] for b in branches)
    for b in branches:
        s = b["branch"]["step"]
        assert s % t["checkpoint_interval"] == 0 and b["branch"]["trunk"] == trunk["key"]
        assert b["branch"]["from"] == f"{trunk['run_dir']}/checkpoint_{s:08d}"
        train = load_config(
            None,
            [
                f"train.{k}={json.dumps(v)}"
                for k, v in b["config"]["train"].items()
                if k in ("lr", "min_lr", "warmup_steps", "schedule", "decay_fraction")
            ]
            + [f"train.max_steps={b['steps']}"],
        ).train
        # stable at the branch point, decaying right after it, min_lr at the end
        assert lr_for(train, s - 1, b["steps"]) == pytest.approx(train.lr)
        assert lr_for(train, s + 1, b["steps"]) < train.lr
        assert lr_for(train, b["steps"] - 1, b["steps"]) == pytest.approx(train.min_lr)
        assert (b["steps"] - s) / b["steps"] == pytest.approx(0.2, abs=0.05)
    saved = wsd_savings(points)
    assert saved["n_branches"] == 3 and 0.2 < saved["saved_fraction"] < 0.6, saved
    assert saved["wsd_flops"] == pytest.approx(
        trunk["flops"] + sum(b["flops"] * (b["steps"] - b["branch"]["step"]) / b["steps"] for b in branches)
    )


@pytest.mark.parametrize(
    "tokens_per_param, decay, saved",
    [
        # doubling lengths: the stable run is 0.8 x 40 of the 75 independent units, the decays 0.2 x 75
        ([5, 10, 20, 40], 0.2, 1 - (0.8 * 40 + 0.2 * 75) / 75),  # 37%
        ([5, 10, 20, 40], 0.1, 1 - (0.9 * 40 + 0.1 * 75) / 75),  # 42%
        # lengths closer together leave less to the longest run: issue 27's >= 50% for four lengths
        ([10, 20, 30, 40], 0.1, 1 - (0.9 * 40 + 0.1 * 100) / 100),  # 54%
    ],
    ids=["doubling-decay0.2", "doubling-decay0.1", "even-decay0.1"],
)
def test_a_four_length_wsd_family_saves_what_its_lengths_allow(tokens_per_param, decay, saved):
    """One stable run and 4 decay branches against 4 independent runs of the same lengths: a family
    can save at most what its shorter lengths cost, 1 - 40/75 = 47% for 5, 10, 20, 40 x N at any decay."""
    from orchestration.sweeps.scaling import plan_points, wsd_savings

    cfg = sweep(f"scaling.wsd_tokens_per_param={tokens_per_param}", f"scaling.wsd_decay_fraction={decay}")
    out = wsd_savings(plan_points(cfg, SEQ_LEN, VOCAB, "/s"))
    assert out["n_stable_runs"] == 2 and out["n_branches"] == 8  # two sizes, four lengths each
    assert out["saved_fraction"] == pytest.approx(saved, abs=0.005)
    assert out["max_saved_fraction"] == pytest.approx(1 - max(tokens_per_param) / sum(tokens_per_param), abs=0.005)
    assert (out["saved_fraction"] >= 0.5) == (tokens_per_param == [10, 20, 30, 40])


def test_cpu_only_points_of_a_gpu_sweep_are_cpu_runs_of_their_own():
    import dataclasses

    from orchestration.sweeps.scaling import plan_points
    from orchestration.sweeps.trials import trial_resources

    cfg = load_config(CONFIGS / "scaling_ladder_gpu.yaml")
    cpu_train = trial_resources(cfg.train, 0, "scaling.gpus_per_trial").train
    cpu = plan_points(dataclasses.replace(cfg, train=cpu_train), 1024, 32768, "/s")
    gpu = plan_points(cfg, 1024, 32768, "/s")
    for p in cpu:
        train = p["config"]["train"]
        assert not train["use_gpu"] and train["precision"] == "fp32" and not train["compile"]
    assert len(cpu) == len(gpu) and {p["key"] for p in cpu}.isdisjoint(p["key"] for p in gpu)


def test_a_gpu_share_that_cannot_run_fails_before_any_trial(tmp_path):
    from orchestration.sweeps.scaling import run_scaling

    cfg = sweep(
        "scaling.budgets=[2e9]",
        "scaling.gpus_per_trial=0.5",
        "train.use_gpu=true",
        "train.num_workers=2",
        "train.micro_batch_size=2",
        f"scaling.storage_path={tmp_path}",
    )
    with pytest.raises(ConfigError, match=r"scaling.gpus_per_trial=0.5 is the GPU share of a single-worker trial"):
        run_scaling(cfg)
    assert not (tmp_path / "scaling").exists()


def _record(params, tokens, loss, budget=None):
    return {
        "params": params,
        "non_embedding_params": params * 0.8,
        "tokens": tokens,
        "flops": 6 * params * tokens,
        "budget": budget,
        "loss": loss,
        "status": "ok",
    }


def test_fits_explain_too_few_points_and_fit_when_enough():
    from orchestration.sweeps.sweep_fit import fit_sweep

    sc = load_config(None, ["scaling.n_boot=0"]).scaling
    few = [_record(1e6, 1e8, 4.0, 1e15), _record(2e6, 5e7, 3.9, 1e15)]
    out = fit_sweep(few, sc)
    fits = out["fits"]["all"]
    assert "too few points for the IsoFLOP fit" in fits["isoflop"]["skipped"]
    assert "needs at least 6 runs; the sweep has 2" in fits["law"]["skipped"]

    law = lambda n, d: 1.8 + 400 / n**0.34 + 410 / d**0.28  # noqa: E731  Chinchilla-like
    records = []
    for c in (1e17, 1e18, 1e19):
        for n in [(c / 6 / 20) ** 0.5 * m for m in (0.25, 0.5, 1, 2, 4)]:
            records.append(_record(n, c / 6 / n, law(n, c / 6 / n), c))
    out = fit_sweep(records, sc)
    fits = out["fits"]["all"]
    assert fits["isoflop"]["n_budgets_used"] == 3
    assert 0.4 < fits["isoflop"]["params_opt"]["exponent"] < 0.6
    assert fits["law"]["law"]["alpha"] == pytest.approx(0.34, abs=0.05)


def test_predict_runs_are_planned_beyond_the_grid_and_checked():
    from orchestration.sweeps.scaling import plan_points

    cfg = sweep("scaling.tokens=[4e4, 8e4]", "scaling.predict=[{n_layer: 3, tokens: 2.4e5}]")
    points = plan_points(cfg, SEQ_LEN, VOCAB, "/s")
    grid, (predicted,) = [p for p in points if p["kind"] == "grid"], [p for p in points if p["kind"] == "predict"]
    assert len(grid) == 4 and predicted["n_layer"] == 3 and predicted["flops"] > 4 * max(p["flops"] for p in grid)
    with pytest.raises(ConfigError, match=r"more compute than every fitted run \(the largest: "):
        plan_points(
            sweep("scaling.tokens=[4e4, 8e4]", "scaling.predict=[{n_layer: 1, tokens: 8e4}]"), SEQ_LEN, VOCAB, "/s"
        )
    with pytest.raises(ConfigError, match="set holdout: 0"):
        sweep("scaling.tokens=[4e4]", "scaling.holdout=1", "scaling.predict=[{n_layer: 3, tokens: 2.4e5}]")
    mup = ["model.parametrization=mup", "model.mup_base_width=16", "scaling.tokens=[4e4]"]
    with pytest.raises(ConfigError, match="set scaling.lr_width_power: 0"):
        plan_points(sweep(*mup), SEQ_LEN, VOCAB, "/s")
    assert {p["lr"] for p in plan_points(sweep(*mup, "scaling.lr_width_power=0"), SEQ_LEN, VOCAB, "/s")} == {3e-3}


def test_predict_runs_stay_out_of_the_fits_and_are_predicted_by_them():
    from orchestration.sweeps.sweep_fit import fit_sweep

    sc = load_config(None, ["scaling.n_boot=20"]).scaling
    law = lambda n, d: 1.8 + 400 / n**0.34 + 410 / d**0.28  # noqa: E731  Chinchilla-like
    grid = [dict(_record(n, d, law(n, d)), kind="grid") for n in (1e6, 2e6, 4e6) for d in (2e7, 4e7, 8e7)]
    far = dict(_record(8e6, 1.6e8, law(8e6, 1.6e8)), kind="predict")  # 4x the grid's largest compute
    out = fit_sweep([*grid, far], sc)
    assert out["n_points"] == 9 and out["fits"]["all"]["law"]["n_points"] == 9
    check = out["holdout"]
    assert check["compute_factor"] == pytest.approx(4.0) and [h["params"] for h in check["held_out"]] == [8e6]
    assert check["max_rel_error"] < 0.01  # noise-free points of the law's own form
    assert any("holdout of the 1 predict run(s) at >= 4.0x" in m for m in out["messages"])
    assert any(re.search(r"alpha 0\.3\d\d \[0\.\d+, 0\.\d+\]", m) for m in out["messages"])  # bootstrap CI


def test_shipped_scaling_configs_plan():
    from orchestration.sweeps.scaling import plan_points

    tiny = plan_points(load_config(CONFIGS / "scaling_tiny.yaml"), 256, 4097, "/s")
    assert len(tiny) == 6 and {p["budget"] for p in tiny} == {1.5e11, 3e11}
    cpu = plan_points(load_config(CONFIGS / "scaling_cpu_isoflop.yaml"), 256, 4097, "/s")
    sizes = {b: sorted(p["n_layer"] for p in cpu if p["budget"] == b) for b in (1.8e12, 2.4e12, 3.2e12)}
    assert len(cpu) == 13 and sizes == {1.8e12: [1, 2, 3, 4], 2.4e12: [1, 2, 3, 4], 3.2e12: [1, 2, 3, 4, 5]}
    law = plan_points(load_config(CONFIGS / "scaling_cpu.yaml"), 256, 4097, "/s")
    fitted = [p["flops"] for p in law if p["kind"] == "grid"]
    (predicted,) = [p["flops"] for p in law if p["kind"] == "predict"]
    assert len(fitted) == 12 and predicted >= 4 * max(fitted)  # the issue's >= 4x extrapolation
    assert {p["config"]["model"]["parametrization"] for p in law} == {"mup"} and {p["lr"] for p in law} == {5e-3}
    gpu = plan_points(load_config(CONFIGS / "scaling_ladder_gpu.yaml"), 1024, 32768, "/s")
    params = [p["params"] for p in gpu]
    assert 1e7 < min(params) and max(params) < 3.6e8 and len({p["budget"] for p in gpu}) == 5
    assert all(p["config"]["train"]["precision"] == "bf16" and p["config"]["train"]["use_gpu"] for p in gpu)


def test_missing_manifest_says_run_prepare(tmp_path):
    from orchestration.sweeps.scaling import run_scaling

    cfg = sweep(
        "scaling.budgets=[2e9]", f"train.data={tmp_path}/nope/manifest.json", f"scaling.storage_path={tmp_path}"
    )
    with pytest.raises(ConfigError, match="raylm prepare"):
        run_scaling(cfg)


def test_bad_sweep_fails_before_any_trial(tiny_corpus, tmp_path):
    from orchestration.sweeps.scaling import run_scaling

    cfg = sweep("scaling.budgets=[1e6]", f"train.data={tiny_corpus}", f"scaling.storage_path={tmp_path}")
    with pytest.raises(ConfigError, match="too small for the smallest model"):
        run_scaling(cfg)
    assert not (tmp_path / "scaling").exists()  # nothing was written, no trial started


@pytest.mark.slow
def test_tiny_isoflop_sweep_runs_writes_points_and_reuses_them(tiny_corpus, tmp_path, ray_session):
    """Two points (2 sizes at one budget), trained at once: the fewest that make a sweep, a fit's
    refusal and a reuse; tests/sweeps/test_scaling_fit.py checks the fits on enough points."""
    from orchestration.sweeps.scaling import run_scaling

    cfg = sweep(
        "scaling.budgets=[2e9]",
        f"train.data={tiny_corpus}",
        f"scaling.storage_path={tmp_path}",
        "train.cpus_per_worker=0.25",
        "scaling.max_concurrent_trials=2",
        "train.eval_interval=0",
        "train.val_sequences=16",
        "train.checkpoint_interval=0",
        "train.num_to_keep=1",
        "scaling.n_boot=10",
    )
    first = run_scaling(cfg)
    assert first["trials_run"] == 2 and first["reused"] == 0 and not first["failed"]

    out = Path(first["sweep_dir"])
    data = json.loads((out / "scaling_points.json").read_text())
    points = data["points"]
    assert len(points) == 2 and data["grid"]["budgets"] == [2e9]
    at_once = data["concurrency"]
    assert at_once["max_concurrent_trials"] == 2 and at_once["trials_timed"] == 2
    assert at_once["resources_per_worker"] == {"CPU": 0.25} and 1 <= at_once["peak_concurrent_trials"] <= 2
    assert all(p["started_s"] < p["ended_s"] for p in points)
    for p in points:
        assert p["status"] == "ok" and math.isfinite(p["loss"]) and p["loss"] < math.log(VOCAB)
        assert p["params"] > p["non_embedding_params"] > 0 and p["n_layer"] in (1, 2)
        assert p["flops"] == pytest.approx(p["budget"], rel=0.05)
        assert (Path(p["run_dir"]) / "metrics.jsonl").is_file() and (out / "points" / f"{p['key']}.json").is_file()
    assert {p["n_layer"] for p in points} == {1, 2}
    fit = json.loads((out / "scaling_fit.json").read_text())
    assert "too few points for the IsoFLOP fit" in fit["fits"]["all"]["isoflop"]["skipped"]  # 2 sizes per budget
    assert "needs at least 6 runs; the sweep has 2" in fit["fits"]["all"]["law"]["skipped"]

    again = run_scaling(cfg)  # nothing new to train: every point is reused, no Tuner starts
    assert again["trials_run"] == 0 and again["reused"] == 2
    assert again["concurrency"]["max_concurrent_trials"] is None  # planned nothing: no trial ran
    assert again["concurrency"]["peak_concurrent_trials"] == at_once["peak_concurrent_trials"]  # the points' times
    assert [p["loss"] for p in again["points"]] == [p["loss"] for p in points]
    assert again["wall_s"] < 10
