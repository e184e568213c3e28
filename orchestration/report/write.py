"""`raylm report`: one self-contained page for a training run, a scaling sweep, a tune sweep or a
baseline comparison.

A report is data first: each kind builds a title, sections of blocks (text, table, figure, code)
and a ``results`` dict; two small renderers turn the blocks into ``report.html`` (PNGs inlined as
data URIs, inline CSS, nothing fetched) and ``report.md`` (PNGs written next to it), and
``results.json`` keeps the numbers. No templating engine: the blocks are the template.
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
import statistics
from dataclasses import asdict
from typing import Any, Optional

import pyarrow.fs as pafs
import yaml
from matplotlib.figure import Figure

from data_pipeline.storage import filesystem_for, join, write_bytes
from model.flops import count_params, flops_per_token
from orchestration.config import Config, build_dataclass
from orchestration.evaluate.baselines import BASELINES_JSON
from orchestration.report.plots import plot_baselines, plot_loss, plot_throughput, plot_trials
from orchestration.sweeps.fit import (
    BESIROGLU_2024,
    CHINCHILLA_APPROACH3,
    CHINCHILLA_ISOFLOP_EXPONENTS,
    ScalingPoint,
    compute_optimal,
    fit_isoflops,
    fit_law,
)
from orchestration.sweeps.plots import plot_frontier, plot_isoflops, plot_law_fit
from orchestration.train.throughput import read_metrics

# A block is ("text", str) | ("table", headers, rows) | ("figure", file name, Figure) | ("code", str).
Block = tuple
Section = tuple[str, list[Block]]

META_FILE = "raylm_meta.json"  # checkpoint.META_FILE; that module imports torch, which a report never needs
MIN_LAW_POINTS = 6  # the law has 5 parameters: with 5 points it fits any data exactly
TARGET_FACTOR = 100.0  # the sweep's prediction is for 100x its largest budget
BOOTSTRAP_RESAMPLES = 100


class ReportError(ValueError):
    """A directory that cannot be reported on, with what was expected there."""


def write_report(path: str, *, out: Optional[str] = None, endpoint_url: Optional[str] = None) -> dict[str, str]:
    """Report on a run directory (metrics.jsonl + config.yaml), a scaling sweep (scaling_points.json),
    a tune sweep (tune_results.json) or a baseline comparison (baselines.json) at ``path`` (local or
    s3://). Writes report.html, report.md, results.json and the figures' PNGs to ``out`` (default:
    ``path``); returns {file name: URI}."""
    fs, base = filesystem_for(path, endpoint_url)
    if fs.get_file_info(base).type != pafs.FileType.Directory:
        raise ReportError(f"{path} is not a directory; give a run, sweep, tune or baselines directory")
    names = {info.base_name for info in fs.get_file_info(pafs.FileSelector(base))}
    if "scaling_points.json" in names:
        title, sections, results = _sweep_report(fs, base, path)
    elif "tune_results.json" in names:
        title, sections, results = _tune_report(fs, base, path, endpoint_url)
    elif BASELINES_JSON in names:
        title, sections, results = _baselines_report(fs, base, path)
    elif {"metrics.jsonl", "config.yaml"} <= names:
        title, sections, results = _run_report(fs, base, path, names)
    else:
        raise ReportError(
            f"{path} is not a run, sweep, tune or baselines directory: expected metrics.jsonl and "
            "config.yaml (`raylm train`), scaling_points.json (`raylm scaling`), tune_results.json "
            f"(`raylm tune`) or {BASELINES_JSON} (`raylm baseline compare`); "
            f"found {', '.join(sorted(names)) or 'nothing'}"
        )
    out = out or path
    out_fs, out_base = filesystem_for(out, endpoint_url)
    pngs = {block[1]: _png(block[2]) for _, blocks in sections for block in blocks if block[0] == "figure"}
    files = {
        "report.html": _html(title, sections, pngs).encode(),
        "report.md": _markdown(title, sections).encode(),
        "results.json": (json.dumps(results, indent=2) + "\n").encode(),
        **pngs,
    }
    for name, data in files.items():
        write_bytes(out_fs, f"{out_base}/{name}", data)
    return {name: join(out, name) for name in files}


# ---- reading ---------------------------------------------------------------------------------------


def _read_text(fs: pafs.FileSystem, path: str) -> str:
    with fs.open_input_stream(path) as f:
        return f.read().decode("utf-8")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _ci(value: float, ci: Optional[tuple[float, float]]) -> str:
    return f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


# ---- a training run -----------------------------------------------------------------------------------


def _run_report(fs: pafs.FileSystem, base: str, uri: str, names: set[str]) -> tuple[str, list[Section], dict]:
    config_text = _read_text(fs, f"{base}/config.yaml")
    cfg = build_dataclass(Config, yaml.safe_load(config_text), source=f"{uri}/config.yaml")
    records = read_metrics(fs, f"{base}/metrics.jsonl")
    if not records:
        raise ReportError(f"{uri}/metrics.jsonl has no records: the run has not logged a step yet")
    last = records[-1]
    # config.yaml has no seq_len of its own (it is the manifest's); every record has tokens = step x
    # global_batch_size x seq_len.
    seq_len = round(last["tokens"] / (last["step"] * cfg.train.global_batch_size))
    fpt = flops_per_token(cfg.model, seq_len)
    # Each record averages the steps since the previous one (since start_step after a resume).
    prev = [records[0].get("start_step", 0)] + [r["step"] for r in records[:-1]]
    window_steps = [r["step"] - p for r, p in zip(records, prev)]
    train_s = sum(r["step_time_s"] * n for r, n in zip(records, window_steps))
    wait_s = sum(r["data_wait_s"] * n for r, n in zip(records, window_steps))
    evals = [r for r in records if r.get("val_loss") is not None]
    mfu = [r["mfu"] for r in records if r.get("mfu") is not None]
    checkpoints = sorted(
        n
        for n in names
        if n.startswith("checkpoint_") and fs.get_file_info(f"{base}/{n}").type == pafs.FileType.Directory
    )
    complete = {n: fs.get_file_info(f"{base}/{n}/{META_FILE}").type == pafs.FileType.File for n in checkpoints}
    demo = json.loads(_read_text(fs, f"{base}/demo_summary.json")) if "demo_summary.json" in names else None
    summary = {
        "seq_len": seq_len,
        "params": count_params(cfg.model),
        "non_embedding_params": count_params(cfg.model, non_embedding=True),
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
        "source": uri,
        "final": last,
        "final_eval": final_eval,
        "summary": summary,
        "checkpoints": complete,
        "demo": demo,
    }

    rows = [
        ("step", last["step"]),
        ("tokens", last["tokens"]),
        ("train loss", last["loss"]),
        ("validation loss", final_eval and final_eval["val_loss"]),
        ("validation perplexity", final_eval and final_eval["val_perplexity"]),
        ("parameters (non-embedding)", f"{summary['params']:,} ({summary['non_embedding_params']:,})"),
        ("seq_len", seq_len),
        ("FLOPs per token", fpt),
        ("training FLOPs", summary["train_flops"]),
        ("training time, s (eval and checkpoints excluded)", train_s),
        ("median tokens/s", summary["median_tokens_per_s"]),
        (
            "median MFU" if mfu else "median achieved FLOP/s (no device peak: no MFU)",
            f"{summary['median_mfu']:.1%}" if mfu else summary["median_flops_per_s"],
        ),
        ("time waiting for data", f"{summary['data_wait_share']:.1%}"),
        ("last lr, grad norm", f"{_fmt(last['lr'])}, {_fmt(last.get('grad_norm'))}"),
        (
            "optimizer state elements per rank",
            ", ".join(f"{n:,}" for n in last.get("optimizer_state_numel_per_rank", [])) or "-",
        ),
        ("checkpoints", ", ".join(f"{n}{'' if ok else ' (incomplete)'}" for n, ok in complete.items()) or "none"),
    ]
    sections: list[Section] = [
        ("Final metrics", [("table", ("metric", "value"), [(k, _fmt(v)) for k, v in rows])]),
        (
            "Loss",
            [
                (
                    "text",
                    f"Training FLOPs = tokens x {fpt:.4g} FLOPs/token (model.flops, seq_len {seq_len}). "
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
    if demo is not None:
        gap = demo["unigram_entropy"] - demo["val_loss"]
        sections.append(
            (
                "Demo: held-out evaluation and a sample",
                [
                    (
                        "table",
                        ("metric", "value"),
                        [
                            ("validation loss (held-out eval)", _fmt(demo["val_loss"])),
                            ("validation tokens scored", _fmt(demo["val_tokens"])),
                            ("unigram entropy of the data", _fmt(demo["unigram_entropy"])),
                            ("below the unigram baseline, nats/token", _fmt(gap)),
                        ],
                    ),
                    ("code", demo["prompt"] + demo["sample"]),
                ],
            )
        )
    if "finetune_summary.json" in names:
        finetune = json.loads(_read_text(fs, f"{base}/finetune_summary.json"))
        results["finetune"] = finetune
        sections.insert(0, ("Fine-tuning: before / after", _finetune_blocks(finetune)))
    sections.append(("Config", [("code", config_text)]))
    return f"Run {uri.rstrip('/').rsplit('/', 1)[-1]}", sections, results


def _finetune_blocks(summary: dict) -> list:
    """The before/after table of a fine-tune (same val rows, same metric code), plus SFT answers."""
    from orchestration.finetune.driver import headline

    task = summary["task"]
    before, after = headline(task, summary["before"], False), headline(task, summary["after"], True)
    blocks: list = [
        (
            "text",
            f"Task {task}, mode {summary['mode']}, {summary['trainable_params']:,} trainable parameters; "
            f"base {summary['base_checkpoint']}; best checkpoint {summary['best_checkpoint']} (step "
            f"{summary['best_step']} of {summary['total_steps']}"
            + (", stopped early on val loss" if summary["stopped_early"] else "")
            + ").",
        ),
        (
            "table",
            ("metric", "before", "after"),
            [(k, _fmt(before.get(k)), _fmt(after.get(k))) for k in dict.fromkeys([*before, *after])],
        ),
    ]
    if task == "classification":
        blocks.append(
            (
                "text",
                "Before there is no classification head: the pretrained LM scores each label as a "
                f"continuation of {summary['before']['zero_shot']['template']!r} (zero-shot); the "
                "majority class is the floor a classifier must beat.",
            )
        )
    if task == "sft" and summary["after"].get("samples"):
        blocks.append(
            (
                "table",
                ("prompt (end)", "reference", "before", "after"),
                [
                    (a["prompt"][-80:], a["reference"], b["answer"], a["answer"])
                    for b, a in zip(summary["before"]["samples"], summary["after"]["samples"])
                ],
            )
        )
    return blocks


# ---- a scaling sweep ----------------------------------------------------------------------------------


def _fits(points: list[ScalingPoint], kind: str) -> dict[str, Any]:
    """IsoFLOP and parametric fits for one parameter count; a fit that cannot be made is the reason."""
    try:
        iso: Any = fit_isoflops(points, param_kind=kind, n_boot=BOOTSTRAP_RESAMPLES)
    except ValueError as err:
        iso = str(err)
    if len(points) >= MIN_LAW_POINTS:
        law: Any = fit_law(points, param_kind=kind, n_boot=BOOTSTRAP_RESAMPLES)
    else:
        law = f"the parametric law needs at least {MIN_LAW_POINTS} runs; the sweep has {len(points)}"
    return {"isoflop": iso, "law": law}


def _fit_rows(fits: dict[str, dict[str, Any]], target: Optional[float]) -> tuple[list, list[str], list]:
    """Exponent-table rows (ours, then the published references), the reasons a fit is absent, and
    each source's compute-optimal (name, N, D, loss or None) at the target budget."""
    exp_rows, reasons, predictions = [], [], []
    for kind, fit in fits.items():
        iso, law = fit["isoflop"], fit["law"]
        if isinstance(iso, str):
            reasons.append(f"No IsoFLOP fit ({kind} parameters): {iso}")
        else:
            exp_rows.append(
                (
                    f"IsoFLOP ({kind} N)",
                    "-",
                    "-",
                    "-",
                    _ci(iso.params_opt.exponent, iso.params_opt.exponent_ci),
                    _ci(iso.tokens_opt.exponent, iso.tokens_opt.exponent_ci),
                )
            )
            opt_n = iso.params_opt.coefficient * target**iso.params_opt.exponent
            opt_d = iso.tokens_opt.coefficient * target**iso.tokens_opt.exponent
            predictions.append((f"IsoFLOP power laws ({kind} N)", opt_n, opt_d, None))
        if isinstance(law, str):
            reasons.append(f"No parametric fit ({kind} parameters): {law}")
        else:
            ci = law.ci or {}
            exp_rows.append(
                (
                    f"parametric law ({kind} N)",
                    f"{law.law.E:.3f}",
                    _ci(law.law.alpha, ci.get("alpha")),
                    _ci(law.law.beta, ci.get("beta")),
                    _ci(law.params_exponent, ci.get("params_exponent")),
                    _ci(law.tokens_exponent, ci.get("tokens_exponent")),
                )
            )
            opt = compute_optimal(law.law, target)
            predictions.append((f"parametric law ({kind} N)", opt.params, opt.tokens, opt.loss))
    for name, ref in (("Chinchilla approach 3", CHINCHILLA_APPROACH3), ("Besiroglu et al. 2024", BESIROGLU_2024)):
        exp_rows.append(
            (
                f"{name} (published)",
                f"{ref.E:.2f}",
                f"{ref.alpha:.3f}",
                f"{ref.beta:.3f}",
                f"{ref.beta / (ref.alpha + ref.beta):.3f}",
                f"{ref.alpha / (ref.alpha + ref.beta):.3f}",
            )
        )
        if target is not None:
            opt = compute_optimal(ref, target)
            predictions.append((f"{name} (published; loss not comparable)", opt.params, opt.tokens, None))
    c = CHINCHILLA_ISOFLOP_EXPONENTS
    exp_rows.append(
        (
            "Chinchilla approach 2 (published)",
            "-",
            "-",
            "-",
            _ci(c["params_exponent"], c["params_exponent_ci"]),
            _ci(c["tokens_exponent"], c["tokens_exponent_ci"]),
        )
    )
    return exp_rows, reasons, predictions


def _sweep_report(fs: pafs.FileSystem, base: str, uri: str) -> tuple[str, list[Section], dict]:
    sweep = json.loads(_read_text(fs, f"{base}/scaling_points.json"))
    ok = [p for p in sweep["points"] if p.get("status") == "ok"]
    skipped = [p for p in sweep["points"] if p.get("status") != "ok"]
    points = [
        ScalingPoint(
            params=p["params"],
            tokens=p["tokens"],
            loss=p["loss"],
            flops=p.get("flops"),
            non_embedding_params=p.get("non_embedding_params"),
            budget=p.get("budget"),
        )
        for p in ok
    ]
    kinds = ["all"] + (["non_embedding"] if points and all(p.non_embedding_params for p in points) else [])
    fits = {kind: _fits(points, kind) for kind in kinds}
    target = TARGET_FACTOR * max((p.compute for p in points), default=0.0)

    columns = ("params", "non_embedding_params", "tokens", "loss", "flops", "budget", "n_layer", "n_embd", "status")
    blocks: list[Block] = [("table", columns, [[_fmt(p.get(c)) for c in columns] for p in sweep["points"]])]
    if skipped:
        blocks.insert(
            0,
            (
                "text",
                f"{len(skipped)} of {len(sweep['points'])} runs are left out of every fit (status other than 'ok').",
            ),
        )
    sections: list[Section] = [("Runs", blocks)]

    exp_rows, reasons, predictions = _fit_rows(fits, target if points else None)
    fit_blocks: list[Block] = [("text", r) for r in reasons]
    fit_blocks += [
        (
            "text",
            "Fitted here from scaling_points.json (seeded: reruns agree). N_opt ~ C^a and "
            "D_opt ~ C^b; the law is L = E + A/N^alpha + B/D^beta, whose optimum has "
            f"a = beta/(alpha+beta). Brackets: {BOOTSTRAP_RESAMPLES}-resample 95% bootstrap "
            "intervals. Published fits count all parameters on MassiveText: compare exponents, "
            "not E.",
        ),
        ("table", ("fit", "E", "alpha", "beta", "a (N_opt)", "b (D_opt)"), exp_rows),
    ]
    law_all, law_body = (fits.get(k, {}).get("law", "") for k in ("all", "non_embedding"))
    if not isinstance(law_all, str) and not isinstance(law_body, str):
        fit_blocks.append(
            (
                "text",
                f"Counting non-embedding parameters moves alpha from {law_all.law.alpha:.3f} to "
                f"{law_body.law.alpha:.3f} and a from {law_all.params_exponent:.3f} to "
                f"{law_body.params_exponent:.3f}. The counts differ by the embedding, a "
                "vocabulary-sized block that does not grow with depth and is a large share of "
                "a small model's N; Kaplan et al. count non-embedding parameters, Chinchilla "
                "all of them.",
            )
        )
    figures: list[Block] = []
    iso_all = fits["all"]["isoflop"]
    if not isinstance(iso_all, str):
        figures.append(("figure", "isoflops.png", plot_isoflops(points, iso_all)))
        figures.append(
            (
                "figure",
                "frontier.png",
                plot_frontier(iso_all, None if isinstance(law_all, str) else law_all, up_to=target),
            )
        )
    if not isinstance(law_all, str):
        figures.append(("figure", "law_fit.png", plot_law_fit(points, law_all)))
    sections.append(("Fits", fit_blocks + figures))
    holdout = _holdout_blocks(fs, base)
    if holdout:
        sections.append(("Holdout check", holdout))
    if predictions:
        ratios = [p.flops / (6.0 * p.params * p.tokens) for p in points if p.flops]
        sections.append(
            (
                f"Prediction at {target:.3g} FLOPs ({TARGET_FACTOR:.0f}x the largest run)",
                [
                    (
                        "text",
                        "The IsoFLOP power laws are in the sweep's measured compute (FLOPs per token x D, attention "
                        "included); the law's frontier spends C = 6ND"
                        + (
                            f", which for these runs is {min(ratios):.2f}-{max(ratios):.2f}x less than the measured "
                            "compute (FLOPs / 6ND)"
                            if ratios
                            else ""
                        )
                        + ".",
                    ),
                    (
                        "table",
                        ("source", "N_opt", "D_opt", "tokens per parameter", "predicted loss"),
                        [(name, _fmt(n), _fmt(d), _fmt(d / n), _fmt(loss)) for name, n, d, loss in predictions],
                    ),
                ],
            )
        )
    sections.append(
        (
            "Sweep config",
            [("code", yaml.safe_dump({"grid": sweep.get("grid"), "config": sweep.get("config")}, sort_keys=False))],
        )
    )
    results = {
        "kind": "sweep",
        "source": uri,
        "n_points": len(points),
        "n_skipped": len(skipped),
        "fits": {
            kind: {name: (v if isinstance(v, str) else asdict(v)) for name, v in fit.items()}
            for kind, fit in fits.items()
        },
        "target_compute": target,
        "predictions": [{"source": name, "params": n, "tokens": d, "loss": loss} for name, n, d, loss in predictions],
    }
    return f"Scaling sweep {uri.rstrip('/').rsplit('/', 1)[-1]}", sections, results


def _holdout_blocks(fs: pafs.FileSystem, base: str) -> list[Block]:
    """The sweep's holdout check (scaling.holdout): the law fitted without the largest-compute runs,
    predicting them. Read from scaling_fit.json, which the sweep writes."""
    if fs.get_file_info(f"{base}/scaling_fit.json").type != pafs.FileType.File:
        return []
    check = json.loads(_read_text(fs, f"{base}/scaling_fit.json")).get("holdout")
    if not check:
        return []
    if "skipped" in check:
        return [("text", f"Holdout check skipped: {check['skipped']}")]
    law = check["fit"]["law"]
    rows = [
        (
            _fmt(h["params"]),
            _fmt(h["tokens"]),
            _fmt(h["compute"]),
            _fmt(h["loss"]),
            _fmt(h["predicted_loss"]),
            f"{h['rel_error']:.2%}",
        )
        for h in check["held_out"]
    ]
    return [
        (
            "text",
            f"The law fitted on the other {check['fit']['n_points']} runs (E {law['E']:.3f}, alpha "
            f"{law['alpha']:.3f}, beta {law['beta']:.3f}) predicts the {len(rows)} largest-compute run(s): "
            f"max relative error {check['max_rel_error']:.2%} ({check['max_abs_error']:.3f} nats).",
        ),
        ("table", ("params", "tokens", "FLOPs", "observed loss", "predicted loss", "relative error"), rows),
    ]


# ---- a tune sweep ------------------------------------------------------------------------------------


def _tune_report(
    fs: pafs.FileSystem, base: str, uri: str, endpoint_url: Optional[str]
) -> tuple[str, list[Section], dict]:
    trials = json.loads(_read_text(fs, f"{base}/tune_results.json"))["trials"]
    trials.sort(key=lambda t: (t.get("final_val_loss") is None, t.get("final_val_loss") or 0.0))
    keys = sorted({k for t in trials for k in t.get("overrides", {})})
    rows = [
        [
            str(i + 1),
            t["trial_id"],
            t.get("status"),
            _fmt(t.get("steps")),
            _fmt(t.get("final_val_loss")),
            _fmt(t.get("best_val_loss")),
            *(_fmt(t.get("overrides", {}).get(k)) for k in keys),
        ]
        for i, t in enumerate(trials)
    ]
    sections: list[Section] = [
        (
            "Trials, best first",
            [("table", ("rank", "trial", "status", "steps", "val loss", "best val loss", *keys), rows)],
        )
    ]
    has_best = fs.get_file_info(f"{base}/best_config.yaml").type == pafs.FileType.File
    best_config = _read_text(fs, f"{base}/best_config.yaml") if has_best else None
    sections.append(
        ("Best config", [("code", best_config)] if best_config else [("text", f"No best_config.yaml in {uri}.")])
    )
    curves, missing = {}, []
    for t in trials:
        run_fs, run_path = filesystem_for(t["run_dir"], endpoint_url) if t.get("run_dir") else (None, None)
        if run_fs and run_fs.get_file_info(f"{run_path}/metrics.jsonl").type == pafs.FileType.File:
            curves[t["trial_id"]] = read_metrics(run_fs, f"{run_path}/metrics.jsonl")
        else:
            missing.append(t["trial_id"])
    blocks: list[Block] = [("figure", "trials.png", plot_trials(curves))] if curves else []
    if missing:
        blocks.append(("text", f"No metrics.jsonl at the run_dir of {len(missing)} trial(s): {', '.join(missing)}."))
    sections.append(("Loss curves", blocks))
    results = {
        "kind": "tune",
        "source": uri,
        "trials": trials,
        "best": trials[0] if trials else None,
        "best_config": yaml.safe_load(best_config) if best_config else None,
    }
    return f"Tune sweep {uri.rstrip('/').rsplit('/', 1)[-1]}", sections, results


# ---- a baseline comparison -----------------------------------------------------------------------------


def _baselines_report(fs: pafs.FileSystem, base: str, uri: str) -> tuple[str, list[Section], dict]:
    comparison = json.loads(_read_text(fs, f"{base}/{BASELINES_JSON}"))
    rows = sorted(comparison.get("rows") or [], key=lambda r: r["bits_per_byte"])
    if not rows:
        raise ReportError(f"{uri}/{BASELINES_JSON} has no rows; re-run `raylm baseline compare`")
    columns = (
        "model",
        "arch",
        "params",
        "train tokens",
        "train FLOPs",
        "tokens scored",
        "val loss (nats/token)",
        "perplexity",
        "bits per byte",
    )
    table = [
        (
            r["model"],
            r.get("arch"),
            _fmt(r.get("params")),
            _fmt(r.get("train_tokens")),
            _fmt(r.get("train_flops")),
            _fmt(r["tokens"]),
            f"{r['loss']:.4f}",
            f"{r['perplexity']:.2f}",
            f"{r['bits_per_byte']:.4f}",
        )
        for r in rows
    ]
    sections: list[Section] = [
        (
            "Comparison, lowest bits per byte first",
            [
                (
                    "text",
                    f"{len(rows)} models scored on the same {comparison['sequences']} {comparison['split']} windows of "
                    f"{comparison['manifest']}. Bits per byte sums the NLL of the text tokens over the bytes they "
                    "decode to, so it compares across tokenizers; n-gram models have no FLOPs (counting is not "
                    "matmul work), and training tokens are consumed sequences x seq_len.",
                ),
                ("table", columns, table),
                ("figure", "baselines.png", plot_baselines(rows)),
            ],
        ),
        ("Sources", [("table", ("model", "checkpoint or model directory"), [(r["model"], r["source"]) for r in rows])]),
    ]
    results = {
        "kind": "baselines",
        "source": uri,
        **{k: comparison[k] for k in ("manifest", "split", "sequences")},
        "best": rows[0]["model"],
        "rows": rows,
    }
    return f"Baselines {uri.rstrip('/').rsplit('/', 1)[-1]}", sections, results


# ---- rendering -----------------------------------------------------------------------------------------


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


CSS = (
    "body{font-family:sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}"
    "table{border-collapse:collapse;margin:1rem 0}td,th{border:1px solid #ccc;padding:.25rem .5rem;"
    "text-align:left}th{background:#f4f4f4}pre{background:#f7f7f7;padding:.75rem;overflow-x:auto}"
    "img{max-width:100%}"
)


def _html(title: str, sections: list[Section], pngs: dict[str, bytes]) -> str:
    e = html.escape
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title>"
        f"<style>{CSS}</style></head><body><h1>{e(title)}</h1>"
    ]
    for heading, blocks in sections:
        parts.append(f"<h2>{e(heading)}</h2>")
        for block in blocks:
            if block[0] == "text":
                parts.append(f"<p>{e(block[1])}</p>")
            elif block[0] == "code":
                parts.append(f"<pre>{e(block[1])}</pre>")
            elif block[0] == "figure":
                data = base64.b64encode(pngs[block[1]]).decode("ascii")
                parts.append(f"<img alt='{e(block[1])}' src='data:image/png;base64,{data}'>")
            else:
                head = "".join(f"<th>{e(h)}</th>" for h in block[1])
                body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in block[2])
                parts.append(f"<table><tr>{head}</tr>{body}</table>")
    return "\n".join(parts) + "\n</body></html>\n"


def _markdown(title: str, sections: list[Section]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    parts = [f"# {title}"]
    for heading, blocks in sections:
        parts.append(f"## {heading}")
        for block in blocks:
            if block[0] == "text":
                parts.append(block[1])
            elif block[0] == "code":
                fence = "`" * max(3, 1 + max((len(run) for run in re.findall("`+", block[1])), default=0))
                parts.append(f"{fence}\n{block[1].rstrip()}\n{fence}")
            elif block[0] == "figure":
                parts.append(f"![{block[1]}]({block[1]})")
            else:
                lines = ["| " + " | ".join(cell(h) for h in block[1]) + " |", "|" + "---|" * len(block[1])]
                lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in block[2]]
                parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"
