"""The report of one training or fine-tuning run: final metrics, loss and throughput curves, the demo's
held-out numbers, a fine-tune's before/after table, the resolved config."""

from __future__ import annotations

import statistics

from model.config import ModelConfig
from model.flops import count_params
from orchestration.artifacts import (
    CONFIG_FILE,
    DEMO_SUMMARY_FILE,
    FINETUNE_SUMMARY_FILE,
    PRIVACY_AUDIT_FILE,
    RUN_FILE,
    RunDir,
    read_metrics,
    read_run_facts,
)
from orchestration.checkpoint_format import checkpoints_newest_first, complete_checkpoint_meta
from orchestration.report.plots import plot_bias, plot_loss, plot_mixture, plot_privacy, plot_throughput
from orchestration.report.render import ReportError, Section, fmt


def run_report(run: RunDir) -> tuple[str, list[Section], dict]:
    """(title, sections, results) of a run directory (config.yaml, run.json, metrics.jsonl)."""
    if not run.has(RUN_FILE):
        raise ReportError(f"{run.uri} has no {RUN_FILE}: it was written before raylm recorded run facts; re-run it")
    facts = read_run_facts(run)
    records = read_metrics(run)
    if not records:
        raise ReportError(f"{run.uri}/metrics.jsonl has no records: the run has not logged a step yet")
    last = records[-1]
    model_cfg = ModelConfig(**facts["model"])
    # every record's flops_per_s is tokens_per_s x the training FLOPs per token of this model
    fpt = last["flops_per_s"] / last["tokens_per_s"] if last["tokens_per_s"] else 0.0
    # Each record averages the steps since the previous one (since start_step after a resume).
    prev = [records[0].get("start_step", 0)] + [r["step"] for r in records[:-1]]
    window_steps = [r["step"] - p for r, p in zip(records, prev)]
    train_s = sum(r["step_time_s"] * n for r, n in zip(records, window_steps))
    wait_s = sum(r["data_wait_s"] * n for r, n in zip(records, window_steps))
    evals = [r for r in records if r.get("val_loss") is not None]
    mfu = [r["mfu"] for r in records if r.get("mfu") is not None]
    complete = {ckpt.name: complete_checkpoint_meta(ckpt) is not None for ckpt in checkpoints_newest_first(run)[::-1]}
    demo = run.read_json(DEMO_SUMMARY_FILE) if run.has(DEMO_SUMMARY_FILE) else None
    summary = {
        "seq_len": facts["seq_len"],
        "params": count_params(model_cfg),
        "non_embedding_params": count_params(model_cfg, non_embedding=True),
        "flops_per_token": fpt,
        "train_flops": last["tokens"] * fpt,
        "train_time_s": train_s,
        "data_wait_share": wait_s / train_s,
        "median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in records),
        "median_flops_per_s": statistics.median(r["flops_per_s"] for r in records),
        "median_mfu": statistics.median(mfu) if mfu else None,
    }
    final_eval = {k: evals[-1].get(k) for k in ("step", "tokens", "val_loss", "val_perplexity")} if evals else None
    results = {
        "kind": "run",
        "source": run.uri,
        "final": last,
        "final_eval": final_eval,
        "summary": summary,
        "checkpoints": complete,
        "demo": demo,
    }
    numel = ", ".join(f"{n:,}" for n in last.get("optimizer_state_numel_per_rank", []))
    rows = [
        ("step", last["step"]),
        ("tokens", last["tokens"]),
        ("train loss (mean of the last log window)", last["loss"]),
        ("validation loss", final_eval and final_eval["val_loss"]),
        ("validation perplexity", final_eval and final_eval["val_perplexity"]),
        ("parameters (non-embedding)", f"{summary['params']:,} ({summary['non_embedding_params']:,})"),
        ("seq_len", facts["seq_len"]),
        ("FLOPs per token", fpt),
        ("training FLOPs", summary["train_flops"]),
        ("training time, s (eval and checkpoints excluded)", train_s),
        ("median tokens/s", summary["median_tokens_per_s"]),
        (
            "median MFU" if mfu else "median achieved FLOP/s (no device peak: no MFU)",
            f"{summary['median_mfu']:.1%}" if mfu else summary["median_flops_per_s"],
        ),
        ("time waiting for data", f"{summary['data_wait_share']:.1%}"),
        ("last lr, grad norm", f"{fmt(last['lr'])}, {fmt(last.get('grad_norm'))}"),
        ("optimizer state elements per rank", numel or "-"),
        ("checkpoints", ", ".join(f"{n}{'' if ok else ' (incomplete)'}" for n, ok in complete.items()) or "none"),
    ]
    if last.get("dp_epsilon") is not None:
        results["privacy"] = {k: v for k, v in last.items() if k.startswith("dp_") and k != "dp_rows_sampled"}
        rows[4:4] = [
            (
                "differential privacy (epsilon, delta)",
                f"({fmt(last['dp_epsilon'])}, {last['dp_delta']:g}) after {last['dp_steps']} steps",
            ),
            (
                "DP-SGD noise multiplier, per-row clip, sample rate",
                f"{fmt(last['dp_noise_multiplier'])}, {fmt(last['dp_max_grad_norm'])}, {fmt(last['dp_sample_rate'])}",
            ),
        ]
    sections: list[Section] = [
        ("Final metrics", [("table", ("metric", "value"), [(k, fmt(v)) for k, v in rows])]),
        (
            "Loss",
            [
                (
                    "text",
                    f"Training FLOPs = tokens x {fpt:.4g} FLOPs/token (model.flops, seq_len {facts['seq_len']}). "
                    f"Validation loss at {len(evals)} eval step(s).",
                ),
                ("figure", "loss.png", plot_loss(records, fpt)),
            ],
        ),
        (
            "Throughput",
            [
                ("text", "Each point averages the steps of one log window."),
                ("figure", "throughput.png", plot_throughput(records)),
            ],
        ),
    ]
    mixture = sorted({k.split("/", 1)[1] for r in records for k in r if k.startswith("data_epochs/")})
    if mixture:
        final = {name: evals[-1].get(f"val_loss/{name}") if evals else None for name in mixture}
        results["mixture"] = {"val_loss": final, "epochs": {n: last.get(f"data_epochs/{n}") for n in mixture}}
        table = [(n, fmt(final[n]), fmt(last.get(f"data_epochs/{n}"))) for n in mixture]
        sections.append(
            (
                "Data mixture",
                [
                    (
                        "text",
                        "Each source's val loss on its own val rows (train.val_sequences of them); the run's "
                        "validation loss is their mean at its weights. Epochs: the source's train rows read so far "
                        "(train.mixture_exhausted says what happens past 1).",
                    ),
                    ("table", ("source", "final val loss", "epochs read"), table),
                    ("figure", "mixture.png", plot_mixture(records)),
                ],
            )
        )
    if results.get("privacy"):
        sections.append(
            (
                "Differential privacy",
                [
                    (
                        "text",
                        "DP-SGD (train.dp, Opacus): each step a Poisson sample of the train rows, each row's gradient "
                        "clipped, Gaussian noise added. Epsilon at the run's delta from Opacus' RDP accountant over "
                        "the steps taken; train loss and tokens/s count the rows actually drawn.",
                    ),
                    ("figure", "privacy.png", plot_privacy(records)),
                ],
            )
        )
    if any(r.get("bias_score") is not None for r in records):
        biased = [r for r in records if r.get("bias_score") is not None]
        results["bias_over_training"] = [
            {k: v for k, v in r.items() if k == "step" or k.startswith("bias")} for r in biased
        ]
        sections.append(
            (
                "Bias over training",
                [
                    (
                        "text",
                        "The bias probe (`raylm eval --suite bias`: stereotype vs anti-stereotype log odds on "
                        "configs/eval/bias_templates.yaml; positive = the stereotype is the likelier pairing) at "
                        f"each of {len(biased)} evaluations (train.bias_probe). A probe, not a certification.",
                    ),
                    ("figure", "bias.png", plot_bias(records)),
                ],
            )
        )
    if demo is not None:
        sections.append(("Demo: held-out evaluation and a sample", _demo_blocks(demo)))
    if run.has(FINETUNE_SUMMARY_FILE):
        from orchestration.finetune.summary import summary_blocks

        finetune = run.read_json(FINETUNE_SUMMARY_FILE)
        results["finetune"] = finetune
        sections.insert(0, ("Fine-tuning: before / after", summary_blocks(finetune)))
    if run.has(PRIVACY_AUDIT_FILE):  # `raylm eval --suite privacy` on one of its checkpoints
        from orchestration.report.privacy import privacy_blocks

        results["privacy_audit"] = run.read_json(PRIVACY_AUDIT_FILE)
        sections.append(("Privacy audit", privacy_blocks(results["privacy_audit"])))
    sections.append(("Config", [("code", run.read_text(CONFIG_FILE))]))
    return f"Run {run.name}", sections, results


def _demo_blocks(demo: dict) -> list:
    gap = demo["unigram_entropy"] - demo["val_loss"]
    return [
        (
            "table",
            ("metric", "value"),
            [
                ("validation loss (held-out eval)", fmt(demo["val_loss"])),
                ("validation tokens scored", fmt(demo["val_tokens"])),
                ("unigram entropy of the data", fmt(demo["unigram_entropy"])),
                ("below the unigram baseline, nats/token", fmt(gap)),
            ],
        ),
        ("code", demo["prompt"] + demo["sample"]),
    ]
