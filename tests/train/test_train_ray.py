"""End-to-end pretraining on local Ray Train (gloo, CPU) with 2 workers and a tiny GPT: DDP at ZeRO
stage 0, DeepSpeed at stages 1-3.

Launches are the expensive part (~15-20 s each on 2 cores), so each one feeds several assertions.
The session's reference runs (tests/conftest.py ``reference_runs``: one uninterrupted run per stage,
the ZeRO-0 one with activation checkpointing, per-block compile and trackers) are what every other
run here is compared against: bf16 variants; branches of a reference checkpoint onto 4, 1 and 3
workers (worker-count invariance and resharded resume in one run each), the 3-worker one with a
worker process dying mid-run (FailureConfig absorbs it) and resumed back onto 2 workers; and one run
killed with no retries left, whose newest registered checkpoint is then damaged before it is re-run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers import tiny_config

from orchestration.artifacts import STOP_REQUEST_FILE, RunDir, read_metrics, request_stop
from orchestration.checkpoint_format import CHECKPOINT_META_FILE, latest_complete_checkpoint
from orchestration.config import ConfigError
from orchestration.train.loop import FAIL_AT_STEP_ENV, FAIL_MARKER_ENV

pytestmark = pytest.mark.slow
STEPS = 20  # tiny_config: 20 steps, checkpoints at 10 and 20, eval at 10 and 20
ROWS_PER_STEP = 24  # tiny_config's global batch
TRAJECTORY_TOL = 1e-3  # fp32 runs that differ in reduction order or recompute: loss gap at any logged step
BF16_TOL = 0.05  # bf16 matmuls vs fp32, same steps


def _metrics(run_dir: str) -> list[dict]:
    return read_metrics(RunDir.at(run_dir))


def _losses(records: list[dict]) -> list[float]:
    """The run's trajectory: train loss at every logged step, then val loss at every eval."""
    return [r["loss"] for r in records] + [r["val_loss"] for r in records if "val_loss" in r]


def _train(reference_runs, name: str, stage: int, overrides=(), **kwargs) -> tuple[dict, list[dict]]:
    """A run beside the references (same data, storage root and tiny_config): (summary, records)."""
    from orchestration.train.driver import run_training

    runs = reference_runs.root / "runs"
    cfg = tiny_config(reference_runs.manifest, runs, name, zero_stage=stage, overrides=overrides)
    summary = run_training(cfg, **kwargs)
    return summary, _metrics(summary["run_dir"])


def test_every_zero_stage_trains_and_checkpoints(reference_runs):
    for stage, (summary, records) in reference_runs.items():
        assert summary["final_step"] == STEPS, stage
        assert records[-1]["loss"] < records[0]["loss"] - 0.2, (stage, records[0]["loss"], records[-1]["loss"])
        assert summary["final_val_loss"] is not None and math.isfinite(summary["final_val_loss"])
        assert records[-1]["tokens_per_s"] > 0 and records[-1]["mfu"] is None  # CPU: FLOP/s, no MFU
        assert summary["checkpoint"].endswith("checkpoint_00000020")
        ckpt, meta = latest_complete_checkpoint(RunDir.at(summary["run_dir"]))
        assert ckpt.uri == summary["checkpoint"] and meta["step"] == STEPS and meta["zero_stage"] == stage
        assert meta["config"]["model"]["parametrization"] == "mup"  # tiny_config: μP's groups and multipliers
    # Same data, seed and init: DDP (stage 0, with selective activation checkpointing and per-block
    # compile: the same math recomputed) and ZeRO 1-3 differ only in reduction order and float noise. Under
    # μP: DeepSpeed steps our AdamW groups with their lr_scale as DDP's torch AdamW does.
    ddp = _losses(reference_runs[0][1])
    for stage in (1, 2, 3):
        gap = max(abs(a - b) for a, b in zip(_losses(reference_runs[stage][1]), ddp))
        print(f"ZeRO-{stage} vs DDP (checkpointing + compile): largest train/val loss gap over the run {gap:.2e}")
        assert gap < TRAJECTORY_TOL, (stage, gap)


def test_bf16_keeps_the_trajectory(reference_runs):
    """bf16 (DDP autocast; DeepSpeed's bf16 ZeRO-2) rounds every matmul, so it follows fp32 loosely."""
    for name, stage in (("zero0-bf16", 0), ("zero2-bf16", 2)):
        summary, records = _train(reference_runs, name, stage, ["train.precision=bf16"])
        gap = max(abs(a - b) for a, b in zip(_losses(records), _losses(reference_runs[stage][1])))
        print(f"{name} vs fp32 ZeRO-{stage}: largest loss gap {gap:.2e} (tolerance {BF16_TOL})")
        assert summary["final_step"] == STEPS and records[-1]["loss"] < records[0]["loss"] - 0.2, name
        assert gap < BF16_TOL, (name, gap)


def test_trackers_write_under_the_run_directory(reference_runs, monkeypatch):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary, records = reference_runs[0]
    run_dir = Path(summary["run_dir"])
    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    losses = [(e.step, e.value) for e in events.Scalars("loss")]
    assert [step for step, _ in losses] == [r["step"] for r in records]
    assert losses[-1][1] == pytest.approx(records[-1]["loss"], rel=1e-6)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads file stores only when asked to
    client = MlflowClient(tracking_uri=(run_dir / "mlflow").as_uri())
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.data.params["train.zero_stage"] == "0"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [10, 20]


def test_zero_shards_optimizer_state(reference_runs):
    per_rank = {stage: records[-1]["optimizer_state_numel_per_rank"] for stage, (_, records) in reference_runs.items()}
    print("optimizer state elements per rank by ZeRO stage:", per_rank)
    full = per_rank[0][0]  # ZeRO-0: every rank holds Adam moments for every parameter
    assert per_rank[0][0] == per_rank[0][1]
    for stage in (1, 2, 3):
        for numel in per_rank[stage]:
            # one of two partitions (plus alignment padding) of the same moments
            assert 0.45 * full <= numel <= 0.6 * full, (stage, numel, full)


def test_consolidated_checkpoint_evaluates_and_generates(reference_runs, tmp_path):
    from orchestration.evaluate.lm import evaluate_lm
    from orchestration.evaluate.load import load_checkpoint_model
    from orchestration.evaluate.sample import generate_text

    summary, records = reference_runs[3]  # ZeRO-3: weights were gathered from shards
    model, model_cfg, enc, meta = load_checkpoint_model(summary["run_dir"])
    assert meta["step"] == STEPS and model_cfg.n_embd == 32 and enc.n_vocab == model_cfg.vocab_size
    # Same val sequences as the in-training eval (train.val_sequences=16, split over the 2 ranks): same loss
    result = evaluate_lm(summary["checkpoint"], reference_runs.manifest, max_sequences=16, batch_size=4)
    assert result["loss"] == pytest.approx(records[-1]["val_loss"], abs=1e-3)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    text_file = tmp_path / "sample.txt"
    text_file.write_text("KING. What say you, my lord? Speak, and be brief.\n" * 20)
    assert evaluate_lm(summary["checkpoint"], str(text_file))["tokens"] > 0
    one = generate_text(summary["checkpoint"], "KING.", 20, seed=7)
    assert isinstance(one, str) and one == generate_text(summary["checkpoint"], "KING.", 20, seed=7)


def test_only_the_last_save_consolidates_and_any_checkpoint_can_be(reference_runs, tmp_path):
    """Interval checkpoints hold each rank's engine files only (no gather in the step loop; the stall
    and bytes per rank are logged); the run's last save streams model.safetensors from the live
    engine; consolidating the engine files afterwards gives the same tensors, at every stage."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from orchestration.evaluate.load import load_checkpoint_model
    from orchestration.train.checkpoint import ensure_consolidated

    for stage, (summary, records) in reference_runs.items():
        run = Path(summary["run_dir"])
        assert not (run / "checkpoint_00000010" / "model.safetensors").exists(), stage
        at_10 = next(r for r in records if r["step"] == 10)
        assert at_10["checkpoint_s"] > 0 and len(at_10["checkpoint_bytes_per_rank"]) == 2
        assert all(size > 0 for size in at_10["checkpoint_bytes_per_rank"])
        streamed = load_file(run / "checkpoint_00000020" / "model.safetensors")
        copy = tmp_path / f"zero{stage}"
        shutil.copytree(run / "checkpoint_00000020", copy)
        (copy / "model.safetensors").unlink()  # the same state, as an interval save leaves it
        meta_file = copy / CHECKPOINT_META_FILE
        meta = json.loads(meta_file.read_text())
        del meta["files"]["model.safetensors"]
        meta_file.write_text(json.dumps(meta))
        assert ensure_consolidated(RunDir.at(str(copy))) and not ensure_consolidated(RunDir.at(str(copy)))
        rebuilt = load_file(copy / "model.safetensors")
        assert rebuilt.keys() == streamed.keys(), stage
        assert all(torch.equal(rebuilt[k], streamed[k]) for k in streamed), stage
        # an interval checkpoint loads for inference: consolidated on the way
        interval = tmp_path / f"zero{stage}-10"
        shutil.copytree(run / "checkpoint_00000010", interval)
        model, _, _, meta = load_checkpoint_model(str(interval))
        assert meta["step"] == 10 and (interval / "model.safetensors").exists()


def _assert_same_end(records: list[dict], ref_records: list[dict], what: str) -> None:
    """Every logged step the branched run shares with the uninterrupted one, to reduction-order tolerance
    (well inside the 0.02 nats a resharded resume is allowed)."""
    ref = {r["step"]: r for r in ref_records}
    for ours in records:
        theirs = ref[ours["step"]]
        assert ours["loss"] == pytest.approx(theirs["loss"], abs=2e-3), (what, ours["step"])
        if "val_loss" in theirs:
            assert ours["val_loss"] == pytest.approx(theirs["val_loss"], abs=1e-3), (what, ours["step"])
    assert records[-1]["step"] == ref_records[-1]["step"] == STEPS, what


def _assert_reads_only_its_rows(records: list[dict], workers: int, what: str) -> None:
    """Every rank trained on global batch / workers rows per step and read only those (8-row blocks)."""
    assert all(len(r["data_read_rows_per_rank"]) == workers for r in records), what
    trained = records[-1]["data_trained_bytes_per_rank"]
    assert len(trained) == workers and len(set(trained)) == 1, what


def test_the_worker_count_changes_neither_the_run_nor_its_resume(reference_runs):
    """Same global batch, another worker count, from a reference's step-10 checkpoint: DDP's unsharded
    state goes 2 -> 4 workers and ZeRO-1's (resharded through DeepSpeed's universal checkpoint) 2 -> 1.
    Every rank reads its slice of the same global batches, so each continuation follows the
    uninterrupted run to reduction-order tolerance and the fixed val set gives the same val loss."""
    branches = {
        0: ["train.num_workers=4", "train.grad_accum_steps=3"],
        1: ["train.num_workers=1", "train.grad_accum_steps=12"],
    }
    for stage, overrides in branches.items():
        ref_summary, ref_records = reference_runs[stage]
        workers = int(overrides[0].split("=")[1])
        branch = f"{ref_summary['run_dir']}/checkpoint_00000010"
        _, records = _train(reference_runs, f"zero{stage}-2to{workers}", stage, overrides, branch_from=branch)
        assert records[0]["start_step"] == 10 and [r["step"] for r in records] == [15, 20]
        _assert_reads_only_its_rows(records, workers, f"ZeRO-{stage} 2 -> {workers}")
        _assert_same_end(records, ref_records, f"ZeRO-{stage} 2 -> {workers}")


def test_zero3_reshards_2_to_3_to_2_and_a_worker_crash_is_absorbed(reference_runs, monkeypatch, tmp_path):
    """ZeRO-3's reference goes from 2 to 3 workers at step 10 (its partitions resharded); on 3 workers the
    last rank's process exits hard at step 17 and Ray restarts the workers from the step-15 checkpoint
    (FailureConfig) by itself; from that run's step 15 the run goes back to 2 workers. Both legs end
    where the uninterrupted run ends, and a resumed rank reads only the rows from its resume step on."""
    ref_summary, ref_records = reference_runs[3]
    monkeypatch.setenv(FAIL_AT_STEP_ENV, "17")
    monkeypatch.setenv(FAIL_MARKER_ENV, str(tmp_path / "crashed"))
    three = ["train.num_workers=3", "train.grad_accum_steps=4", "train.checkpoint_interval=5", "train.max_failures=1"]
    branch = f"{ref_summary['run_dir']}/checkpoint_00000010"
    summary, records = _train(reference_runs, "zero3-2to3", 3, three, branch_from=branch)
    assert (tmp_path / "crashed").exists()  # the crash really happened
    assert [r["step"] for r in records] == [15, 20]  # redone steps are logged once
    assert [r["start_step"] for r in records] == [10, 15]  # the surviving attempt resumed from step 15
    # Five steps after a resume each rank has read at most its 5 steps x 8 rows plus the reader's
    # read-ahead (2 queued steps + 1 in the prefetch thread's hand), whether it resumed at 10 or 15.
    per_rank_step = ROWS_PER_STEP // 3
    for record in records:
        assert all(0 < rows <= (5 + 3) * per_rank_step for rows in record["data_read_rows_per_rank"]), record
    _assert_reads_only_its_rows(records, 3, "ZeRO-3 2 -> 3")
    _assert_same_end(records, ref_records, "ZeRO-3 2 -> 3")
    monkeypatch.delenv(FAIL_AT_STEP_ENV)

    back = f"{summary['run_dir']}/checkpoint_00000015"
    _, records = _train(reference_runs, "zero3-3to2", 3, branch_from=back)
    assert records[0]["start_step"] == 15 and [r["step"] for r in records] == [20]
    _assert_reads_only_its_rows(records, 2, "ZeRO-3 3 -> 2")
    _assert_same_end(records, ref_records, "ZeRO-3 3 -> 2")


def test_a_killed_run_resumes_and_a_damaged_checkpoint_is_skipped(reference_runs, monkeypatch, tmp_path, capsys):
    """ZeRO-2, checkpoints every 5 steps: the run dies at step 17 with no retries left, saying from where
    re-running it resumes (step 15). A file of the newest checkpoint Ray's own snapshot lists is then
    deleted (step 15, or step 10 when the worker died before Ray registered step 15): re-running
    resumes from the newest complete checkpoint by itself, sets Ray's snapshot aside (Ray would refuse
    to start from it), removes a stop request left after the run had died (it would end the re-run at
    once), and ends exactly where the uninterrupted run ends (model, optimizer, LR
    schedule, data position)."""
    from orchestration.train.driver import RAY_SNAPSHOT_FILE, run_training

    cfg = tiny_config(
        reference_runs.manifest,
        reference_runs.root / "runs",
        "zero2-killed",
        zero_stage=2,
        overrides=["train.checkpoint_interval=5"],
    )
    monkeypatch.setenv(FAIL_AT_STEP_ENV, "17")
    monkeypatch.setenv(FAIL_MARKER_ENV, str(tmp_path / "crashed"))
    with pytest.raises(Exception):  # noqa: B017 - whichever error Ray Train raises for the dead worker's run
        run_training(cfg, resume=False)
    run_dir = reference_runs.root / "runs" / "zero2-killed"
    assert latest_complete_checkpoint(RunDir.at(str(run_dir)))[1]["step"] == 15
    hint = f"[raylm] the run failed: re-running it resumes from step 15 ({run_dir}/checkpoint_00000015)"
    assert hint in capsys.readouterr().out
    with pytest.raises(ConfigError, match="already exists"):
        run_training(cfg, resume=False)  # never silently starts over on top of a run
    monkeypatch.delenv(FAIL_AT_STEP_ENV)

    snapshot = json.loads((run_dir / RAY_SNAPSHOT_FILE).read_text())
    damaged = sorted(r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"])[-1]
    resume_step = {"checkpoint_00000015": 10, "checkpoint_00000010": 15}[damaged]
    listed = json.loads((run_dir / damaged / CHECKPOINT_META_FILE).read_text())["files"]
    (run_dir / damaged / sorted(listed)[0]).unlink()
    request_stop(RunDir.at(str(run_dir)))  # `raylm stop` after the run had died: stale by the re-run
    summary = run_training(cfg)  # resume=True
    out = capsys.readouterr().out
    assert f"removed {run_dir}/{STOP_REQUEST_FILE} left from an earlier `raylm stop`" in out
    assert f"damaged or incomplete checkpoint(s) in {run_dir}: {damaged}" in out
    assert f"resuming {run_dir} from step {resume_step}" in out
    assert [p.name for p in run_dir.glob(f"{RAY_SNAPSHOT_FILE}.damaged-*")]  # set aside, not deleted
    records = _metrics(str(run_dir))
    assert records[-1]["start_step"] == resume_step and [r["step"] for r in records] == [5, 10, 15, 20]
    assert summary["final_step"] == STEPS and summary["checkpoint"].endswith("checkpoint_00000020")
    assert latest_complete_checkpoint(RunDir.at(str(run_dir)))[1]["step"] == STEPS
    ref_summary, _ = reference_runs[2]
    assert summary["final_loss"] == pytest.approx(ref_summary["final_loss"], abs=1e-5)
    assert summary["final_val_loss"] == pytest.approx(ref_summary["final_val_loss"], abs=1e-5)
