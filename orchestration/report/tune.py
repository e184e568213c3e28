"""The report of a Ray Tune search: trials best first, the best config, every trial's loss curves."""

from __future__ import annotations

import yaml

from orchestration.artifacts import BEST_CONFIG_FILE, TUNE_RESULTS_FILE, RunDir, read_metrics
from orchestration.report.plots import plot_trials
from orchestration.report.render import Block, Section, fmt


def tune_report(search: RunDir) -> tuple[str, list[Section], dict]:
    """(title, sections, results) of a search directory (tune_results.json, best_config.yaml)."""
    trials = search.read_json(TUNE_RESULTS_FILE)["trials"]
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
        )
    ]
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
    }
    return f"Tune sweep {search.name}", sections, results
