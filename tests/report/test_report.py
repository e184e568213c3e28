"""`raylm report` on synthetic run, sweep and tune directories written in the real formats."""

from __future__ import annotations

import base64
import json
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import yaml

from model.flops import count_params, flops_per_token
from orchestration.artifacts import RunDir, write_config, write_run_facts
from orchestration.config import config_to_dict, load_config
from orchestration.report.render import ReportError
from orchestration.report.write import write_report
from orchestration.sweeps.config import SweepConfig
from orchestration.sweeps.fit import LawParams, compute_optimal, predict_loss
from orchestration.sweeps.sweep_fit import fit_sweep

TRUE = LawParams(E=1.8, A=400.0, B=1200.0, alpha=0.34, beta=0.30)
EMBEDDING = 3e5  # parameters outside the non-embedding count, as a 4k vocabulary at width 64


def write_run(
    root: Path,
    *,
    steps=range(10, 101, 10),
    val_every: int = 50,
    loss_at_end: float = 3.9,
    val_at_end: float = 4.321,
    sample: str | None = None,
) -> tuple[Path, list[dict]]:
    """A run directory as `raylm train` leaves it: resolved config, metrics.jsonl in the train
    loop's record schema, checkpoints (the last one incomplete: no raylm_meta.json yet)."""
    cfg = load_config(None)
    seq_len = cfg.model.block_size
    write_config(RunDir.at(str(root)), config_to_dict(cfg))
    write_run_facts(RunDir.at(str(root)), {"task": "pretrain_task", "model": asdict(cfg.model), "seq_len": seq_len})
    fpt = flops_per_token(cfg.model, seq_len)
    steps = list(steps)
    records = []
    for i, step in enumerate(steps):
        tokens_per_s = 4000.0 + 100.0 * i
        record = {
            "step": step,
            "start_step": 0,
            "loss": loss_at_end + (len(steps) - 1 - i) * 0.3,
            "lr": 1e-3 / (i + 1),
            "grad_norm": 0.5,
            "tokens": step * cfg.train.global_batch_size * seq_len,
            "step_time_s": 0.25,
            "data_wait_s": 0.01,
            "optimizer_state_numel_per_rank": [1000, 1000],
            "tokens_per_s": tokens_per_s,
            "flops_per_s": tokens_per_s * fpt,
            "mfu": None,
        }
        if step % val_every == 0:
            val = val_at_end + (len(steps) - 1 - i) * 0.3
            record.update(val_loss=val, val_perplexity=float(np.exp(val)))
        records.append(record)
    (root / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (root / "checkpoint_00000050").mkdir()
    (root / "checkpoint_00000050" / "raylm_meta.json").write_text(json.dumps({"step": 50, "files": {}}))
    (root / "checkpoint_00000100").mkdir()
    if sample is not None:
        (root / "demo_summary.json").write_text(
            json.dumps(
                {
                    "val_loss": 4.4,
                    "val_perplexity": 81.5,
                    "val_tokens": 4096,
                    "unigram_entropy": 5.5,
                    "prompt": "ROMEO:",
                    "sample": sample,
                }
            )
        )
    return root, records


def test_run_report_is_self_contained_and_its_numbers_are_the_runs(tmp_path):
    run, records = write_run(tmp_path / "run", sample=" a <script>alert(1)</script> | & more")
    written = write_report(str(run), out=str(tmp_path / "out"))
    assert set(written) == {"report.html", "report.md", "results.json", "loss.png", "throughput.png"}
    page = Path(written["report.html"]).read_text()
    assert not re.search(r"(src|href)\s*=\s*['\"]?https?://", page)
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    images = re.findall(r"<img[^>]*src='([^']*)'", page)
    assert len(images) == 2
    for src in images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "4.321" in page  # the final validation loss
    assert "checkpoint_00000100 (incomplete)" in page

    results = json.loads(Path(written["results.json"]).read_text())
    assert results["final"] == records[-1]
    assert results["final_eval"] == {k: records[-1][k] for k in ("step", "tokens", "val_loss", "val_perplexity")}
    cfg = load_config(None)
    summary = results["summary"]
    assert summary["seq_len"] == cfg.model.block_size
    assert summary["flops_per_token"] == flops_per_token(cfg.model, cfg.model.block_size)
    assert summary["train_flops"] == records[-1]["tokens"] * summary["flops_per_token"]
    assert summary["params"] == count_params(cfg.model)
    assert summary["train_time_s"] == pytest.approx(100 * 0.25)
    assert summary["data_wait_share"] == pytest.approx(0.01 / 0.25)
    assert summary["median_mfu"] is None
    assert results["checkpoints"] == {"checkpoint_00000050": True, "checkpoint_00000100": False}
    assert results["demo"]["unigram_entropy"] == 5.5

    markdown = Path(written["report.md"]).read_text()
    for name in ("loss.png", "throughput.png"):
        assert f"![{name}]({name})" in markdown and (tmp_path / "out" / name).stat().st_size > 1000
    assert "ROMEO: a <script>" in markdown  # verbatim inside a code block
    assert "train:\n  data:" in markdown  # the resolved config, as YAML


def test_run_report_defaults_to_the_run_dir_and_handles_a_run_without_eval(tmp_path):
    run, records = write_run(tmp_path / "run", val_every=1000)
    written = write_report(str(run))
    assert Path(written["report.html"]).parent == run
    results = json.loads((run / "results.json").read_text())
    assert results["final_eval"] is None and results["demo"] is None
    assert results["final"]["loss"] == records[-1]["loss"]


SWEEP_OFFSETS = np.linspace(-0.6, 0.6, 7)


def sweep_points(budgets=(1e16, 1e17, 1e18), offsets=SWEEP_OFFSETS, noise=0.001) -> list[dict]:
    """`raylm scaling` points for a sweep whose losses follow TRUE (all parameters counted)."""
    rng = np.random.default_rng(0)
    points = []
    for c in budgets:
        for n in compute_optimal(TRUE, c).params * 10.0**offsets:
            d = c / (6.0 * n)
            points.append(
                {
                    "params": float(n),
                    "tokens": float(d),
                    "loss": float(predict_loss(TRUE, n, d) * np.exp(rng.normal(0.0, noise))),
                    "flops": c,
                    "non_embedding_params": float(n - EMBEDDING),
                    "budget": c,
                    "n_layer": 2,
                    "n_embd": 64,
                    "run_dir": f"runs/c{c:.0e}-n{n:.0f}",
                    "status": "ok",
                }
            )
    return points


def write_sweep(root: Path, points: list[dict], **scaling) -> dict:
    """A sweep directory as `raylm scaling` leaves it: its points and the fits its writer computed."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "scaling_points.json").write_text(json.dumps({"points": points, "grid": {}, "config": {}}))
    fit = fit_sweep(points, SweepConfig(**scaling))
    (root / "scaling_fit.json").write_text(json.dumps(fit, default=str))
    return json.loads((root / "scaling_fit.json").read_text())


def test_sweep_report_recovers_the_law_it_was_drawn_from_and_shows_the_sweeps_own_numbers(tmp_path):
    points = sweep_points()
    failed = dict(points[0], status="failed", loss=99.0)
    fit = write_sweep(tmp_path, points + [failed], n_boot=20)
    written = write_report(str(tmp_path))
    assert {"isoflops.png", "frontier.png", "law_fit.png"} <= set(written)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["n_points"] == len(points) and results["n_skipped"] == 1
    law = results["fits"]["all"]["law"]
    assert law["law"]["alpha"] == pytest.approx(TRUE.alpha, abs=0.03)
    assert law["law"]["beta"] == pytest.approx(TRUE.beta, abs=0.03)
    true_a = TRUE.beta / (TRUE.alpha + TRUE.beta)
    assert results["fits"]["all"]["isoflop"]["params_opt"]["exponent"] == pytest.approx(true_a, abs=0.03)
    # Non-embedding N is the same runs minus a fixed embedding: a different (wrong here) exponent.
    body = results["fits"]["non_embedding"]["law"]
    assert abs(body["law"]["alpha"] - law["law"]["alpha"]) > 0.01
    assert results["target_compute"] == pytest.approx(100 * 1e18)
    predicted = {p["source"]: p for p in results["predictions"]}
    truth = compute_optimal(TRUE, 1e20)
    assert predicted["parametric law (all N)"]["params"] == pytest.approx(truth.params, rel=0.25)
    page = Path(written["report.html"]).read_text()
    assert "Chinchilla approach 3 (published)" in page and "Counting non-embedding parameters" in page
    assert "Holdout check" not in page  # the sweep had no holdout
    # nothing refitted: the report's numbers are exactly the ones in scaling_fit.json
    assert results["fits"] == fit["fits"] and results["predictions"] == fit["predictions"]
    alpha = fit["fits"]["all"]["law"]["law"]["alpha"]
    assert f"{alpha:.3f}" in page


def test_sweep_report_shows_the_wsd_compute_saved_and_trials_at_once(tmp_path):
    fit = write_sweep(tmp_path, sweep_points(), n_boot=0)
    saved = {
        "independent_flops": 7.5e15,
        "wsd_flops": 4.7e15,
        "saved_flops": 2.8e15,
        "saved_fraction": 2.8 / 7.5,
        "max_saved_fraction": 1 - 4 / 7.5,
        "n_stable_runs": 1,
        "n_branches": 4,
    }
    (tmp_path / "scaling_fit.json").write_text(json.dumps({**fit, "wsd_compute": saved}))
    concurrency = {
        "gpus_per_trial": 0,
        "use_gpu": False,
        "workers_per_trial": 1,
        "resources_per_worker": {"CPU": 0.25},
        "max_concurrent_trials": None,  # every point reused on the last run
        "peak_concurrent_trials": 2,
        "trials_timed": 21,
    }
    swept = json.loads((tmp_path / "scaling_points.json").read_text())
    (tmp_path / "scaling_points.json").write_text(json.dumps({**swept, "concurrency": concurrency}))
    md = Path(write_report(str(tmp_path))["report.md"]).read_text()
    wsd = md.split("## WSD compute saved", 1)[1].split("\n## ", 1)[0]
    assert "| 1 | 4 | 4.7e+15 | 7.5e+15 | 37.3% | 46.7% |" in wsd
    at_once = md.split("## Trials at once", 1)[1].split("\n## ", 1)[0]
    assert "| 0 | 1 x 0.25 CPU | - (no trial ran) | 2 | 21 |" in at_once
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["wsd_compute"] == saved and results["concurrency"] == concurrency


def test_sweep_report_shows_the_holdout_check_the_sweep_wrote(tmp_path):
    from orchestration.sweeps.fit import ScalingPoint, holdout_check

    points = sweep_points()
    write_sweep(tmp_path, points, n_boot=0, holdout=2)
    check = holdout_check(
        [ScalingPoint(params=p["params"], tokens=p["tokens"], loss=p["loss"]) for p in points], n_holdout=2
    )
    md = Path(write_report(str(tmp_path))["report.md"]).read_text()
    section = md.split("## Holdout check", 1)[1].split("##", 1)[0]
    assert f"max relative error {check.max_rel_error:.2%}" in section
    assert section.count("%") == 3  # the summary line and one row per held-out run


def test_sweep_report_says_why_a_fit_is_absent(tmp_path):
    write_sweep(tmp_path, sweep_points(budgets=(1e17,), offsets=np.array([-0.4, 0.0, 0.4])), n_boot=0)
    written = write_report(str(tmp_path))
    results = json.loads((tmp_path / "results.json").read_text())
    assert "at least 2 budgets" in results["fits"]["all"]["isoflop"]["skipped"]
    assert "needs at least 6 runs; the sweep has 3" in results["fits"]["all"]["law"]["skipped"]
    assert results["predictions"][0]["source"].startswith("Chinchilla")  # only the published references
    assert not any(name.endswith(".png") for name in written)
    assert "No IsoFLOP fit (all parameters)" in Path(written["report.md"]).read_text()


def test_tune_report_sorts_trials_by_validation_loss(tmp_path):
    good, _ = write_run(tmp_path / "t-good", val_at_end=3.2)
    bad, _ = write_run(tmp_path / "t-bad", val_at_end=4.5)
    trials = [
        {
            "trial_id": "t-bad",
            "overrides": {"train.lr": 0.01},
            "final_val_loss": 4.5,
            "best_val_loss": 4.5,
            "steps": 100,
            "status": "TERMINATED",
            "run_dir": str(bad),
        },
        {
            "trial_id": "t-crashed",
            "overrides": {"train.lr": 1.0},
            "final_val_loss": None,
            "best_val_loss": None,
            "steps": 3,
            "status": "ERROR",
            "run_dir": str(tmp_path / "gone"),
        },
        {
            "trial_id": "t-good",
            "overrides": {"train.lr": 0.001, "model.n_layer": 4},
            "final_val_loss": 3.2,
            "best_val_loss": 3.2,
            "steps": 100,
            "status": "TERMINATED",
            "run_dir": str(good),
        },
    ]
    sweep = tmp_path / "tune"
    sweep.mkdir()
    (sweep / "tune_results.json").write_text(
        json.dumps({"metric": "val_loss", "mode": "min", "best_trial": "t-good", "trials": trials})
    )
    (sweep / "best_config.yaml").write_text(yaml.safe_dump({"train": {"lr": 0.001}, "model": {"n_layer": 4}}))
    written = write_report(str(sweep))
    results = json.loads((sweep / "results.json").read_text())
    assert [t["trial_id"] for t in results["trials"]] == ["t-good", "t-bad", "t-crashed"]
    assert results["best"]["trial_id"] == "t-good" and results["best_config"]["train"]["lr"] == 0.001
    page = Path(written["report.html"]).read_text()
    assert page.index("<td>t-good</td>") < page.index("<td>t-bad</td>") < page.index("<td>t-crashed</td>")
    assert "model.n_layer" in page and "trials.png" in written
    assert "No metrics.jsonl at the run_dir of 1 trial(s): t-crashed." in page


def test_tune_report_shows_trials_at_once_and_the_best_lr_per_width(tmp_path):
    """A grid over lr x width x parametrization, its tune_results.json written the way `raylm tune` writes it
    (``lr_transfer`` from the writer's function): the report plots loss against lr per width, tabulates
    the best lr per width and says how far it moves; it shows planned and measured trials at once."""
    import math

    from orchestration.sweeps.tune import lr_transfer

    trials = []
    for p in ("sp", "mup"):
        for w in (64, 128, 256):
            for lr in (1e-3, 2e-3, 4e-3, 8e-3):
                best = 8e-3 * 64 / w if p == "sp" else 4e-3
                trials.append(
                    {
                        "trial_id": f"{p}-{w}-{lr:g}",
                        "overrides": {"train.lr": lr, "model.n_embd": w, "model.parametrization": p},
                        "final_val_loss": 3.0 + 0.1 * math.log2(lr / best) ** 2,
                        "best_val_loss": None,
                        "steps": 150,
                        "status": "completed",
                        "run_dir": None,
                    }
                )
    concurrency = {
        "gpus_per_trial": 0.25,
        "use_gpu": True,
        "workers_per_trial": 1,
        "resources_per_worker": {"CPU": 2.0, "GPU": 0.25},
        "max_concurrent_trials": 8,
        "peak_concurrent_trials": 7,
        "trials_timed": 24,
    }
    results = {"metric": "val_loss", "mode": "min", "best_trial": "sp-64-0.008", "concurrency": concurrency}
    results["lr_transfer"] = lr_transfer(trials, "sp")
    results["trials"] = trials
    sweep = tmp_path / "tune"
    sweep.mkdir()
    (sweep / "tune_results.json").write_text(json.dumps(results))
    written = write_report(str(sweep))
    assert "lr_transfer.png" in written
    md = Path(written["report.md"]).read_text()
    section = md.split("## Learning rate across widths", 1)[1].split("\n## ", 1)[0]
    assert "| sp | 64 | 0.008 | 3 | 4 of 4 |" in section and "| sp | 256 | 0.002 | 3 | 2 of 4 |" in section
    assert "| mup | 256 | 0.004 | 3 | 3 of 4 |" in section
    assert "sp: the best lr moves 2 step(s) of a 4-value lr grid across widths 64-256" in section
    assert "mup: the best lr moves 0 step(s)" in section
    at_once = md.split("## Trials at once", 1)[1].split("\n## ", 1)[0]
    assert "| 0.25 | 1 x 2 CPU, 0.25 GPU | 8 | 7 | 24 |" in at_once
    out = json.loads((sweep / "results.json").read_text())
    assert out["lr_transfer"]["optimum_shift_steps"] == {"mup": 0, "sp": 2} and out["concurrency"] == concurrency


def test_a_directory_that_is_none_of_these_is_named_with_what_was_expected(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(
        ReportError,
        match=r"metrics\.jsonl and run\.json.*scaling_points\.json.*"
        r"tune_results\.json.*baselines\.json.*found notes\.txt",
    ):
        write_report(str(tmp_path))
    with pytest.raises(ReportError, match="is not a directory"):
        write_report(str(tmp_path / "missing"))


def baselines_json(root: Path) -> dict:
    """baselines.json as `raylm baseline compare` writes it (compare_baselines' result)."""

    def row(model, arch, loss, bpb, **kw):
        return {
            "model": model,
            "arch": arch,
            "params": None,
            "non_embedding_params": None,
            "train_tokens": 1_000_000,
            "flops_per_token": None,
            "train_flops": None,
            "loss": loss,
            "perplexity": float(np.exp(loss)),
            "bits_per_byte": bpb,
            "tokens": 8192,
            "bytes": 30_000,
            "bpb_tokens": 8000,
            "source": f"runs/{model}",
            **kw,
        }

    result = {
        "manifest": "runs/data/shakespeare/manifest.json",
        "split": "val",
        "sequences": 32,
        "rows": [
            row(
                "transformer",
                "gpt",
                4.1234,
                1.3456,
                params=1_300_000,
                non_embedding_params=800_000,
                flops_per_token=9.0e6,
                train_flops=9.0e12,
                source="runs/gpt/checkpoint_00000600",
            ),
            row(
                "lstm",
                "lstm",
                4.5678,
                1.4987,
                params=900_000,
                non_embedding_params=400_000,
                flops_per_token=6.0e6,
                train_flops=6.0e12,
            ),
            row("3-gram KN", "ngram", 4.9012, 1.6123, ngrams=123_456),
            row("5-gram <KN>", "ngram", 4.7, 1.55, ngrams=234_567),
        ],
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "baselines.json").write_text(json.dumps(result, indent=2))
    (root / "baselines.md").write_text("| model |\n")
    return result


def test_baselines_report_tables_and_plots_every_model(tmp_path):
    comparison = baselines_json(tmp_path / "baselines")
    written = write_report(str(tmp_path / "baselines"))
    assert set(written) == {"report.html", "report.md", "results.json", "baselines.png"}
    page = Path(written["report.html"]).read_text()
    images = re.findall(r"<img[^>]*src='([^']*)'", page)
    assert len(images) == 1 and base64.b64decode(images[0].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert not re.search(r"(src|href)\s*=\s*['\"]?https?://", page)
    # one row per model, lowest bits per byte first, with params, compute and the three scores
    order = [page.index(f"<td>{name}</td>") for name in ("transformer", "lstm", "5-gram &lt;KN&gt;", "3-gram KN")]
    assert order == sorted(order)
    assert (
        "<tr><td>transformer</td><td>gpt</td><td>1,300,000</td><td>1,000,000</td><td>9e+12</td><td>8,192</td>"
        "<td>4.1234</td><td>61.77</td><td>1.3456</td></tr>"
    ) in page
    assert "<tr><td>3-gram KN</td><td>ngram</td><td>-</td><td>1,000,000</td><td>-</td>" in page
    assert "runs/gpt/checkpoint_00000600" in page and "32 val windows of runs/data/shakespeare/manifest.json" in page

    results = json.loads(Path(written["results.json"]).read_text())
    assert results["kind"] == "baselines" and results["best"] == "transformer" and results["sequences"] == 32
    assert [r["model"] for r in results["rows"]] == ["transformer", "lstm", "5-gram <KN>", "3-gram KN"]
    assert sorted(results["rows"], key=lambda r: r["model"]) == sorted(comparison["rows"], key=lambda r: r["model"])
    markdown = Path(written["report.md"]).read_text()
    assert "![baselines.png](baselines.png)" in markdown
    assert (tmp_path / "baselines" / "baselines.png").stat().st_size > 1000
    assert "| lstm | lstm | 900,000 | 1,000,000 | 6e+12 | 8,192 | 4.5678 | 96.33 | 1.4987 |" in markdown

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "baselines.json").write_text(json.dumps({**comparison, "rows": []}))
    with pytest.raises(ReportError, match="has no rows"):
        write_report(str(tmp_path / "empty"))
