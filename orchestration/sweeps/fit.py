"""Scaling-law fits over a sweep of training runs: pure numpy/scipy, no Ray.

Each run is a ``ScalingPoint`` (parameters N, tokens D, final validation loss L). Three views, after
Hoffmann et al. (2022, "Chinchilla"):

- IsoFLOP profiles (their approach 2): per compute budget, a parabola of L in ln N whose vertex is
  N_opt(C); then power laws N_opt = k C^a and D_opt = k' C^b fitted in log-log.
- The parametric law (approach 3): L(N, D) = E + A / N^alpha + B / D^beta, fitted by a Huber loss on
  log-loss residuals with L-BFGS from a grid of starts.
- The compute-optimal frontier of a fitted law and a holdout check of its extrapolation.

Every result is a dataclass that ``dataclasses.asdict`` turns into JSON-ready data. Bootstrap
confidence intervals are percentile intervals from a seeded generator, so reruns are identical.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace
from typing import Literal, Optional, Sequence

import numpy as np
from scipy.optimize import minimize
from threadpoolctl import threadpool_limits

ParamKind = Literal["all", "non_embedding"]
BudgetStatus = Literal["ok", "too_few_points", "not_convex", "min_at_edge"]


@dataclass(frozen=True)
class LawParams:
    """L(N, D) = E + A / N^alpha + B / D^beta; loss in nats per token."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float


# Published fits, for comparison only: their loss is on MassiveText with their tokenizer, so E, A
# and B do not transfer to our data; the exponents are what to compare. Both count all parameters.
CHINCHILLA_APPROACH3 = LawParams(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)
BESIROGLU_2024 = LawParams(E=1.82, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658)
# Hoffmann et al. Table 2, approach 2 (IsoFLOP profiles): N_opt ~ C^a, D_opt ~ C^b, with the
# 10th-90th percentile bootstrap intervals they report.
CHINCHILLA_ISOFLOP_EXPONENTS = {
    "params_exponent": 0.49,
    "params_exponent_ci": (0.462, 0.534),
    "tokens_exponent": 0.51,
    "tokens_exponent_ci": (0.483, 0.529),
}


@dataclass(frozen=True)
class ScalingPoint:
    """One finished run. ``flops`` is its total training compute (flops_per_token * tokens);
    without it compute is 6 * params * tokens. ``budget`` is the nominal IsoFLOP budget the sweep
    assigned, which groups runs whose actual compute differs by rounding of batch counts."""

    params: float
    tokens: float
    loss: float
    flops: Optional[float] = None
    non_embedding_params: Optional[float] = None
    budget: Optional[float] = None

    def __post_init__(self) -> None:
        for name in ("params", "tokens", "loss", "flops", "non_embedding_params", "budget"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(
                    f"ScalingPoint.{name} must be a finite positive number, got {value!r} "
                    f"(point params={self.params}, tokens={self.tokens})"
                )

    @property
    def compute(self) -> float:
        return self.flops if self.flops is not None else 6.0 * self.params * self.tokens


def param_counts(points: Sequence[ScalingPoint], param_kind: ParamKind) -> np.ndarray:
    """N per point: all parameters (Chinchilla) or non-embedding ones (Kaplan et al. 2020)."""
    if param_kind == "all":
        return np.array([p.params for p in points], dtype=float)
    if param_kind == "non_embedding":
        missing = [i for i, p in enumerate(points) if p.non_embedding_params is None]
        if missing:
            raise ValueError(
                f"param_kind='non_embedding' but points {missing} have no "
                "non_embedding_params; record count_params(cfg, non_embedding=True)"
            )
        return np.array([p.non_embedding_params for p in points], dtype=float)
    raise ValueError(f"param_kind must be 'all' or 'non_embedding', got {param_kind!r}")


def predict_loss(law: LawParams, params: np.ndarray | float, tokens: np.ndarray | float) -> np.ndarray:
    """The law's loss at N params and D tokens (broadcasts)."""
    n, d = np.asarray(params, dtype=float), np.asarray(tokens, dtype=float)
    return law.E + law.A / n**law.alpha + law.B / d**law.beta


def _percentile_ci(samples: np.ndarray, ci_level: float) -> tuple[float, float]:
    tail = 100.0 * (1.0 - ci_level) / 2.0
    low, high = np.percentile(samples, [tail, 100.0 - tail])
    return float(low), float(high)


# ---- parametric law (approach 3) ----------------------------------------------------------------

# Hoffmann et al.'s grid over theta = (log A, log B, log E, alpha, beta): 6 * 6 * 5 * 5 * 5 starts.
_GRID = np.array(
    list(
        itertools.product(
            np.arange(0.0, 30.0, 5.0),
            np.arange(0.0, 30.0, 5.0),
            np.arange(-1.0, 1.5, 0.5),
            np.arange(0.0, 2.5, 0.5),
            np.arange(0.0, 2.5, 0.5),
        )
    )
)


def _huber(r: np.ndarray, delta: float) -> np.ndarray:
    return np.where(np.abs(r) <= delta, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta))


def _log_predictions(theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray) -> np.ndarray:
    """ln L for parameter rows theta (..., 5) at every point: logsumexp over the three terms."""
    a, b, e, alpha, beta = (theta[..., i, None] for i in range(5))
    terms = np.stack(np.broadcast_arrays(a - alpha * log_n, b - beta * log_d, e), axis=0)
    top = terms.max(axis=0)
    return top + np.log(np.exp(terms - top).sum(axis=0))


def _objective(
    theta: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, delta: float
) -> tuple[float, np.ndarray]:
    """Mean Huber loss / delta^2 and its gradient. Scaled so L-BFGS-B's stopping tests, which are
    relative to max(|f|, 1), do not stop a 1e-6-sized raw Huber loss after one step."""
    terms = np.stack([theta[0] - theta[3] * log_n, theta[1] - theta[4] * log_d, np.full_like(log_n, theta[2])])
    top = terms.max(axis=0)
    weights = np.exp(terms - top)
    total = weights.sum(axis=0)
    weights /= total
    r = top + np.log(total) - log_l
    scale = 1.0 / (r.size * delta * delta)
    dr = np.clip(r, -delta, delta) * scale
    grad = np.array(
        [dr @ weights[0], dr @ weights[1], dr @ weights[2], -(dr * weights[0]) @ log_n, -(dr * weights[1]) @ log_d]
    )
    return float(_huber(r, delta).sum() * scale), grad


# alpha and beta in [0, MAX_EXPONENT]: a negative exponent (loss growing with N or D) is not a
# scaling law, and an unbounded one lets log A run past exp's range (A = inf) on data the form does
# not fit; a fitted exponent at the bound says exactly that.
MAX_EXPONENT = 10.0
_BOUNDS = [(None, None)] * 3 + [(0.0, MAX_EXPONENT)] * 2


def _best_theta(
    starts: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, delta: float
) -> tuple[np.ndarray, float, int]:
    """L-BFGS-B from each start: the best theta, its objective, and how many starts reached it
    (within 1e-6 relative), the evidence that it is the global minimum."""
    runs = [
        minimize(
            _objective,
            start,
            args=(log_n, log_d, log_l, delta),
            jac=True,
            method="L-BFGS-B",
            bounds=_BOUNDS,
            options={"maxiter": 2000, "ftol": 1e-12, "gtol": 1e-9},
        )
        for start in starts
    ]
    best = min(runs, key=lambda res: res.fun)
    agreeing = sum(res.fun <= best.fun + 1e-6 * max(abs(best.fun), 1e-12) for res in runs)
    return best.x, float(best.fun), agreeing


def _grid_starts(n_starts: int, log_n: np.ndarray, log_d: np.ndarray, log_l: np.ndarray, delta: float) -> np.ndarray:
    """The n_starts grid points with the lowest objective: one vectorized pass over all 4500 is
    cheap, running L-BFGS from each of them is not."""
    r = _log_predictions(_GRID, log_n, log_d) - log_l
    return _GRID[np.argsort(_huber(r, delta).sum(axis=-1))[:n_starts]]


def _law_from_theta(theta: np.ndarray) -> LawParams:
    return LawParams(
        E=float(np.exp(theta[2])),
        A=float(np.exp(theta[0])),
        B=float(np.exp(theta[1])),
        alpha=float(theta[3]),
        beta=float(theta[4]),
    )


@dataclass
class LawFit:
    """A fitted law. params_exponent a = beta / (alpha + beta) and tokens_exponent b = alpha /
    (alpha + beta) are the compute-optimal allocation exponents it implies (N_opt ~ C^a).
    ``ci`` maps E, A, B, alpha, beta, params_exponent, tokens_exponent to percentile intervals;
    n_starts_agreeing counts the L-BFGS starts that reached the best loss (1 is a warning sign);
    alpha or beta at 0 or MAX_EXPONENT means the form does not describe the runs."""

    law: LawParams
    param_kind: str
    n_points: int
    mean_huber_loss: float
    n_starts_agreeing: int
    params_exponent: float
    tokens_exponent: float
    ci: Optional[dict[str, tuple[float, float]]]
    ci_level: float
    n_boot: int


def _law_summary(law: LawParams) -> dict[str, float]:
    total = law.alpha + law.beta
    return {
        "E": law.E,
        "A": law.A,
        "B": law.B,
        "alpha": law.alpha,
        "beta": law.beta,
        "params_exponent": law.beta / total,
        "tokens_exponent": law.alpha / total,
    }


def fit_law(
    points: Sequence[ScalingPoint],
    *,
    param_kind: ParamKind = "all",
    delta: float = 1e-3,
    n_starts: int = 32,
    n_boot: int = 200,
    boot_starts: int = 2,
    seed: int = 0,
    ci_level: float = 0.95,
) -> LawFit:
    """Fit E + A/N^alpha + B/D^beta by Huber loss on ln L residuals (Hoffmann et al. approach 3).

    L-BFGS runs from the n_starts best points of Hoffmann's start grid. The bootstrap resamples
    points with replacement n_boot times and refits from the best fit plus the boot_starts best
    grid points of each resample; n_boot=0 skips it (ci is None).
    """
    if len(points) < 5:
        raise ValueError(f"the law has 5 parameters; got {len(points)} points, need at least 5")
    log_n = np.log(param_counts(points, param_kind))
    log_d = np.log([p.tokens for p in points])
    log_l = np.log([p.loss for p in points])
    # BLAS threads only add wake-up latency to 5-parameter problems: 20x slower on a busy machine.
    with threadpool_limits(limits=1, user_api="blas"):
        theta, objective, agreeing = _best_theta(
            _grid_starts(n_starts, log_n, log_d, log_l, delta), log_n, log_d, log_l, delta
        )
        samples = []
        rng = np.random.default_rng(seed)
        for _ in range(n_boot):
            idx = rng.integers(0, len(points), len(points))
            starts = np.vstack([theta, _grid_starts(boot_starts, log_n[idx], log_d[idx], log_l[idx], delta)])
            boot_theta, _, _ = _best_theta(starts, log_n[idx], log_d[idx], log_l[idx], delta)
            samples.append(_law_summary(_law_from_theta(boot_theta)))
    law = _law_from_theta(theta)
    ci = None
    if samples:
        ci = {key: _percentile_ci(np.array([s[key] for s in samples]), ci_level) for key in samples[0]}
    summary = _law_summary(law)
    return LawFit(
        law=law,
        param_kind=param_kind,
        n_points=len(points),
        mean_huber_loss=objective * delta * delta,
        n_starts_agreeing=agreeing,
        params_exponent=summary["params_exponent"],
        tokens_exponent=summary["tokens_exponent"],
        ci=ci,
        ci_level=ci_level,
        n_boot=n_boot,
    )


# ---- compute-optimal frontier and holdout ----------------------------------------------------------


@dataclass
class ComputeOptimal:
    """The law's best (N, D) at compute C = 6 N D and the loss it predicts there."""

    compute: float
    params: float
    tokens: float
    loss: float


def compute_optimal(law: LawParams, compute: float) -> ComputeOptimal:
    """Closed-form minimum of L over N at C = 6 N D (Hoffmann et al. eq. 4):
    N_opt = G (C/6)^(beta/(alpha+beta)), G = (alpha A / (beta B))^(1/(alpha+beta)), D_opt = C/(6 N_opt)."""
    total = law.alpha + law.beta
    g = (law.alpha * law.A / (law.beta * law.B)) ** (1.0 / total)
    params = g * (compute / 6.0) ** (law.beta / total)
    tokens = compute / 6.0 / params
    return ComputeOptimal(
        compute=compute, params=float(params), tokens=float(tokens), loss=float(predict_loss(law, params, tokens))
    )


@dataclass
class HeldOutPoint:
    params: float
    tokens: float
    compute: float
    loss: float
    predicted_loss: float
    abs_error: float
    rel_error: float


@dataclass
class HoldoutCheck:
    """A law fitted without the n_holdout largest-compute runs, scored on predicting them."""

    fit: LawFit
    held_out: list[HeldOutPoint]
    max_abs_error: float
    max_rel_error: float


def holdout_check(
    points: Sequence[ScalingPoint],
    *,
    n_holdout: int = 1,
    param_kind: ParamKind = "all",
    n_starts: int = 32,
    delta: float = 1e-3,
) -> HoldoutCheck:
    """Fit on all but the n_holdout largest-compute points, then predict those (no bootstrap)."""
    if not 1 <= n_holdout <= len(points) - 5:
        raise ValueError(
            f"n_holdout={n_holdout} must be in [1, len(points) - 5 = {len(points) - 5}] "
            "so that at least 5 points remain for the fit"
        )
    order = sorted(range(len(points)), key=lambda i: points[i].compute)
    train = [points[i] for i in order[:-n_holdout]]
    test = [points[i] for i in order[-n_holdout:]]
    fit = fit_law(train, param_kind=param_kind, n_starts=n_starts, delta=delta, n_boot=0)
    predicted = predict_loss(fit.law, param_counts(test, param_kind), [p.tokens for p in test])
    held_out = [
        HeldOutPoint(
            params=p.params,
            tokens=p.tokens,
            compute=p.compute,
            loss=p.loss,
            predicted_loss=float(pred),
            abs_error=float(abs(pred - p.loss)),
            rel_error=float(abs(pred - p.loss) / p.loss),
        )
        for p, pred in zip(test, predicted)
    ]
    return HoldoutCheck(
        fit=fit,
        held_out=held_out,
        max_abs_error=max(h.abs_error for h in held_out),
        max_rel_error=max(h.rel_error for h in held_out),
    )


# ---- IsoFLOP profiles (approach 2) ---------------------------------------------------------------


@dataclass
class IsoFlopBudget:
    """One budget's parabola L = c2 x^2 + c1 x + c0 in x = ln N, and its vertex. Only status 'ok'
    budgets enter the power-law fit: 'min_at_edge' means the sweep did not bracket the minimum
    (the vertex lies outside the sampled N, or the lowest observed loss is at the smallest or
    largest N), so the vertex would be an extrapolation; widen that budget's N grid."""

    compute: float
    n_points: int
    status: BudgetStatus
    coeffs: Optional[tuple[float, float, float]]
    params_opt: Optional[float]
    tokens_opt: Optional[float]
    loss_opt: Optional[float]


@dataclass
class PowerLaw:
    """y = coefficient * C^exponent, fitted by least squares in log-log space."""

    exponent: float
    coefficient: float
    exponent_ci: Optional[tuple[float, float]]


@dataclass
class IsoFlopFit:
    """Per-budget parabolas and the power laws N_opt(C), D_opt(C) over the 'ok' ones, with
    percentile CIs of their exponents from n_boot_used successful resamples."""

    param_kind: str
    budgets: list[IsoFlopBudget]
    n_budgets_used: int
    params_opt: PowerLaw
    tokens_opt: PowerLaw
    ci_level: float
    n_boot: int
    n_boot_used: int


def budget_key(point: ScalingPoint) -> float:
    """The IsoFLOP budget a point belongs to: its ``budget``, else its compute to 2 significant digits."""
    return point.budget if point.budget is not None else float(f"{point.compute:.2g}")


def _fit_budget(compute: float, log_n: np.ndarray, log_d: np.ndarray, loss: np.ndarray) -> IsoFlopBudget:
    unfitted = IsoFlopBudget(compute, len(loss), "too_few_points", None, None, None, None)
    if len(np.unique(log_n)) < 3:
        return unfitted
    c2, c1, c0 = (float(c) for c in np.polyfit(log_n, loss, 2))
    if c2 <= 0:
        return replace(unfitted, status="not_convex", coeffs=(c2, c1, c0))
    x = -c1 / (2.0 * c2)
    # D at the vertex from a line through (ln N, ln D): exact for C = 6ND, and it follows whatever
    # FLOPs per token the runs actually used when they recorded flops.
    slope, intercept = np.polyfit(log_n, log_d, 1)
    lowest_at_end = log_n[np.argmin(loss)] in (log_n.min(), log_n.max())
    status = "min_at_edge" if lowest_at_end or not log_n.min() < x < log_n.max() else "ok"
    return IsoFlopBudget(
        compute,
        len(loss),
        status,
        (c2, c1, c0),
        float(np.exp(x)),
        float(np.exp(slope * x + intercept)),
        c0 - c1 * c1 / (4.0 * c2),
    )


def _fit_budgets(groups: list[tuple[float, np.ndarray, np.ndarray, np.ndarray]]) -> list[IsoFlopBudget]:
    return [_fit_budget(c, log_n, log_d, loss) for c, log_n, log_d, loss in groups]


def _power_laws(budgets: list[IsoFlopBudget]) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """(slope, intercept) of ln N_opt and ln D_opt against ln C; None with fewer than 2 ok budgets."""
    ok = [b for b in budgets if b.status == "ok"]
    if len({b.compute for b in ok}) < 2:
        return None
    log_c = np.log([b.compute for b in ok])
    return (
        np.polyfit(log_c, np.log([b.params_opt for b in ok]), 1),
        np.polyfit(log_c, np.log([b.tokens_opt for b in ok]), 1),
    )


def fit_isoflops(
    points: Sequence[ScalingPoint],
    *,
    param_kind: ParamKind = "all",
    n_boot: int = 200,
    seed: int = 0,
    ci_level: float = 0.95,
) -> IsoFlopFit:
    """IsoFLOP analysis (Hoffmann et al. approach 2): vertex of each budget's parabola, then
    N_opt = k C^a and D_opt = k' C^b over the 'ok' budgets. A parabola's vertex is biased when the
    N grid sits off-centre on an asymmetric profile (alpha != beta); the parametric law is not.

    Points group by ``budget_key``. The bootstrap resamples points with replacement within each
    budget and refits everything; a resample with fewer than 2 ok budgets is skipped and counted (n_boot - n_boot_used).
    """
    n_all = param_counts(points, param_kind)
    keys = [budget_key(p) for p in points]
    groups = []
    for key in sorted(set(keys)):
        idx = np.array([i for i, k in enumerate(keys) if k == key])
        groups.append(
            (key, np.log(n_all[idx]), np.log([points[i].tokens for i in idx]), np.array([points[i].loss for i in idx]))
        )
    budgets = _fit_budgets(groups)
    lines = _power_laws(budgets)
    if lines is None:
        statuses = ", ".join(f"{b.compute:.3g}: {b.status} ({b.n_points} points)" for b in budgets)
        raise ValueError(f"IsoFLOP fit needs at least 2 budgets with a bracketed minimum; got {statuses}")
    exponents = []
    rng = np.random.default_rng(seed)
    with threadpool_limits(limits=1, user_api="blas"):  # thousands of tiny least-squares fits
        for _ in range(n_boot):
            resampled = []
            for c, log_n, log_d, loss in groups:
                idx = rng.integers(0, len(loss), len(loss))
                resampled.append((c, log_n[idx], log_d[idx], loss[idx]))
            boot = _power_laws(_fit_budgets(resampled))
            if boot is not None:
                exponents.append((boot[0][0], boot[1][0]))
    boot_exp = np.array(exponents).reshape(-1, 2)
    ci = [_percentile_ci(boot_exp[:, i], ci_level) if len(boot_exp) else None for i in range(2)]
    (params_exp, log_k), (tokens_exp, log_k_tokens) = lines
    return IsoFlopFit(
        param_kind=param_kind,
        budgets=budgets,
        n_budgets_used=sum(b.status == "ok" for b in budgets),
        params_opt=PowerLaw(float(params_exp), float(np.exp(log_k)), ci[0]),
        tokens_opt=PowerLaw(float(tokens_exp), float(np.exp(log_k_tokens)), ci[1]),
        ci_level=ci_level,
        n_boot=n_boot,
        n_boot_used=len(boot_exp),
    )
