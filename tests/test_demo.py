"""`raylm demo` end to end on a few kB of the embedded plays, and the console it prints."""

from __future__ import annotations

import json

import pytest

from data_pipeline.storage import embedded_corpus_dir
from orchestration.artifacts import LATEST_RUN_FILE, METRICS_FILE, RunDir
from orchestration.config import load_config
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


TINY_TRAIN = [
    "train.num_workers=1",
    "train.cpus_per_worker=1",
    "train.micro_batch_size=4",
    "train.grad_accum_steps=1",
    "train.warmup_steps=1",
    "train.log_interval=2",
]


@pytest.mark.slow
def test_demo_then_every_finetune_config_unmodified(ray_session, tmp_path, monkeypatch, capsys):
    """The README's path in a fresh directory: `raylm demo`, then each configs/finetune_*.yaml as
    shipped (only train sizes and the poems' seq_len shrunk to the tiny model)."""
    from orchestration.cli import main
    from orchestration.demo import DEFAULT_CONFIG, run_demo
    from orchestration.evaluate.load import resolve_checkpoint

    plays = sorted(embedded_corpus_dir().glob("*_gut.txt"))[:8]
    src = tmp_path / "plays"
    src.mkdir()
    for play in plays:  # 8 works of 12 kB: prepare takes seconds
        text = play.read_text(encoding="utf-8", errors="replace")
        (src / play.name).write_text(text[len(text) // 3 : len(text) // 3 + 12_000], encoding="utf-8")
    monkeypatch.chdir(tmp_path)  # the configs' relative runs/ paths land here
    cfg = load_config(
        str(DEFAULT_CONFIG),
        [
            f"data.sources.uris=[{src}/*.txt]",
            "data.clean.strip_gutenberg=false",
            "data.near_dedup.enabled=false",
            "data.tokenizer.vocab_size=400",
            "data.output.seq_len=32",
            "data.output.val_fraction=0.25",
            "model.block_size=32",
            "model.n_layer=3",  # finetune_poems.yaml freezes the first 2 blocks
            "model.n_embd=32",
            "model.n_head=2",
            *TINY_TRAIN,
            "train.val_sequences=4",
            "train.max_steps=8",
            "train.eval_interval=4",
            "train.checkpoint_interval=8",
        ],
    )
    summary = run_demo(cfg, max_new_tokens=8)
    out = capsys.readouterr().out
    assert summary["steps"] == 8 and summary["val_loss"] < 7 and summary["sample"]
    assert [line.split(" | ")[0] for line in out.splitlines() if line.startswith("[raylm] step")] == [
        f"[raylm] step {s}/8" for s in (2, 4, 6, 8)
    ]  # the driver's progress lines: each once, in order
    family = tmp_path / "runs" / cfg.train.run_name
    assert (family / LATEST_RUN_FILE).read_text().strip() == summary["run_dir"]
    # configs/finetune_*.yaml name `checkpoint: runs/shakespeare`: that resolves to the demo's checkpoint.
    assert resolve_checkpoint("runs/shakespeare", None) == summary["checkpoint"]

    configs = DEFAULT_CONFIG.parent
    assert main(["prepare", "-c", str(configs / "finetune_poems.yaml"), "data.output.seq_len=32"]) == 0
    few = ["finetune.max_per_document=2", "finetune.max_val_examples=8"]
    for name, extra in (("sft", [*few, "finetune.sample_prompts=1"]), ("genre", few), ("poems", [])):
        argv = ["finetune", "-c", str(configs / f"finetune_{name}.yaml"), *TINY_TRAIN, *extra]
        argv += ["train.max_steps=4", "train.eval_interval=2", "train.checkpoint_interval=2"]
        assert main(argv) == 0, name
        ft = json.loads((tmp_path / "runs" / f"finetune_{name}" / "finetune_summary.json").read_text())
        assert ft["base_checkpoint"] == summary["checkpoint"] and ft["final_step"] == 4, (name, ft)
