"""Figures for `raylm report`: a run's loss, throughput and privacy (DP-SGD) curves, a tune sweep's trial curves and
its val loss against learning rate per width, the baseline comparison's bars, the tokenizer study's bars and curves,
the μP coordinate check's scale-vs-width lines.

Built on ``matplotlib.figure.Figure`` without pyplot (no global figure state, no display backend),
like ``scaling_plots``; the report renders each figure once to PNG.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure


def _column(records: Sequence[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the records that have a non-null ``key``."""
    rows = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    steps, values = zip(*rows) if rows else ((), ())
    return np.array(steps, dtype=float), np.array(values, dtype=float)


def plot_loss(records: Sequence[dict], flops_per_token: float) -> Figure:
    """Train and validation loss against tokens seen and against training FLOPs."""
    fig = Figure(figsize=(10, 4), layout="constrained")
    tokens_at = {r["step"]: r["tokens"] for r in records}
    train_steps, train = _column(records, "loss")
    val_steps, val = _column(records, "val_loss")
    for ax, scale, label in zip(fig.subplots(1, 2), (1.0, flops_per_token), ("tokens", "training FLOPs")):
        ax.plot([tokens_at[s] * scale for s in train_steps], train, color="C0", lw=1.2, label="train")
        if len(val):
            ax.plot([tokens_at[s] * scale for s in val_steps], val, color="C3", marker="o", label="validation")
        ax.set_xlabel(label)
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    return fig


def plot_bias(records: Sequence[dict]) -> Figure:
    """The bias probe's overall score with its bootstrap CI, and each category's mean, at every eval
    of a run with ``train.bias_probe``."""
    fig = Figure(figsize=(8, 4), layout="constrained")
    ax = fig.subplots()
    evals = [r for r in records if r.get("bias_score") is not None]
    steps = np.array([r["step"] for r in evals], dtype=float)
    low, high = np.array([r["bias_ci"] for r in evals], dtype=float).T
    ax.fill_between(steps, low, high, color="C0", alpha=0.2, label="95% bootstrap CI")
    ax.plot(steps, [r["bias_score"] for r in evals], color="C0", marker="o", label="overall")
    for i, name in enumerate(sorted({k for r in evals for k in r if k.startswith("bias/")})):
        cat_steps, values = _column(evals, name)
        ax.plot(cat_steps, values, color=f"C{i + 1}", lw=1, alpha=0.8, label=name.split("/", 1)[1])
    ax.axhline(0.0, color="0.5", lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("stereotype log odds (nats)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def plot_mixture(records: Sequence[dict]) -> Figure:
    """A data mixture's val loss per source and the run's weighted val loss, at every eval; the epochs of
    each source read, at every log."""
    fig = Figure(figsize=(10, 3.5), layout="constrained")
    loss_ax, epochs_ax = fig.subplots(1, 2)
    steps, weighted = _column(records, "val_loss")
    loss_ax.plot(steps, weighted, color="0.3", marker="o", label="weighted (val_loss)")
    sources = sorted({k.split("/", 1)[1] for r in records for k in r if k.startswith("val_loss/")})
    for i, name in enumerate(sources):
        loss_ax.plot(*_column(records, f"val_loss/{name}"), color=f"C{i}", marker=".", label=name)
        epochs_ax.plot(*_column(records, f"data_epochs/{name}"), color=f"C{i}", label=name)
    loss_ax.set_ylabel("val loss (nats/token)")
    epochs_ax.set_ylabel("epochs of the source read")
    for ax in (loss_ax, epochs_ax):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def plot_privacy(records: Sequence[dict]) -> Figure:
    """A DP-SGD run's epsilon spent (at its delta) against the step, as its accountant logged it."""
    fig = Figure(figsize=(8, 3.5), layout="constrained")
    ax = fig.subplots()
    steps, epsilon = _column(records, "dp_epsilon")
    ax.plot(steps, epsilon, color="C4", marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel(f"epsilon (delta {records[-1]['dp_delta']:g})")
    ax.grid(alpha=0.3)
    ax.set_ylim(bottom=0)
    return fig


def plot_throughput(records: Sequence[dict]) -> Figure:
    """tokens/s, MFU (or achieved FLOP/s when the device peak is unknown, e.g. CPU) and the time
    per step spent waiting for data, each against the step that closed its log window."""
    fig = Figure(figsize=(8, 7.5), layout="constrained")
    tput_ax, flops_ax, wait_ax = fig.subplots(3, 1, sharex=True)
    steps, tokens_per_s = _column(records, "tokens_per_s")
    tput_ax.plot(steps, tokens_per_s, color="C0")
    tput_ax.set_ylabel("tokens/s")
    mfu_steps, mfu = _column(records, "mfu")
    if len(mfu):
        flops_ax.plot(mfu_steps, 100.0 * mfu, color="C2")
        flops_ax.set_ylabel("MFU (%)")
    else:
        flops_steps, flops_per_s = _column(records, "flops_per_s")
        flops_ax.plot(flops_steps, flops_per_s / 1e9, color="C2")
        flops_ax.set_ylabel("achieved GFLOP/s\n(no device peak: no MFU)")
    wait_steps, wait_s = _column(records, "data_wait_s")
    wait_ax.plot(wait_steps, 1e3 * wait_s, color="C1")
    wait_ax.set_ylabel("data wait (ms/step)")
    wait_ax.set_xlabel("step")
    for ax in (tput_ax, flops_ax, wait_ax):
        ax.grid(alpha=0.3)
        ax.set_ylim(bottom=0)
    return fig


def plot_trials(curves: dict[str, Sequence[dict]]) -> Figure:
    """Per trial (best first): training loss as a thin line, validation loss as markers, vs tokens."""
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.add_subplot()
    colors = colormaps["viridis"](np.linspace(0.0, 0.9, max(len(curves), 1)))
    for (trial_id, records), color in zip(curves.items(), colors):
        tokens_at = {r["step"]: r["tokens"] for r in records}
        steps, loss = _column(records, "loss")
        ax.plot([tokens_at[s] for s in steps], loss, color=color, lw=0.8, alpha=0.6)
        val_steps, val = _column(records, "val_loss")
        ax.plot([tokens_at[s] for s in val_steps], val, color=color, marker="o", label=trial_id)
    ax.set_xlabel("tokens")
    ax.set_ylabel("loss (nats/token): line train, markers validation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return fig


ARCH_COLORS = {"gpt": "C0", "lstm": "C1", "ngram": "C2", "gru": "C4", "rnn": "C5"}


def plot_baselines(rows: Sequence[dict]) -> Figure:
    """Bits per byte and validation loss per model, as horizontal bars, rows in the order given
    (top to bottom), colored by architecture and labelled with their values."""
    fig = Figure(figsize=(10, 1.0 + 0.5 * len(rows)), layout="constrained")
    names = [r["model"] for r in rows][::-1]  # barh draws bottom up
    colors = [ARCH_COLORS.get(r.get("arch"), "C7") for r in rows][::-1]
    for ax, key, label in zip(
        fig.subplots(1, 2, sharey=True),
        ("bits_per_byte", "loss"),
        ("bits per byte (lower is better)", "validation loss (nats/token)"),
    ):
        values = [r[key] for r in rows][::-1]
        bars = ax.barh(names, values, color=colors)
        ax.bar_label(bars, labels=[f"{v:.3f}" for v in values], padding=3, fontsize=8)
        ax.set_xlabel(label)
        ax.set_xlim(0, 1.15 * max(values))
        ax.grid(axis="x", alpha=0.3)
    return fig


def plot_tokenizers(rows: Sequence[dict]) -> Figure:
    """The tokenizer study: val bits per byte per tokenizer (bars labelled with characters per token),
    and each model's training loss on the bits-per-byte scale against training FLOPs."""
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    bar_ax, curve_ax = fig.subplots(1, 2)
    names = [r["tokenizer"] for r in rows][::-1]  # barh draws bottom up
    values = [r["val_bits_per_byte"] for r in rows][::-1]
    colors = [f"C{i}" for i in range(len(rows))][::-1]
    bars = bar_ax.barh(names, values, color=colors)
    labels = [f"{r['val_bits_per_byte']:.3f} ({r['chars_per_token']:.2f} chars/token)" for r in rows][::-1]
    bar_ax.bar_label(bars, labels=labels, padding=3, fontsize=8)
    bar_ax.set_xlim(0, 1.45 * max(values))
    bar_ax.set_xlabel("val bits per byte (lower is better)")
    bar_ax.grid(axis="x", alpha=0.3)
    for i, r in enumerate(rows):
        curve = r["curve"]
        curve_ax.plot(
            [p["train_flops"] for p in curve], [p["bits_per_byte"] for p in curve], color=f"C{i}", label=r["tokenizer"]
        )
        curve_ax.plot([r["train_flops"]], [r["val_bits_per_byte"]], color=f"C{i}", marker="o")
    curve_ax.set_xlabel("training FLOPs")
    curve_ax.set_ylabel("bits per byte: line train, dot val")
    curve_ax.grid(alpha=0.3)
    curve_ax.legend(fontsize=8)
    return fig


def plot_coord_check(widths: Sequence[int], checks: dict[str, dict], steps_shown: Sequence[int]) -> Figure:
    """The μP coordinate check: for each parametrization (a row) and each shown step (a column), every
    layer's activation scale (mean |x|) against width on log-log axes, one line per layer."""
    fig = Figure(figsize=(5 * len(steps_shown), 4 * len(checks)), layout="constrained")
    axes = fig.subplots(len(checks), len(steps_shown), squeeze=False)
    for row, (parametrization, check) in zip(axes, checks.items()):
        for ax, step in zip(row, steps_shown):
            for i, (layer, scales) in enumerate(check["scales"].items()):
                ax.plot(
                    widths,
                    scales[step - 1],
                    color=f"C{i}",
                    marker="o",
                    ms=3,
                    label=f"{layer} ({check['slopes'][layer][step - 1]:+.2f})",
                )
            ax.set_xscale("log")
            ax.set_xticks(widths, [str(w) for w in widths], minor=False)
            ax.minorticks_off()
            ax.set_yscale("log")
            ax.set_title(f"{parametrization}, step {step}")
            ax.set_xlabel("width (n_embd)")
            ax.set_ylabel("mean |x|")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=6, title="layer (slope)", title_fontsize=6)
    return fig


def plot_lr_transfer(points: Sequence[dict]) -> Figure:
    """A search over learning rate and width (tune_results.json's ``lr_transfer.points``): val loss
    against the learning rate (log x), one line per width, one panel per parametrization; a star at
    each width's best learning rate."""
    names = sorted({p["parametrization"] for p in points})
    fig = Figure(figsize=(5 * len(names), 4), layout="constrained")
    axes = fig.subplots(1, len(names), sharey=True, squeeze=False)[0]
    widths = sorted({p["width"] for p in points})
    colors = dict(zip(widths, colormaps["viridis"](np.linspace(0.0, 0.9, len(widths)))))
    for ax, name in zip(axes, names):
        for width in widths:
            line = sorted(
                (p["lr"], p["val_loss"]) for p in points if (p["parametrization"], p["width"]) == (name, width)
            )
            if not line:
                continue
            lrs, losses = zip(*line)
            ax.plot(lrs, losses, color=colors[width], marker="o", label=f"width {width}")
            best = int(np.argmin(losses))
            ax.plot([lrs[best]], [losses[best]], color=colors[width], marker="*", markersize=14)
        ax.set_xscale("log")
        grid = sorted({p["lr"] for p in points if p["parametrization"] == name})
        if len(grid) <= 10:  # a grid search's values as the ticks; sampled lrs keep the log axis's own
            ax.set_xticks(grid, labels=[f"{lr:.3g}" for lr in grid], rotation=45, fontsize=8)
            ax.minorticks_off()
        ax.set_xlabel("learning rate")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("final val loss (nats/token)")
    return fig
