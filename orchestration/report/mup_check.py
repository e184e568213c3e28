"""The report of a μP coordinate check (`raylm mup-check`): activation scale against width, sp beside μP."""

from __future__ import annotations

from orchestration.artifacts import MUP_CHECK_FILE, RunDir
from orchestration.report.plots import plot_coord_check
from orchestration.report.render import Section


def mup_check_report(where: RunDir) -> tuple[str, list[Section], dict]:
    """(title, sections, results) of a ``raylm mup-check`` directory (mup_check.json)."""
    check = where.read_json(MUP_CHECK_FILE)
    widths, steps, checks = check["widths"], check["steps"], check["parametrizations"]
    config, defined = check["config"], check["definitions"]
    shown = sorted({1, steps})
    slope_rows = [
        (layer, *(f"{checks[p]['slopes'][layer][step - 1]:+.3f}" for p in checks for step in shown))
        for layer in check["layers"]
    ]
    loss_rows = [(p, *(f"{loss:.3f}" for loss in checks[p]["loss"][-1])) for p in checks]
    sections: list[Section] = [
        (
            "Coordinate check",
            [
                (
                    "text",
                    f"A {config['n_layer']}-layer GPT with {config['n_head']} heads at widths "
                    f"{', '.join(map(str, widths))} (μP's base width {config['base_width']}), trained {steps} AdamW "
                    f"steps at lr {check['lr']:g} for every width on {config['block_size']}-byte windows of "
                    f"{config['corpus_file']}, {config['seeds']} seeds. Scale: {defined['scale']}; {defined['step']}. "
                    "Where a parametrization is right, every line is flat: a layer's activations keep their "
                    f"size as the model widens. Max |slope| at step {steps} (log scale per log width, over "
                    f"layers): sp {check['sp_max_abs_slope']:.3f} ({checks['sp']['max_abs_slope_layer']}), "
                    f"μP {check['mup_max_abs_slope']:.3f} ({checks['mup']['max_abs_slope_layer']}).",
                ),
                ("figure", "mup_check.png", plot_coord_check(widths, checks, shown)),
                (
                    "table",
                    ("layer", *(f"{p} slope, step {step}" for p in checks for step in shown)),
                    slope_rows,
                ),
                ("text", f"Training loss at step {steps} (seed mean, nats/token) by width:"),
                ("table", ("parametrization", *map(str, widths)), loss_rows),
            ],
        )
    ]
    results = {
        "kind": "mup-check",
        "source": where.uri,
        **{k: check[k] for k in ("date", "widths", "steps", "lr", "sp_max_abs_slope", "mup_max_abs_slope")},
        "slopes": {p: checks[p]["slopes"] for p in checks},
    }
    return f"μP coordinate check {where.name}", sections, results
