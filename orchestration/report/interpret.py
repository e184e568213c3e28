"""``raylm interpret``'s result -> report sections: the checks, attention maps, logit lens,
attributions and probes (rendered by ``render.html_page``: figures inlined, no scripts)."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from orchestration.report.render import Section, fmt


def _attention_figure(layer: int, maps: np.ndarray, tokens: list[str]) -> Figure:
    heads = maps.shape[0]
    fig = Figure(figsize=(2.2 * heads + 0.6, 2.6))
    labels = [repr(t)[1:-1][:8] for t in tokens]
    for h in range(heads):
        ax = fig.add_subplot(1, heads, h + 1)
        ax.imshow(maps[h], vmin=0.0, vmax=1.0, cmap="viridis")
        ax.set_title(f"layer {layer} head {h}", fontsize=8)
        if len(tokens) <= 24:
            ax.set_xticks(range(len(tokens)), labels, rotation=90, fontsize=6)
            ax.set_yticks(range(len(tokens)), labels, fontsize=6)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    return fig


def _attribution_figure(tokens: list[str], attributions: list[float]) -> Figure:
    fig = Figure(figsize=(max(4.0, 0.35 * len(tokens) + 1), 2.8))
    ax = fig.add_subplot(1, 1, 1)
    colors = ["#c0392b" if a < 0 else "#2471a3" for a in attributions]
    ax.bar(range(len(tokens)), attributions, color=colors)
    ax.set_xticks(range(len(tokens)), [repr(t)[1:-1][:10] for t in tokens], rotation=90, fontsize=7)
    ax.set_ylabel("attribution")
    fig.tight_layout()
    return fig


def interpret_sections(result: dict, checkpoint: str) -> tuple[list[Section], dict[str, Figure]]:
    tokens = result["tokens"]
    ig = result["integrated_gradients"]
    figures: dict[str, Figure] = {}
    checks = [
        ["explicit attention vs SDPA, max |diff| of every layer's attention output",
         fmt(result["attention_explicit_vs_sdpa_max_abs_diff"])],
        ["explicit attention vs SDPA, max |diff| of the logits", fmt(result["logits_explicit_vs_sdpa_max_abs_diff"])],
        ["logit lens last layer vs the model's logits, max |diff|", fmt(result["logit_lens_last_layer_max_abs_diff"])],
        [f"integrated gradients completeness error ({ig['steps']} steps)", fmt(ig["completeness_error"])],
    ]  # fmt: skip
    sections: list[Section] = [
        (
            "Prompt and checks",
            [
                ("text", f"Checkpoint {checkpoint}; prompt {result['prompt']!r} ({len(tokens)} tokens)."),
                ("table", ["check", "value"], checks),
            ],
        )
    ]
    blocks = [("text", "Rows are queries, columns the keys they attend to (causal: the upper triangle is 0).")]
    for layer, maps in enumerate(result["attention"]):
        name = f"attention_layer{layer}.png"
        figures[name] = _attention_figure(layer, np.asarray(maps), tokens)
        blocks.append(("figure", name))
    sections.append(("Attention maps", blocks))
    lens_rows = [
        [("embeddings" if layer == 0 else f"block {layer - 1}")]
        + [f"{p[0]['token']!r} {p[0]['prob']:.2f}" for p in positions]
        for layer, positions in enumerate(result["logit_lens"])
    ]
    sections.append(
        (
            "Logit lens",
            [
                (
                    "text",
                    "Each layer's residual stream read through the final norm and the head: the most likely "
                    "next token at each position and its probability.",
                ),  # fmt: skip
                ("table", ["layer"] + [repr(t) for t in tokens], lens_rows),
            ],
        )
    )
    figures["attributions.png"] = _attribution_figure(tokens, ig["attributions"])
    sections.append(
        (
            "Integrated gradients",
            [
                (
                    "text",
                    f"Attribution of each prompt token's embedding to log p({ig['target_text']!r}), the model's "
                    f"most likely next token: {ig['log_prob_input']:.3f} with the prompt, "
                    f"{ig['log_prob_baseline']:.3f} with zero embeddings.",
                ),  # fmt: skip
                ("figure", "attributions.png"),
                (
                    "table",
                    ["token", "attribution"],
                    [[repr(t), f"{a:+.4f}"] for t, a in zip(tokens, ig["attributions"])],
                ),
            ],
        )
    )
    if "probes" in result:
        probes = result["probes"]
        rows = [
            [("embeddings" if r["layer"] == 0 else f"block {r['layer'] - 1}"), f"{r['accuracy']:.3f}",
             f"{r['control_accuracy']:.3f}", f"{r['selectivity']:+.3f}"]
            for r in probes["layers"]
        ]  # fmt: skip
        sections.append(
            (
                "Linear probes",
                [
                    ("text", f"Per token, a logistic probe for the window's label ({' vs '.join(probes['labels'])}; "
                             f"{probes['windows']} windows of {probes['window_tokens']} tokens, "
                             f"{probes['held_out_windows']} held out) against a control task whose label is drawn "
                             "at random once per token type (Hewitt & Liang): selectivity = accuracy - control."),
                    ("table", ["layer", "accuracy", "control accuracy", "selectivity"], rows),
                ],
            )
        )  # fmt: skip
    return sections, figures
