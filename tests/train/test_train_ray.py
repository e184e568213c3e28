"""End-to-end pretraining on local Ray Train (gloo, CPU) with 2 workers and a tiny GPT: DDP at ZeRO
stage 0, DeepSpeed at stages 1-3.

Launches are the expensive part (~15-20 s each on 2 cores), so each one feeds several assertions:
one reference run per stage (the same loss trajectory, optimizer state shards, checkpoints are
complete), variants with activation checkpointing + compile and with bf16, one run whose worker
process dies mid-run (FailureConfig absorbs it), one driver restart, all compared
against the uninterrupted references.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers import tiny_config, tiny_corpus_manifest

from orchestration.artifacts import RunDir, latest_complete_checkpoint
from orchestration.config import ConfigError
from orchestration.train.loop import FAIL_AT_STEP_ENV, FAIL_MARKER_ENV

pytestmark = pytest.mark.slow
STEPS = 20  # tiny_config: 20 steps, checkpoints at 10 and 20, eval at 10 and 20
TRAJECTORY_TOL = 1e-3  # fp32 runs that differ in reduction order or recompute: loss gap at any logged step
BF16_TOL = 0.05  # bf16 matmuls vs fp32, same steps


def _metrics(run_dir: str) -> list[dict]:
    with open(f"{run_dir}/metrics.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("train")
    return root, tiny_corpus_manifest(root)


@pytest.fixture(scope="module")
def reference_runs(workdir):
    """One uninterrupted run per ZeRO stage: {stage: (summary, metrics records)}."""
    from orchestration.train.driver import run_training

    root, manifest = workdir
    runs = {}
    for stage in (0, 1, 2, 3):
        # the ZeRO-0 run also feeds TensorBoard and MLflow (rank 0, in the background)
        trackers = ["train.trackers=[tensorboard, mlflow]"] if stage == 0 else []
        cfg = tiny_config(manifest, root / "runs", f"zero{stage}", zero_stage=stage, overrides=trackers)
        summary = run_training(cfg, resume=False)
        runs[stage] = (summary, _metrics(summary["run_dir"]))
    return runs


def test_every_zero_stage_trains_and_checkpoints(reference_runs):
    for stage, (summary, records) in reference_runs.items():
        assert summary["final_step"] == STEPS, stage
        assert records[-1]["loss"] < records[0]["loss"] - 0.2, (stage, records[0]["loss"], records[-1]["loss"])
        assert summary["final_val_loss"] is not None and math.isfinite(summary["final_val_loss"])
        assert records[-1]["tokens_per_s"] > 0 and records[-1]["mfu"] is None  # CPU: FLOP/s, no MFU
        assert summary["checkpoint"].endswith("checkpoint_00000020")
        ckpt, meta = latest_complete_checkpoint(RunDir.at(summary["run_dir"]))
        assert ckpt.uri == summary["checkpoint"] and meta["step"] == STEPS and meta["zero_stage"] == stage
    # Same data, seed and init: DDP (stage 0) and ZeRO 1-3 differ only in reduction order
    ddp = _losses(reference_runs[0][1])
    for stage in (1, 2, 3):
        gap = max(abs(a - b) for a, b in zip(_losses(reference_runs[stage][1]), ddp))
        print(f"ZeRO-{stage} vs DDP: largest train/val loss gap over the run {gap:.2e}")
        assert gap < TRAJECTORY_TOL, (stage, gap)


def _losses(records: list[dict]) -> list[float]:
    """The run's trajectory: train loss at every logged step, then val loss at every eval."""
    return [r["loss"] for r in records] + [r["val_loss"] for r in records if "val_loss" in r]


def test_checkpointing_compile_and_bf16_keep_the_trajectory(reference_runs, workdir):
    """Activation checkpointing with per-block compile recomputes the same math (fp32: float noise);
    bf16 (DDP autocast; DeepSpeed's bf16 ZeRO-2) rounds every matmul, so it follows looser."""
    from orchestration.train.driver import run_training

    root, manifest = workdir
    variants = {
        "zero0-ckpt-compile": (0, ["train.activation_checkpointing=selective", "train.compile=true"], TRAJECTORY_TOL),
        "zero0-bf16": (0, ["train.precision=bf16"], BF16_TOL),
        "zero2-bf16": (2, ["train.precision=bf16"], BF16_TOL),
    }
    for name, (stage, overrides, tol) in variants.items():
        summary = run_training(tiny_config(manifest, root / "runs", name, zero_stage=stage, overrides=overrides))
        records = _metrics(summary["run_dir"])
        gap = max(abs(a - b) for a, b in zip(_losses(records), _losses(reference_runs[stage][1])))
        print(f"{name} vs fp32 ZeRO-{stage}: largest loss gap {gap:.2e} (tolerance {tol})")
        assert summary["final_step"] == STEPS and records[-1]["loss"] < records[0]["loss"] - 0.2, name
        assert gap < tol, (name, gap)


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


def test_consolidated_checkpoint_evaluates_and_generates(reference_runs, workdir, tmp_path):
    from orchestration.evaluate.lm import evaluate_lm
    from orchestration.evaluate.load import load_checkpoint_model
    from orchestration.evaluate.sample import generate_text

    root, manifest = workdir
    summary, records = reference_runs[3]  # ZeRO-3: weights were gathered from shards
    model, model_cfg, enc, meta = load_checkpoint_model(summary["run_dir"])
    assert meta["step"] == STEPS and model_cfg.n_embd == 32 and enc.n_vocab == model_cfg.vocab_size
    # Same val sequences as the in-training eval (2 micro-batches x 4 x 2 ranks): same loss
    result = evaluate_lm(summary["checkpoint"], manifest, max_sequences=16, batch_size=4)
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
        meta_file = copy / "raylm_meta.json"
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


def test_worker_crash_is_absorbed_and_matches_uninterrupted_run(reference_runs, workdir, monkeypatch, tmp_path):
    """ZeRO-3: the last rank's process exits hard at step 17; Ray restarts the workers from the
    step-10 checkpoint and the run ends exactly where the uninterrupted one did."""
    from orchestration.train.driver import run_training

    root, manifest = workdir
    monkeypatch.setenv(FAIL_AT_STEP_ENV, "17")
    monkeypatch.setenv(FAIL_MARKER_ENV, str(tmp_path / "crashed"))
    cfg = tiny_config(manifest, root / "runs", "zero3-crash", zero_stage=3, overrides=["train.max_failures=1"])
    summary = run_training(cfg, resume=False)
    assert (tmp_path / "crashed").exists()  # the crash really happened
    records = _metrics(summary["run_dir"])
    assert records[-1]["start_step"] == 10  # the surviving attempt resumed from the checkpoint
    assert [r["step"] for r in records] == [5, 10, 15, 20]  # redone steps are logged once
    ref_summary, ref_records = reference_runs[3]
    # Resuming at step 10 read only the rows from step 10 on: by step 15 each rank has read at most its
    # 5 steps x 8 rows plus the reader's read-ahead (2 queued steps + 1 in the prefetch thread's hand),
    # the same as a run from step 0 at its step 5.
    per_rank_step = 8  # global batch 16 / 2 ranks
    for first_record in (records[2], ref_records[0]):
        assert all(0 < rows <= (5 + 3) * per_rank_step for rows in first_record["data_read_rows_per_rank"])
    assert records[2]["data_read_rows_per_rank"] == ref_records[0]["data_read_rows_per_rank"]
    assert summary["final_step"] == ref_summary["final_step"] == STEPS
    assert summary["final_loss"] == pytest.approx(ref_summary["final_loss"], abs=1e-5)
    assert summary["final_val_loss"] == pytest.approx(ref_summary["final_val_loss"], abs=1e-5)


def test_worker_count_does_not_change_the_run(reference_runs, workdir):
    """The same global batch on 1, 2 and 4 workers: every rank reads its slice of the same global
    batches, so loss trajectories agree to reduction-order tolerance and the fixed val set gives the
    same val loss."""
    from orchestration.train.driver import run_training

    root, manifest = workdir
    _, two = reference_runs[1]  # ZeRO-1, 2 workers x 4 sequences x 2 accumulation steps
    for workers, accum in ((1, 4), (4, 1)):
        cfg = tiny_config(
            manifest,
            root / "runs",
            f"zero1-w{workers}",
            zero_stage=1,
            overrides=[f"train.num_workers={workers}", f"train.grad_accum_steps={accum}"],
        )
        records = _metrics(run_training(cfg, resume=False)["run_dir"])
        assert [r["step"] for r in records] == [r["step"] for r in two]
        for ours, theirs in zip(records, two):
            assert ours["loss"] == pytest.approx(theirs["loss"], abs=2e-3), (workers, ours["step"])
            if "val_loss" in theirs:
                assert ours["val_loss"] == pytest.approx(theirs["val_loss"], abs=1e-3), (workers, ours["step"])
        # every rank trained on global batch / workers rows per step and read only those (8-row blocks)
        trained = records[-1]["data_trained_bytes_per_rank"]
        assert len(trained) == workers and len(set(trained)) == 1


def _assert_same_end(records: list[dict], ref_records: list[dict], what: str) -> None:
    """Every logged step the resumed run shares with the uninterrupted one, to reduction-order tolerance
    (well inside the 0.02 nats a resharded resume is allowed)."""
    ref = {r["step"]: r for r in ref_records}
    for ours in records:
        theirs = ref[ours["step"]]
        assert ours["loss"] == pytest.approx(theirs["loss"], abs=2e-3), (what, ours["step"])
        if "val_loss" in theirs:
            assert ours["val_loss"] == pytest.approx(theirs["val_loss"], abs=1e-3), (what, ours["step"])
    assert records[-1]["step"] == ref_records[-1]["step"] == STEPS, what


def test_checkpoints_resume_on_another_worker_count(reference_runs, workdir):
    """Same global batch, another worker count: DDP's unsharded state and ZeRO-1's (resharded through
    DeepSpeed's universal checkpoint) go 2 -> 1 workers; ZeRO-3 goes 2 -> 3 -> 2. Each continuation ends
    where the uninterrupted run ends."""
    from orchestration.train.driver import run_training

    root, manifest = workdir
    one = ["train.num_workers=1", "train.grad_accum_steps=4"]  # global batch 16, as the references
    for stage in (0, 1):
        ref_summary, ref_records = reference_runs[stage]
        cfg = tiny_config(manifest, root / "runs", f"zero{stage}-2to1", zero_stage=stage, overrides=one)
        summary = run_training(cfg, branch_from=f"{ref_summary['run_dir']}/checkpoint_00000010")
        records = _metrics(summary["run_dir"])
        assert records[0]["start_step"] == 10 and len(records[-1]["data_read_rows_per_rank"]) == 1
        _assert_same_end(records, ref_records, f"ZeRO-{stage} 2 -> 1")

    # global batch 24 = 2 workers x 4 x 3 = 3 workers x 4 x 2
    def zero3(name: str, workers: int, accum: int, branch_from=None, extra=()):
        overrides = [f"train.num_workers={workers}", f"train.grad_accum_steps={accum}", *extra]
        cfg = tiny_config(manifest, root / "runs", name, zero_stage=3, overrides=overrides)
        summary = run_training(cfg, branch_from=branch_from)
        return summary["run_dir"], _metrics(summary["run_dir"])

    two_dir, two = zero3("zero3-g24-w2", 2, 3)
    three_dir, three = zero3("zero3-g24-2to3", 3, 2, f"{two_dir}/checkpoint_00000010", ["train.checkpoint_interval=5"])
    assert len(three[-1]["data_read_rows_per_rank"]) == 3
    _assert_same_end(three, two, "ZeRO-3 2 -> 3")
    _, back = zero3("zero3-g24-3to2", 2, 3, f"{three_dir}/checkpoint_00000015")
    assert back[0]["start_step"] == 15
    _assert_same_end(back, two, "ZeRO-3 3 -> 2")


def test_killed_run_restarts_from_its_checkpoint(reference_runs, workdir, monkeypatch, tmp_path, capsys):
    """ZeRO-2: a run dies with no retries left, saying from where re-running it resumes; running it
    again resumes at step 10 and matches the uninterrupted run (model, optimizer, LR schedule, data
    position)."""
    from orchestration.train.driver import run_training

    root, manifest = workdir
    cfg = tiny_config(manifest, root / "runs", "zero2-restart", zero_stage=2)
    monkeypatch.setenv(FAIL_AT_STEP_ENV, "17")
    monkeypatch.setenv(FAIL_MARKER_ENV, str(tmp_path / "crashed"))
    with pytest.raises(Exception):  # noqa: B017 - whichever error Ray Train raises for the dead driver's run
        run_training(cfg, resume=False)
    run_dir = str(root / "runs" / "zero2-restart")
    assert latest_complete_checkpoint(RunDir.at(run_dir))[1]["step"] == 10
    hint = f"[raylm] the run failed: re-running it resumes from step 10 ({run_dir}/checkpoint_00000010)"
    assert hint in capsys.readouterr().out
    with pytest.raises(ConfigError, match="already exists"):
        run_training(cfg, resume=False)  # never silently starts over on top of a run
    monkeypatch.delenv(FAIL_AT_STEP_ENV)
    summary = run_training(cfg)  # resume=True
    records = _metrics(run_dir)
    assert records[-1]["start_step"] == 10 and [r["step"] for r in records] == [5, 10, 15, 20]
    ref_summary, _ = reference_runs[2]
    assert summary["final_step"] == STEPS
    assert summary["final_loss"] == pytest.approx(ref_summary["final_loss"], abs=1e-5)
    assert summary["final_val_loss"] == pytest.approx(ref_summary["final_val_loss"], abs=1e-5)


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(reference_runs, workdir, capsys):
    """A file deleted from the newest checkpoint (which Ray's own snapshot lists): re-running the run
    resumes from the previous complete checkpoint by itself and ends where the uninterrupted run ends."""
    import shutil

    from orchestration.train.driver import RAY_SNAPSHOT_FILE, run_training

    root, manifest = workdir
    ref_summary, _ = reference_runs[1]
    run_dir = root / "runs" / "zero1-damaged"
    shutil.copytree(ref_summary["run_dir"], run_dir)  # the finished ZeRO-1 run, under another name
    assert RAY_SNAPSHOT_FILE in {p.name for p in run_dir.iterdir()}
    (run_dir / "checkpoint_00000020" / "model.safetensors").unlink()
    summary = run_training(tiny_config(manifest, root / "runs", "zero1-damaged", zero_stage=1))
    out = capsys.readouterr().out
    assert "checkpoint_00000020" in out and "resuming from step 10" in out
    assert [p.name for p in run_dir.glob(f"{RAY_SNAPSHOT_FILE}.damaged-*")]  # set aside, not deleted
    assert _metrics(str(run_dir))[-1]["start_step"] == 10
    assert summary["final_step"] == STEPS and summary["checkpoint"].endswith("checkpoint_00000020")
    assert latest_complete_checkpoint(RunDir.at(str(run_dir)))[1]["step"] == STEPS  # rewritten whole
    assert summary["final_loss"] == pytest.approx(ref_summary["final_loss"], abs=1e-5)
