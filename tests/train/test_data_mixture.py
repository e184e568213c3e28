"""A run's data mixture: its weights, the schedule a branch extends, the resume rule that keeps them."""

from __future__ import annotations

import pytest

from orchestration.config import ConfigError, load_config
from orchestration.train.config import DPConfig, TrainConfig
from orchestration.train.data_mixture import run_schedule, run_weights
from orchestration.train.driver import check_same_run

MANIFEST = {
    "uri": "/data/mix/manifest.json",
    "mixture": [{"name": "plays", "weight": 0.8}, {"name": "sonnets", "weight": 0.2}],
}
PREPARED = {"plays": 0.8, "sonnets": 0.2}
EVEN = {"plays": 0.5, "sonnets": 0.5}


def test_weights_are_the_prepared_ones_or_the_runs_own_normalized():
    assert run_weights(TrainConfig(), MANIFEST) == pytest.approx(PREPARED)
    assert run_weights(TrainConfig(mixture_weights={"plays": 3, "sonnets": 3}), MANIFEST) == EVEN
    assert run_weights(TrainConfig(), {"uri": "/data/one/manifest.json"}) is None
    with pytest.raises(ConfigError, match=r"each mixture source .*missing \['sonnets'\]; unknown \['poems'\]"):
        run_weights(TrainConfig(mixture_weights={"plays": 1, "poems": 1}), MANIFEST)
    with pytest.raises(ConfigError, match="weights must be numbers > 0"):
        run_weights(TrainConfig(mixture_weights={"plays": 1, "sonnets": 0}), MANIFEST)
    with pytest.raises(ConfigError, match="is not a data mixture"):
        run_weights(TrainConfig(mixture_weights=EVEN), {"uri": "/data/one/manifest.json"})
    dp = TrainConfig(dp=DPConfig(enabled=True, noise_multiplier=1.0), zero_stage=0, grad_clip=0.0)
    with pytest.raises(ConfigError, match="DP-SGD"):
        run_weights(dp, MANIFEST)


def test_a_branch_extends_its_parents_schedule_from_its_step():
    assert run_schedule(PREPARED, MANIFEST, None) == [[0, PREPARED]]
    parent = {"step": 40, "data": MANIFEST["uri"], "mixture_schedule": [[0, PREPARED]]}
    assert run_schedule(PREPARED, MANIFEST, parent) == [[0, PREPARED]]  # a resume: unchanged
    assert run_schedule(EVEN, MANIFEST, parent) == [[0, PREPARED], [40, EVEN]]
    # a branch from an earlier checkpoint of a run whose schedule changed later keeps only what led there
    later = {"step": 30, "data": MANIFEST["uri"], "mixture_schedule": [[0, PREPARED], [40, EVEN]]}
    assert run_schedule(PREPARED, MANIFEST, later) == [[0, PREPARED]]
    assert run_schedule(EVEN, MANIFEST, later) == [[0, PREPARED], [30, EVEN]]
    again = {"step": 40, "data": MANIFEST["uri"], "mixture_schedule": [[0, PREPARED], [40, EVEN]]}
    assert run_schedule(PREPARED, MANIFEST, again) == [[0, PREPARED]]  # back to the weights before: one entry
    # a branch onto other data starts that data's schedule afresh
    other = {"step": 40, "data": "/data/other/manifest.json", "mixture_schedule": [[0, EVEN]]}
    assert run_schedule(PREPARED, MANIFEST, other) == [[0, PREPARED]]


def test_a_resume_keeps_the_weights_a_branch_may_change_them():
    cfg = load_config(None)
    meta = {"config": {}, "step": 40, "data": MANIFEST["uri"], "mixture_weights": PREPARED}
    check_same_run(meta, cfg, {"data": MANIFEST["uri"], "mixture_weights": PREPARED}, "/runs/a/checkpoint_40")
    with pytest.raises(ConfigError, match="mixture_weights=.*--branch-from /runs/a/checkpoint_40"):
        check_same_run(meta, cfg, {"data": MANIFEST["uri"], "mixture_weights": EVEN}, "/runs/a/checkpoint_40")
    check_same_run(meta, cfg, {"data": MANIFEST["uri"], "mixture_weights": EVEN}, "/runs/a/c", branch=True)
