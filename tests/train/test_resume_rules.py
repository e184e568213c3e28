"""What a resume may change and what it may not: the seed, data, global batch and shapes define a
run (changing one is refused, naming the key and how to branch or start over instead); the worker
count and micro-batch do not, and a derived global batch follows the run's checkpoint. No trainer
launch: the driver's checks on a checkpoint marker written by hand."""

from __future__ import annotations

import json

import pytest

from orchestration.artifacts import RunDir
from orchestration.checkpoint_format import CHECKPOINT_META_FILE, checkpoint_dir_name
from orchestration.config import ConfigError, config_to_dict, load_config
from orchestration.train.driver import adopt_recorded_batch, check_same_run

RUN = ["train.num_workers=2", "train.micro_batch_size=4", "train.seed=7"]


def _meta(cfg, step: int = 10) -> dict:
    return {"step": step, "files": {}, "config": config_to_dict(cfg), "seq_len": 64, "data": "s3://b/manifest.json"}


def _now(data: str = "s3://b/manifest.json") -> dict:
    return {"seq_len": 64, "data": data}


def _checkpointed_run(tmp_path, overrides) -> RunDir:
    """A run directory whose one checkpoint is complete (a marker listing no files) for ``overrides``."""
    cfg = load_config(None, [*RUN, *overrides, f"train.storage_path={tmp_path}", "train.run_name=r"])
    ckpt = tmp_path / "r" / checkpoint_dir_name(10)
    ckpt.mkdir(parents=True)
    (ckpt / CHECKPOINT_META_FILE).write_text(json.dumps(_meta(cfg)))
    return RunDir.at(str(tmp_path / "r"))


def test_a_resume_refuses_a_new_seed_and_says_how_to_branch():
    before = load_config(None, RUN)
    with pytest.raises(ConfigError) as err:
        check_same_run(_meta(before), load_config(None, [*RUN, "train.seed=8"]), _now(), "runs/r/checkpoint_00000010")
    message = str(err.value)
    assert "train.seed=7" in message and "8" in message
    assert "--branch-from runs/r/checkpoint_00000010" in message and "train.run_name=<new name>" in message
    # a branch is a new run: a new seed (a new data order from the checkpoint's step on) is its point
    check_same_run(_meta(before), load_config(None, [*RUN, "train.seed=8"]), _now(), "ckpt", branch=True)


def test_a_resume_refuses_new_data_a_new_batch_or_shape():
    before = load_config(None, RUN)
    with pytest.raises(ConfigError, match="data='s3://b/manifest.json'.*--branch-from"):
        check_same_run(_meta(before), before, _now("s3://b/other.json"), "ckpt")
    check_same_run(_meta(before), before, _now("s3://b/other.json"), "ckpt", branch=True)
    # document masking changes what every step trains on: a resume keeps it, a branch may flip it
    masked = load_config(None, [*RUN, "model.document_masking=true"])
    with pytest.raises(ConfigError, match="model.document_masking=False.*--branch-from"):
        check_same_run(_meta(before), masked, _now(), "ckpt")
    check_same_run(_meta(before), masked, _now(), "ckpt", branch=True)
    for override, key in (
        ("train.global_batch_size=16", "train.global_batch_size"),
        ("model.n_layer=3", "model.n_layer"),
    ):
        with pytest.raises(ConfigError, match=f"{key}=.*start over under a new train.run_name"):
            check_same_run(_meta(before), load_config(None, [*RUN, override]), _now(), "ckpt", branch=True)


def test_a_resume_may_change_workers_and_micro_batch_when_the_batch_stays():
    before = load_config(None, [*RUN, "train.global_batch_size=16"])
    for changed in (["train.num_workers=1"], ["train.micro_batch_size=2"], ["train.num_workers=4"]):
        now = load_config(None, [*RUN, "train.global_batch_size=16", *changed])
        check_same_run(_meta(before), now, _now(), "ckpt")


def test_a_derived_batch_follows_the_runs_checkpoint(tmp_path, capsys):
    run = _checkpointed_run(tmp_path, [])  # 2 workers x 4: a derived global batch of 8
    resized = load_config(None, ["train.num_workers=1", "train.micro_batch_size=4", "train.seed=7"])
    assert resized.train.global_batch_size == 4 and resized.train.batch_derived
    adopted = adopt_recorded_batch(resized, run).train
    assert (adopted.global_batch_size, adopted.grad_accum_steps, adopted.num_workers) == (8, 2, 1)
    assert "keeping the run's global batch of 8 sequences" in capsys.readouterr().out
    # given by hand, the batch is the user's: check_same_run decides
    explicit = load_config(None, ["train.num_workers=1", "train.micro_batch_size=4", "train.global_batch_size=4"])
    assert adopt_recorded_batch(explicit, run).train.global_batch_size == 4
    # a fresh run directory has nothing to follow; a batch that cannot split is a clear error
    assert adopt_recorded_batch(resized, RunDir.at(str(tmp_path / "fresh"))).train.global_batch_size == 4
    odd = load_config(None, ["train.num_workers=3", "train.micro_batch_size=4"])
    with pytest.raises(ConfigError, match="recorded train.global_batch_size 8"):
        adopt_recorded_batch(odd, run)


def test_a_branch_from_a_quantized_checkpoint_is_refused(tmp_path):
    from orchestration.checkpoint_format import QUANTIZATION_FILE
    from orchestration.train.driver import resume_point

    cfg = load_config(None, [*RUN, f"train.storage_path={tmp_path}", "train.run_name=new"])
    ckpt = tmp_path / "q"
    ckpt.mkdir()
    (ckpt / QUANTIZATION_FILE).write_text("{}")
    meta = {**_meta(cfg), "files": {QUANTIZATION_FILE: 2}, "checkpoint": "runs/src/checkpoint_00000010"}
    (ckpt / CHECKPOINT_META_FILE).write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="quantized weights.*branch from runs/src/checkpoint_00000010"):
        resume_point(RunDir.at(str(tmp_path / "new")), cfg, _now(), resume=False, branch_from=str(ckpt))


def test_a_branch_named_by_a_relative_path_may_change_what_a_branch_may(tmp_path, monkeypatch):
    """The checkpoint's URI is absolute, the --branch-from a user types often relative: still a branch."""
    from orchestration.train.driver import resume_point

    _checkpointed_run(tmp_path, [])
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, [*RUN, "train.seed=8", f"train.storage_path={tmp_path}", "train.run_name=new"])
    uri, meta = resume_point(
        RunDir.at(str(tmp_path / "new")), cfg, _now(), resume=True, branch_from=f"r/{checkpoint_dir_name(10)}"
    )
    assert meta["step"] == 10 and uri.endswith(f"/r/{checkpoint_dir_name(10)}")
