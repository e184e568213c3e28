"""The report of a Ray Tune search: trials best first, how many ran at once, the best config, every
trial's loss curves and, for a search over learning rate and width, whether the best lr moves with width."""

from __future__ import annotations

from typing import Optional

import yaml

from orchestration.artifacts import BEST_CONFIG_FILE, TUNE_RESULTS_FILE, RunDir, read_metrics
from orchestration.report.plots import plot_lr_transfer, plot_trials
from orchestration.report.render import Block, Section, fmt
from orchestration.sweeps.tune import lr_transfer_lines


def concurrency_blocks(record: Optional[dict], source: str) -> list[Block]:
    """A search's or sweep's ``concurrency`` record: what each trial held, planned and measured trials at once."""
    if record is None:
        return [("text", f"{source} records no concurrency (written before raylm recorded it).")]
    planned, peak = record["max_concurrent_trials"], record["peak_concurrent_trials"]
    row = (
        "null" if record["gpus_per_trial"] is None else fmt(record["gpus_per_trial"]),
        f"{record['workers_per_trial']} x "
        + ", ".join(f"{v:g} {k}" for k, v in record["resources_per_worker"].items()),
        fmt(planned) if planned is not None else "- (no trial ran)",
        fmt(peak),
        fmt(record["trials_timed"]),
    )
    return [
        (
            "text",
            "Planned: the max_concurrent_trials Tune was given (as set, else as many trials as the cluster's CPUs "
            "and GPUs hold). Measured: the most trials whose recorded spans (start to end, to within 1 s) "
            "overlapped; a trial waiting for its workers' resources counts as running.",
        ),
        (
            "table",
            ("gpus_per_trial", "each trial holds", "planned at once", "measured peak at once", "timed trials"),
            [row],
        ),
    ]


def lr_transfer_blocks(transfer: dict) -> list[Block]:
    """The search's ``lr_transfer``: val loss against lr per width, the best lr per width and how far it moves."""
    blocks: list[Block] = []
    if transfer["points"]:
        blocks.append(("figure", "lr_transfer.png", plot_lr_transfer(transfer["points"])))
    rows = [
        (p, w, fmt(lr), fmt(transfer["best_val_loss"][p][w]), f"{transfer['lr_grid'][p].index(lr) + 1} of "
         f"{len(transfer['lr_grid'][p])}")
        for p, lrs in transfer["best_lr"].items()
        for w, lr in sorted(lrs.items(), key=lambda item: int(item[0]))
    ]  # fmt: skip
    blocks.append(("table", ("parametrization", "width", "best lr", "val loss", "step on the lr grid"), rows))
    blocks += [("text", line) for line in lr_transfer_lines(transfer)]
    if transfer["trials_left_out"]:
        blocks.append(
            ("text", f"{transfer['trials_left_out']} trial(s) did not run to the end and are left out of these.")
        )
    return blocks


def tune_report(search: RunDir) -> tuple[str, list[Section], dict]:
    """(title, sections, results) of a search directory (tune_results.json, best_config.yaml)."""
    recorded = search.read_json(TUNE_RESULTS_FILE)
    trials = recorded["trials"]
    trials.sort(key=lambda t: (t.get("final_val_loss") is None, t.get("final_val_loss") or 0.0))
    keys = sorted({k for t in trials for k in t.get("overrides", {})})
    rows = [
        [
            str(i + 1),
            t["trial_id"],
            t.get("status"),
            fmt(t.get("steps")),
            fmt(t.get("final_val_loss")),
            fmt(t.get("best_val_loss")),
            *(fmt(t.get("overrides", {}).get(k)) for k in keys),
        ]
        for i, t in enumerate(trials)
    ]
    sections: list[Section] = [
        (
            "Trials, best first",
            [("table", ("rank", "trial", "status", "steps", "val loss", "best val loss", *keys), rows)],
        ),
        ("Trials at once", concurrency_blocks(recorded.get("concurrency"), TUNE_RESULTS_FILE)),
    ]
    if recorded.get("lr_transfer"):
        sections.append(("Learning rate across widths", lr_transfer_blocks(recorded["lr_transfer"])))
    best_config = search.read_text(BEST_CONFIG_FILE) if search.has(BEST_CONFIG_FILE) else None
    sections.append(
        ("Best config", [("code", best_config)] if best_config else [("text", f"No best_config.yaml in {search.uri}.")])
    )
    curves, missing = {}, []
    for t in trials:
        records = read_metrics(RunDir.at(t["run_dir"], search.endpoint_url)) if t.get("run_dir") else []
        if records:
            curves[t["trial_id"]] = records
        else:
            missing.append(t["trial_id"])
    blocks: list[Block] = [("figure", "trials.png", plot_trials(curves))] if curves else []
    if missing:
        blocks.append(("text", f"No metrics.jsonl at the run_dir of {len(missing)} trial(s): {', '.join(missing)}."))
    sections.append(("Loss curves", blocks))
    results = {
        "kind": "tune",
        "source": search.uri,
        "trials": trials,
        "best": trials[0] if trials else None,
        "best_config": yaml.safe_load(best_config) if best_config else None,
        "concurrency": recorded.get("concurrency"),
        "lr_transfer": recorded.get("lr_transfer"),
    }
    return f"Tune sweep {search.name}", sections, results
