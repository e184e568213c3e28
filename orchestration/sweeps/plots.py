"""Figures for a scaling sweep: IsoFLOP profiles, the fitted law against the runs, and the
compute-optimal frontier.

Each function returns a ``matplotlib.figure.Figure`` built without pyplot, so there is no global
figure state and no display backend; the caller saves it (``fig.savefig(path)``) next to results.json.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from orchestration.sweeps.fit import (
    CHINCHILLA_APPROACH3,
    IsoFlopFit,
    LawFit,
    LawParams,
    ScalingPoint,
    budget_key,
    compute_optimal,
    param_counts,
    predict_loss,
)


def plot_isoflops(points: Sequence[ScalingPoint], fit: IsoFlopFit) -> Figure:
    """Loss against N per budget, with each budget's parabola and its vertex (budgets left out of
    the power-law fit are labelled with their status)."""
    fig = Figure(figsize=(7, 5))
    ax = fig.add_subplot()
    n_all = param_counts(points, fit.param_kind)
    keys = np.array([budget_key(p) for p in points])
    loss = np.array([p.loss for p in points])
    colors = colormaps["viridis"](np.linspace(0.0, 0.9, len(fit.budgets)))
    for budget, color in zip(fit.budgets, colors):
        mine = keys == budget.compute
        label = f"C={budget.compute:.2g}" + ("" if budget.status == "ok" else f" ({budget.status})")
        ax.scatter(n_all[mine], loss[mine], color=color, s=18, label=label)
        if budget.coeffs is not None:
            x = np.linspace(np.log(n_all[mine].min()), np.log(n_all[mine].max()), 100)
            ax.plot(np.exp(x), np.polyval(budget.coeffs, x), color=color, lw=1)
        if budget.params_opt is not None and budget.status == "ok":
            ax.plot(budget.params_opt, budget.loss_opt, marker="*", ms=12, color=color, ls="none")
    ax.set_xscale("log")
    ax.set_xlabel(f"parameters N ({fit.param_kind})")
    ax.set_ylabel("validation loss")
    ax.set_title("IsoFLOP profiles")
    ax.legend(fontsize=7)
    return fig


def plot_law_fit(points: Sequence[ScalingPoint], fit: LawFit) -> Figure:
    """Observed loss against D, one colour per model size, with the fitted law's curve for each."""
    fig = Figure(figsize=(7, 5))
    ax = fig.add_subplot()
    n_all = param_counts(points, fit.param_kind)
    tokens = np.array([p.tokens for p in points])
    loss = np.array([p.loss for p in points])
    sizes = np.unique(n_all)
    colors = colormaps["viridis"](np.linspace(0.0, 0.9, len(sizes)))
    for n, color in zip(sizes, colors):
        mine = n_all == n
        ax.scatter(tokens[mine], loss[mine], color=color, s=18, label=f"N={n:.2g}")
        d = np.geomspace(tokens[mine].min(), tokens[mine].max(), 100)
        ax.plot(d, predict_loss(fit.law, n, d), color=color, lw=1)
    law = fit.law
    ax.set_xscale("log")
    ax.set_xlabel("training tokens D")
    ax.set_ylabel("validation loss")
    ax.set_title(f"L = {law.E:.3g} + {law.A:.3g}/N^{law.alpha:.3f} + {law.B:.3g}/D^{law.beta:.3f}", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    return fig


def plot_frontier(
    iso: IsoFlopFit,
    law: Optional[LawFit] = None,
    *,
    up_to: Optional[float] = None,
    reference: LawParams = CHINCHILLA_APPROACH3,
) -> Figure:
    """N_opt against compute: the IsoFLOP vertices, their power law with its exponent CI as a
    band, the fitted law's frontier when given, and the reference (Chinchilla) frontier.
    ``up_to`` extends the lines to a target budget."""
    fig = Figure(figsize=(7, 5))
    ax = fig.add_subplot()
    ok = [b for b in iso.budgets if b.status == "ok"]
    c_ok = np.array([b.compute for b in ok])
    c = np.geomspace(c_ok.min(), max(c_ok.max(), up_to or 0.0), 100)
    fitted = iso.params_opt.coefficient * c**iso.params_opt.exponent
    ax.scatter(c_ok, [b.params_opt for b in ok], color="k", zorder=3, label="IsoFLOP minima")
    ax.plot(c, fitted, color="C0", label=f"IsoFLOP fit: N_opt ~ C^{iso.params_opt.exponent:.3f}")
    if iso.params_opt.exponent_ci is not None:
        # The band pivots the exponent's CI about the centre of the budgets in log C, where the
        # line's level is best determined.
        centre = math.exp(np.log(c_ok).mean())
        at_centre = iso.params_opt.coefficient * centre**iso.params_opt.exponent
        ends = [at_centre * (c / centre) ** e for e in iso.params_opt.exponent_ci]
        low, high = np.minimum(*ends), np.maximum(*ends)
        ax.fill_between(c, low, high, color="C0", alpha=0.2, label=f"{iso.ci_level:.0%} CI of the exponent")
    if law is not None:
        ax.plot(
            c,
            [compute_optimal(law.law, x).params for x in c],
            color="C1",
            label=f"fitted law: N_opt ~ C^{law.params_exponent:.3f}",
        )
    ax.plot(
        c,
        [compute_optimal(reference, x).params for x in c],
        color="C3",
        ls="--",
        label=f"reference law: N_opt ~ C^{reference.beta / (reference.alpha + reference.beta):.3f}",
    )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training compute C (FLOPs)")
    ax.set_ylabel(f"compute-optimal N ({iso.param_kind})")
    ax.legend(fontsize=7)
    return fig
