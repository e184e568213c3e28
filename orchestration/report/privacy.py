"""The privacy audit (`raylm eval --suite privacy`, ``evaluate.privacy``) as report blocks: exposure by
copies planted (figure and table), membership-inference AUCs and extraction rates."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from orchestration.report.render import Block, fmt


def plot_exposure(result: dict) -> Figure:
    """Each planted canary's exposure against its copies, the groups' means, the never-planted
    canaries' mean (the control) and the most any secret can reach (log2 of the candidates)."""
    e = result["exposure"]
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.subplots()
    groups = e["by_repetitions"]
    position = {g["repetitions"]: i for i, g in enumerate(groups)}
    for c in e["canaries"]:
        ax.scatter(position[c["repetitions"]], c["exposure"], color="C0", alpha=0.5, s=14)
    ax.plot(range(len(groups)), [g["mean"] for g in groups], color="C1", marker="o", label="mean")
    if e["never_planted_mean"] is not None:
        ax.axhline(e["never_planted_mean"], color="0.5", lw=0.8, ls=":", label="never planted (mean)")
    ax.axhline(e["max_bits"], color="C3", lw=0.8, ls="--", label=f"log2 {e['candidates']:,} (rank 1)")
    ax.set_xticks(range(len(groups)), [str(g["repetitions"] or "never") for g in groups])
    ax.set_xlabel("copies planted")
    ax.set_ylabel("exposure (bits)")
    ax.set_ylim(0, e["max_bits"] * 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def privacy_blocks(result: dict) -> list[Block]:
    e, m, x, a = result["exposure"], result["membership"], result["extraction"], result["audit"]
    dedup = f"exact dedup {'on' if a['dedup']['exact'] else 'off'}, near dedup {'on' if a['dedup']['near'] else 'off'}"
    return [
        (
            "text",
            f"Checkpoint {result['checkpoint']}. "
            f"Text planted in the training split by `data.audit` ({a['planted_documents']} documents, "
            f"{a['kept_documents']} kept after dedup; {dedup}). Exposure ranks each canary's secret among all "
            f"{e['candidates']:,} candidates of the template {e['template']!r}; never-planted canaries should "
            "average about 1.44 bits. "
            + (
                f"Exposure falls (beyond 2 standard errors) at {e['falls']}."
                if e["falls"]
                else "Exposure does not fall as copies rise (no drop beyond 2 standard errors)."
            ),
        ),
        ("figure", "exposure.png", plot_exposure(result)),
        (
            "table",
            ("copies planted", "kept", "canaries", "mean bits", "s.e.", "median", "min", "max"),
            [
                (str(g["repetitions"] or "never"), fmt(g["copies_kept"]), str(g["canaries"]))
                + tuple(fmt(g[k]) for k in ("mean", "stderr", "median", "min", "max"))
                for g in e["by_repetitions"]
            ],
        ),
        (
            "text",
            "Membership inference: planted member passages vs never-planted passages built the same way "
            f"(ROC AUC, 0.5 = chance; {m['bootstrap']['confidence']:.0%} bootstrap CI over passages).",
        ),
        (
            "table",
            ("copies planted", "kept", "members / non-members", "loss AUC", "Min-K% AUC", "loss: members / others"),
            [
                (
                    str(g["repetitions"]),
                    fmt(g["copies_kept"]),
                    f"{g['members']} / {g['non_members']}",
                    _auc(g["loss"]),
                    _auc(g["min_k"]),
                    f"{g['member_loss']:.3f} / {g['non_member_loss']:.3f}",
                )
                for g in m["by_repetitions"]
            ],
        ),
        (
            "text",
            f"Extraction: greedy continuation of each passage's first {x['prompt_tokens']} tokens; exact match "
            f"of the next {x['continuation_tokens']} (non-members: a correct guess without training on them).",
        ),
        (
            "table",
            ("passages", "kept", "count", "exact match", "tokens matched"),
            [
                (
                    f"{g['repetitions']} copies" if g["member"] else "non-members",
                    fmt(g["copies_kept"]),
                    str(g["passages"]),
                    fmt(g["exact_match"]),
                    fmt(g["token_match"]),
                )
                for g in x["by_repetitions"]
            ],
        ),
    ]


def _auc(score: dict) -> str:
    low, high = np.round(score["ci"], 3)
    return f"{score['auc']:.3f} [{low:.3f}, {high:.3f}]"
