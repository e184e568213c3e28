"""The report of a scaling sweep: its runs, how many ran at once, the compute its WSD branches saved,
the fits it wrote to ``scaling_fit.json`` (IsoFLOP profiles, the parametric law, both parameter counts,
bootstrap intervals), the holdout check and the compute-optimal predictions. Nothing is refitted here:
every number is the sweep's."""

from __future__ import annotations

import yaml

from orchestration.artifacts import SCALING_FIT_FILE, SCALING_POINTS_FILE, RunDir
from orchestration.report.render import Block, ReportError, Section, fmt, with_ci
from orchestration.report.tune import concurrency_blocks
from orchestration.sweeps.fit import CHINCHILLA_ISOFLOP_EXPONENTS
from orchestration.sweeps.plots import plot_frontier, plot_isoflops, plot_law_fit
from orchestration.sweeps.sweep_fit import PUBLISHED_LAWS, TARGET_FACTOR, loaded_fits, scaling_points


def _exponent_rows(fit_json: dict) -> tuple[list, list[str]]:
    """Exponent-table rows (ours, then the published references) and the reasons a fit is absent."""
    rows, reasons = [], []
    for kind, fit in fit_json["fits"].items():
        iso, law = fit["isoflop"], fit["law"]
        if "skipped" in iso:
            reasons.append(f"No IsoFLOP fit ({kind} parameters): {iso['skipped']}")
        else:
            n_opt, d_opt = iso["params_opt"], iso["tokens_opt"]
            rows.append(
                (f"IsoFLOP ({kind} N)", "-", "-", "-", with_ci(n_opt["exponent"], n_opt["exponent_ci"]),
                 with_ci(d_opt["exponent"], d_opt["exponent_ci"]))
            )  # fmt: skip
        if "skipped" in law:
            reasons.append(f"No parametric fit ({kind} parameters): {law['skipped']}")
        else:
            ci = law["ci"] or {}
            rows.append(
                (
                    f"parametric law ({kind} N)",
                    f"{law['law']['E']:.3f}",
                    with_ci(law["law"]["alpha"], ci.get("alpha")),
                    with_ci(law["law"]["beta"], ci.get("beta")),
                    with_ci(law["params_exponent"], ci.get("params_exponent")),
                    with_ci(law["tokens_exponent"], ci.get("tokens_exponent")),
                )
            )
    for name, ref in PUBLISHED_LAWS:
        a, b = ref.beta / (ref.alpha + ref.beta), ref.alpha / (ref.alpha + ref.beta)
        rows.append(
            (f"{name} (published)", f"{ref.E:.2f}", f"{ref.alpha:.3f}", f"{ref.beta:.3f}", f"{a:.3f}", f"{b:.3f}")
        )
    c = CHINCHILLA_ISOFLOP_EXPONENTS
    rows.append(
        ("Chinchilla approach 2 (published)", "-", "-", "-", with_ci(c["params_exponent"], c["params_exponent_ci"]),
         with_ci(c["tokens_exponent"], c["tokens_exponent_ci"]))
    )  # fmt: skip
    return rows, reasons


def _holdout_blocks(check: dict) -> list[Block]:
    """The holdout check (scaling.holdout, or the scaling.predict runs): the law fitted without the
    largest-compute runs, predicting them."""
    if "skipped" in check:
        return [("text", f"Holdout check skipped: {check['skipped']}")]
    law = check["fit"]["law"]
    factor = f", at >= {check['compute_factor']:.1f}x the largest fitted compute" if "compute_factor" in check else ""
    rows = [
        (fmt(h["params"]), fmt(h["tokens"]), fmt(h["compute"]), fmt(h["loss"]), fmt(h["predicted_loss"]),
         f"{h['rel_error']:.2%}")
        for h in check["held_out"]
    ]  # fmt: skip
    return [
        (
            "text",
            f"The law fitted on the other {check['fit']['n_points']} runs (E {law['E']:.3f}, alpha "
            f"{law['alpha']:.3f}, beta {law['beta']:.3f}) predicts the {len(rows)} largest-compute run(s)"
            + factor
            + f": max relative error {check['max_rel_error']:.2%} ({check['max_abs_error']:.3f} nats).",
        ),
        ("table", ("params", "tokens", "FLOPs", "observed loss", "predicted loss", "relative error"), rows),
    ]


def _wsd_blocks(saved: dict) -> list[Block]:
    """scaling_fit.json's ``wsd_compute``: stable runs + decay branches against one run per branch point."""
    row = (
        fmt(saved["n_stable_runs"]),
        fmt(saved["n_branches"]),
        f"{saved['wsd_flops']:.3g}",
        f"{saved['independent_flops']:.3g}",
        f"{saved['saved_fraction']:.1%}",
        f"{saved['max_saved_fraction']:.1%}" if "max_saved_fraction" in saved else "-",  # older sweeps lack it
    )
    return [
        (
            "text",
            "Each WSD family trains one stable run and branches a short decay off it at every length, where "
            "independent runs would train every length from scratch. The most a family can save is what its "
            "shorter lengths cost (decays free): lengths far apart (5, 10, 20, 40 x N) cap it below 50%.",
        ),
        (
            "table",
            ("stable runs", "decay branches", "WSD FLOPs", "independent FLOPs", "saved", "most it could save"),
            [row],
        ),
    ]


def sweep_report(sweep: RunDir) -> tuple[str, list[Section], dict]:
    """(title, sections, results) of a sweep directory (scaling_points.json + scaling_fit.json)."""
    if not sweep.has(SCALING_FIT_FILE):
        raise ReportError(f"{sweep.uri} has no {SCALING_FIT_FILE}; re-run `raylm scaling` to fit the sweep")
    swept, fit_json = sweep.read_json(SCALING_POINTS_FILE), sweep.read_json(SCALING_FIT_FILE)
    points = scaling_points(swept["points"])
    skipped = [p for p in swept["points"] if p.get("status") != "ok"]
    columns = ("params", "non_embedding_params", "tokens", "loss", "flops", "budget", "n_layer", "n_embd", "status")
    blocks: list[Block] = [("table", columns, [[fmt(p.get(c)) for c in columns] for p in swept["points"]])]
    if skipped:
        note = f"{len(skipped)} of {len(swept['points'])} runs are left out of every fit (status other than 'ok')."
        blocks.insert(0, ("text", note))
    sections: list[Section] = [
        ("Runs", blocks),
        ("Trials at once", concurrency_blocks(swept.get("concurrency"), SCALING_POINTS_FILE)),
    ]
    if fit_json.get("wsd_compute"):
        sections.append(("WSD compute saved", _wsd_blocks(fit_json["wsd_compute"])))

    rows, reasons = _exponent_rows(fit_json)
    fit_blocks: list[Block] = [("text", r) for r in reasons]
    fit_blocks += [
        (
            "text",
            f"As the sweep fitted them (scaling_fit.json). N_opt ~ C^a and D_opt ~ C^b; the law is L = E + A/N^alpha "
            f"+ B/D^beta, whose optimum has a = beta/(alpha+beta). Brackets: {fit_json['n_boot']}-resample 95% "
            "bootstrap intervals. Published fits count all parameters on MassiveText: compare exponents, not E.",
        ),
        ("table", ("fit", "E", "alpha", "beta", "a (N_opt)", "b (D_opt)"), rows),
    ]
    fits = loaded_fits(fit_json)
    law_all, law_body = (fits.get(k, {}).get("law") for k in ("all", "non_embedding"))
    if law_all is not None and law_body is not None:
        fit_blocks.append(
            (
                "text",
                f"Counting non-embedding parameters moves alpha from {law_all.law.alpha:.3f} to "
                f"{law_body.law.alpha:.3f} and a from {law_all.params_exponent:.3f} to "
                f"{law_body.params_exponent:.3f}. The counts differ by the embedding, a vocabulary-sized block that "
                "does not grow with depth and is a large share of a small model's N; Kaplan et al. count "
                "non-embedding parameters, Chinchilla all of them.",
            )
        )
    iso_all = fits.get("all", {}).get("isoflop")
    target = fit_json["target_compute"]
    if iso_all is not None:
        fit_blocks.append(("figure", "isoflops.png", plot_isoflops(points, iso_all)))
        fit_blocks.append(("figure", "frontier.png", plot_frontier(iso_all, law_all, up_to=target)))
    if law_all is not None:
        fit_blocks.append(("figure", "law_fit.png", plot_law_fit(points, law_all)))
    sections.append(("Fits", fit_blocks))
    if fit_json.get("holdout"):
        sections.append(("Holdout check", _holdout_blocks(fit_json["holdout"])))
    if fit_json["predictions"]:
        ratios = [p.flops / (6.0 * p.params * p.tokens) for p in points if p.flops]
        measured = (
            f", which for these runs is {min(ratios):.2f}-{max(ratios):.2f}x less than the measured compute "
            "(FLOPs / 6ND)"
            if ratios
            else ""
        )
        table = [
            (p["source"], fmt(p["params"]), fmt(p["tokens"]), fmt(p["tokens"] / p["params"]), fmt(p["loss"]))
            for p in fit_json["predictions"]
        ]
        sections.append(
            (
                f"Prediction at {target:.3g} FLOPs ({TARGET_FACTOR:.0f}x the largest run)",
                [
                    (
                        "text",
                        "The IsoFLOP power laws are in the sweep's measured compute (FLOPs per token x D, attention "
                        f"included); the law's frontier spends C = 6ND{measured}.",
                    ),
                    ("table", ("source", "N_opt", "D_opt", "tokens per parameter", "predicted loss"), table),
                ],
            )
        )
    config = yaml.safe_dump({"grid": swept.get("grid"), "config": swept.get("config")}, sort_keys=False)
    sections.append(("Sweep config", [("code", config)]))
    results = {
        "kind": "sweep",
        "source": sweep.uri,
        "n_points": len(points),
        "n_skipped": len(skipped),
        "fits": fit_json["fits"],
        "target_compute": target,
        "predictions": fit_json["predictions"],
        "concurrency": swept.get("concurrency"),
        "wsd_compute": fit_json.get("wsd_compute"),
    }
    return f"Scaling sweep {sweep.name}", sections, results
