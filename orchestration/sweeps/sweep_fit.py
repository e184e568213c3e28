"""What a sweep fits and writes to ``scaling_fit.json``; the report renders exactly this.

For each parameter count (all parameters, Chinchilla's N; and non-embedding, Kaplan's, when every
point has it): the IsoFLOP fit (>= 2 budgets with >= 3 sizes), the parametric law (>= 6 points: it
has 5 parameters, so 5 points fit any data exactly), and each fit's compute-optimal prediction at
``TARGET_FACTOR`` x the largest run's compute; plus the optional holdout check. A fit that cannot be
made is ``{"skipped": why}``. ``loaded_fits`` turns the JSON back into the fit dataclasses for plots.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Optional

from orchestration.sweeps.fit import (
    BESIROGLU_2024,
    CHINCHILLA_APPROACH3,
    CHINCHILLA_ISOFLOP_EXPONENTS,
    IsoFlopFit,
    LawFit,
    ScalingPoint,
    compute_optimal,
    fit_isoflops,
    fit_law,
    holdout_check,
)

MIN_LAW_POINTS = 6
TARGET_FACTOR = 100.0  # predictions are for 100x the sweep's largest run
PUBLISHED_LAWS = (("Chinchilla approach 3", CHINCHILLA_APPROACH3), ("Besiroglu et al. 2024", BESIROGLU_2024))


def scaling_points(records: list[dict]) -> list[ScalingPoint]:
    """The finished records as ``ScalingPoint``s (loss = final val loss)."""
    return [
        ScalingPoint(
            params=r["params"],
            tokens=r["tokens"],
            loss=r["loss"],
            flops=r.get("flops"),
            non_embedding_params=r.get("non_embedding_params"),
            budget=r.get("budget"),
        )
        for r in records
        if r.get("status") == "ok" and r.get("loss") is not None
    ]


def _isoflop(points: list[ScalingPoint], kind: str, n_boot: int) -> dict:
    sizes: dict = {}
    for p in points:
        if p.budget is not None:
            sizes.setdefault(p.budget, set()).add(p.params)
    if sum(len(s) >= 3 for s in sizes.values()) < 2:
        got = ", ".join(f"{b:.3g} FLOPs: {len(s)} sizes" for b, s in sorted(sizes.items())) or "none"
        return {
            "skipped": f"too few points for the IsoFLOP fit: it needs at least 2 budgets with >= 3 model sizes "
            f"each; got {got}"
        }
    try:
        return dataclasses.asdict(
            fit_isoflops([p for p in points if p.budget is not None], param_kind=kind, n_boot=n_boot)
        )
    except ValueError as err:
        return {"skipped": f"IsoFLOP fit failed: {err}"}


def _law(points: list[ScalingPoint], kind: str, n_boot: int) -> dict:
    if len(points) < MIN_LAW_POINTS:
        return {
            "skipped": f"the parametric law L = E + A/N^alpha + B/D^beta needs at least {MIN_LAW_POINTS} runs; "
            f"the sweep has {len(points)}"
        }
    return dataclasses.asdict(fit_law(points, param_kind=kind, n_boot=n_boot))


def _predictions(fits: dict[str, dict], target: float) -> list[dict]:
    """Each fit's (and each published law's) compute-optimal N and D at ``target`` FLOPs."""
    out = []
    for kind, fit in fits.items():
        iso, law = fit["isoflop"], fit["law"]
        if "skipped" not in iso:
            n = iso["params_opt"]["coefficient"] * target ** iso["params_opt"]["exponent"]
            d = iso["tokens_opt"]["coefficient"] * target ** iso["tokens_opt"]["exponent"]
            out.append({"source": f"IsoFLOP power laws ({kind} N)", "params": n, "tokens": d, "loss": None})
        if "skipped" not in law:
            opt = compute_optimal(loaded(LawFit, law).law, target)
            out.append(
                {"source": f"parametric law ({kind} N)", "params": opt.params, "tokens": opt.tokens, "loss": opt.loss}
            )
    for name, ref in PUBLISHED_LAWS:
        opt = compute_optimal(ref, target)
        out.append(
            {
                "source": f"{name} (published; loss not comparable)",
                "params": opt.params,
                "tokens": opt.tokens,
                "loss": None,
            }
        )
    return out


def _with_ci(law: dict, name: str) -> str:
    """A law parameter as '0.312 [0.281, 0.350]' (its bootstrap interval, when there is one)."""
    value = law["law"].get(name, law.get(name))
    interval = (law.get("ci") or {}).get(name)
    return f"{value:.3f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")


def fit_sweep(records: list[dict], sc) -> dict:
    """Every fit of a sweep's finished points (``sc``: the ``scaling`` section) as JSON-ready data;
    ``messages`` says what was fitted and what was not, and why. Points of kind 'predict' stay out of
    the fits: the holdout check predicts them from the rest."""
    points = scaling_points([r for r in records if r.get("kind") != "predict"])
    predicted = scaling_points([r for r in records if r.get("kind") == "predict"])
    kinds = ["all"] + (["non_embedding"] if points and all(p.non_embedding_params for p in points) else [])
    fits = {
        kind: {"isoflop": _isoflop(points, kind, sc.n_boot), "law": _law(points, kind, sc.n_boot)} for kind in kinds
    }
    target = TARGET_FACTOR * max((p.compute for p in points), default=0.0)
    out: dict = {
        "param_kind": sc.param_kind,
        "n_points": len(points),
        "n_boot": sc.n_boot,
        "fits": fits,
        "target_compute": target or None,
        "predictions": _predictions(fits, target) if points else [],
        "reference": {
            "chinchilla_approach3": dataclasses.asdict(CHINCHILLA_APPROACH3),
            "besiroglu_2024": dataclasses.asdict(BESIROGLU_2024),
            "chinchilla_isoflop": CHINCHILLA_ISOFLOP_EXPONENTS,
        },
        "messages": [],
    }
    for kind, fit in fits.items():
        iso, law = fit["isoflop"], fit["law"]
        out["messages"].append(
            f"{kind} N: "
            + (
                iso["skipped"]
                if "skipped" in iso
                else f"IsoFLOP fit over {iso['n_budgets_used']} budgets: N_opt ~ C^"
                f"{iso['params_opt']['exponent']:.3f}, D_opt ~ C^{iso['tokens_opt']['exponent']:.3f}"
            )
        )
        out["messages"].append(
            f"{kind} N: "
            + (
                law["skipped"]
                if "skipped" in law
                else f"parametric law over {law['n_points']} points: alpha {_with_ci(law, 'alpha')}, beta "
                f"{_with_ci(law, 'beta')}, E {_with_ci(law, 'E')}; N_opt ~ C^{_with_ci(law, 'params_exponent')}"
            )
        )
    n_holdout = len(predicted) or sc.holdout
    if n_holdout:
        try:
            check = holdout_check(points + predicted, n_holdout=n_holdout, param_kind=sc.param_kind)
            out["holdout"] = dataclasses.asdict(check)
            fitted = max(p.compute for p in points)
            out["holdout"]["compute_factor"] = min(h.compute for h in check.held_out) / fitted
            which = "predict run(s)" if predicted else "largest-compute point(s)"
            out["messages"].append(
                f"holdout of the {n_holdout} {which} at >= {out['holdout']['compute_factor']:.1f}x the largest fitted "
                f"compute: max relative error {check.max_rel_error:.2%}"
            )
        except ValueError as err:
            out["holdout"] = {"skipped": str(err)}
            out["messages"].append(f"holdout check skipped: {err}")
    return out


def loaded(cls: type, data: Any) -> Any:
    """A fit dataclass (``LawFit``, ``IsoFlopFit`` and what they hold) rebuilt from its ``asdict`` JSON."""
    if data is None or not dataclasses.is_dataclass(cls):
        return data
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        tp, value = hints[f.name], data.get(f.name)
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if dataclasses.is_dataclass(tp):
            value = loaded(tp, value)
        elif typing.get_origin(tp) is list and inner and dataclasses.is_dataclass(inner[0]):
            value = [loaded(inner[0], v) for v in value]
        elif tuple in (typing.get_origin(tp), *map(typing.get_origin, inner)) and value is not None:
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)


def loaded_fits(fit_json: dict) -> dict[str, dict[str, Optional[Any]]]:
    """{kind: {"isoflop": IsoFlopFit or None, "law": LawFit or None}} from scaling_fit.json."""
    return {
        kind: {
            "isoflop": None if "skipped" in fit["isoflop"] else loaded(IsoFlopFit, fit["isoflop"]),
            "law": None if "skipped" in fit["law"] else loaded(LawFit, fit["law"]),
        }
        for kind, fit in fit_json.get("fits", {}).items()
    }
