"""`raylm demo` end to end on a few kB of the embedded plays, and the console it prints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestration.artifacts import LATEST_RUN_FILE, METRICS_FILE, RunDir, read_metrics
from orchestration.train.progress import ProgressPrinter


def _record(step: int) -> dict:
    return {
        "step": step,
        "loss": 5.0 - step / 10,
        "lr": 1e-3,
        "tokens_per_s": 1000.0,
        "data_wait_s": 0.001,
        "mfu": None,
        "flops_per_s": 2e9,
    }


def test_progress_prints_each_new_record_once_with_an_eta(tmp_path, capsys):
    run = RunDir.at(str(tmp_path / "run"))
    run.write_text(METRICS_FILE, json.dumps(_record(2)) + "\n")  # before a resume: not printed again
    printer = ProgressPrinter(run, 10, poll_s=0.01).start()
    lines = [json.dumps(_record(s)) for s in (2, 4, 6)]
    run.write_text(METRICS_FILE, "\n".join(lines) + "\n")
    printer.stop()
    out = capsys.readouterr().out.splitlines()
    assert [line.split(" | ")[0] for line in out] == ["[raylm] step 4/10", "[raylm] step 6/10"]
    assert out[0].endswith("eta -")  # one record gives no pace yet
    assert "eta 0:" in out[1] and "2.0 GFLOP/s" in out[1]


@pytest.mark.slow
def test_demo_then_every_finetune_config_unmodified(demo_runs, monkeypatch):
    """The README's path in a fresh directory: `raylm demo`, then each configs/finetune_*.yaml with its
    finetune and data sections as shipped (tests/helpers.py ``run_demo_and_finetunes``; the fine-tuning
    tests check each task's results on the same runs)."""
    from orchestration.evaluate.load import resolve_checkpoint

    summary, cfg = demo_runs["summary"], demo_runs["config"]
    assert summary["steps"] == 8 and summary["val_loss"] < 7 and summary["sample"]
    assert [line.split(" | ")[0] for line in demo_runs["stdout"].splitlines() if line.startswith("[raylm] step")] == [
        f"[raylm] step {s}/8" for s in (2, 4, 6, 8)
    ]  # the driver's progress lines: each once, in order
    family = demo_runs["root"] / "runs" / cfg.train.run_name
    assert (family / LATEST_RUN_FILE).read_text().strip() == summary["run_dir"]
    # configs/finetune_*.yaml name `checkpoint: runs/shakespeare`: that resolves to the demo's checkpoint.
    monkeypatch.chdir(demo_runs["root"])
    assert resolve_checkpoint("runs/shakespeare", None) == summary["checkpoint"]
    assert set(demo_runs["exit_codes"].values()) == {0}, demo_runs["exit_codes"]
    # train.bias_probe: the probe at both evals (steps 4 and 8), its curve in the report
    evals = [r for r in read_metrics(RunDir.at(summary["run_dir"])) if "val_loss" in r]
    assert [r["step"] for r in evals] == [4, 8]
    assert all(r["bias_ci"][0] <= r["bias_score"] <= r["bias_ci"][1] for r in evals)
    assert all({k for k in r if k.startswith("bias/")} for r in evals)
    assert "Bias over training" in (Path(summary["run_dir"]) / "report.html").read_text()
    for name, ft in demo_runs["finetunes"].items():  # distill: the demo model is the teacher of a fresh student
        started_from = ft["distill"]["teacher"] if name == "distill" else ft["base_checkpoint"]
        assert started_from == summary["checkpoint"] and ft["final_step"] > 0, (name, ft)


@pytest.mark.slow
def test_privacy_audit_of_the_demo_run(demo_runs, tmp_path, capsys, monkeypatch):
    """The demo's corpus carries planted text (tests/helpers.py ``DEMO_AUDIT``): every planted document
    lands in train, exact dedup keeps one copy of each member passage, and `raylm eval --suite privacy`
    scores all 1,000 secrets, writes the eval JSON, privacy_audit.json and the run report's section."""
    from data_pipeline.manifest import read_manifest
    from data_pipeline.shard_reader import split_rows
    from data_pipeline.tokenizer import EOT
    from orchestration.cli import main
    from orchestration.evaluate.load import load_checkpoint_model

    summary = demo_runs["summary"]
    monkeypatch.chdir(demo_runs["root"])  # the demo's paths are relative to it, as the README's are
    manifest = read_manifest(summary["manifest"])
    assert manifest["audit"]["planted_documents"] == 2 * (1 + 4) + 8 * (1 + 4)
    assert manifest["audit"]["kept_documents"] == 2 * (1 + 4) + 8 * 2  # one copy of each member passage
    enc = load_checkpoint_model(summary["checkpoint"])[2]
    eot = enc.encode_single_token(EOT)
    text = {s: enc.decode([t for t in split_rows(manifest, s).ravel().tolist() if t != eot]) for s in ("train", "val")}
    assert "the secret number is" in text["train"] and "the secret number is" not in text["val"]
    # planted lines come from train works only, and the tokenizer never saw the planted text
    val_plays = {Path(d["source"]).name for d in manifest["split"]["val_documents"]}
    train_plays = [p for p in (demo_runs["root"] / "plays").glob("*.txt") if p.name not in val_plays]
    assert val_plays and train_plays
    train_lines = {line.strip() for p in train_plays for line in p.read_text().splitlines()}
    record = json.loads((Path(summary["manifest"]).parent / manifest["audit"]["file"]).read_text())
    planted = {line for p in record["passages"] for line in p["text"].splitlines()}
    assert planted and planted <= train_lines, planted - train_lines
    documents = manifest["cleaning"]["documents_out"]
    assert documents == 8 and f"on {documents} documents" in demo_runs["stdout"]  # BPE on the corpus alone

    out = tmp_path / "privacy.json"
    args = ["eval", "--suite", "privacy", "--checkpoint", summary["checkpoint"], "--out", str(out)]
    assert main([*args, "--prompt-tokens", "4", "--continuation-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    assert "exposure over all 1,000 secrets (max 10.0 bits)" in printed and "Min-K% AUC" in printed
    result = json.loads(out.read_text())["suites"]["privacy"]
    groups = {g["repetitions"]: g for g in result["exposure"]["by_repetitions"]}
    assert {r: g["canaries"] for r, g in groups.items()} == {0: 32, 1: 2, 4: 2}
    assert groups[4]["copies_kept"] == 4  # different filler around each copy: dedup keeps them all
    assert all(0 <= c["exposure"] <= 10 for c in result["exposure"]["canaries"])
    membership = {g["repetitions"]: g for g in result["membership"]["by_repetitions"]}
    assert membership[4]["copies_kept"] == 1
    assert all(g["loss"]["ci"][0] <= g["loss"]["auc"] <= g["loss"]["ci"][1] for g in membership.values())
    run = Path(summary["run_dir"])
    assert json.loads((run / "privacy_audit.json").read_text()) == result
    assert "Privacy audit" in (run / "report.html").read_text()


def test_demo_prepares_again_over_a_manifest_it_cannot_read(ray_session, tmp_path, capsys):
    """A manifest an older raylm wrote (no row-group index) where the demo's data goes: the demo says
    so and prepares the data again instead of failing (one small prepare, sort-based shuffle)."""
    from data_pipeline.manifest import read_manifest
    from data_pipeline.storage import embedded_corpus_dir
    from orchestration.config import load_config
    from orchestration.demo import DEFAULT_CONFIG, prepared_manifest

    src = tmp_path / "plays"
    src.mkdir()
    for play in sorted(embedded_corpus_dir().glob("*_gut.txt"))[:3]:
        text = play.read_text(encoding="utf-8", errors="replace")
        (src / play.name).write_text(text[len(text) // 3 : len(text) // 3 + 8_000], encoding="utf-8")
    out = tmp_path / "data"
    out.mkdir()
    old = {"format": "raylm-token-manifest/1", "splits": {"train": {"shards": [{"file": "train/gone.parquet"}]}}}
    (out / "manifest.json").write_text(json.dumps(old))
    overrides = [f"data.sources.uris=[{src}/*.txt]", f"data.output.uri={out}", "data.shuffle=sort",
                 "data.clean.strip_gutenberg=false", "data.near_dedup.enabled=false",
                 "data.tokenizer.vocab_size=300", "data.output.seq_len=32"]  # fmt: skip
    uri = prepared_manifest(load_config(str(DEFAULT_CONFIG), overrides))
    assert "[demo] preparing the shards again" in capsys.readouterr().out
    manifest = read_manifest(uri)
    assert manifest["splits"]["train"]["index"]["row_groups"] > 0 and (out / "train" / "row_groups.idx").exists()
