"""The report of a baseline comparison: n-gram / RNN / GRU / LSTM / transformer on the same val windows."""

from __future__ import annotations

from orchestration.artifacts import BASELINES_FILE, RunDir
from orchestration.report.plots import plot_baselines
from orchestration.report.render import ReportError, Section, fmt


def baselines_report(where: RunDir) -> tuple[str, list[Section], dict]:
    """(title, sections, results) of a ``raylm baseline compare`` directory (baselines.json)."""
    comparison = where.read_json(BASELINES_FILE)
    rows = sorted(comparison.get("rows") or [], key=lambda r: r["bits_per_byte"])
    if not rows:
        raise ReportError(f"{where.uri_of(BASELINES_FILE)} has no rows; re-run `raylm baseline compare`")
    columns = (
        "model",
        "arch",
        "params",
        "train tokens",
        "train FLOPs",
        "tokens scored",
        "val loss (nats/token)",
        "perplexity",
        "bits per byte",
    )
    table = [
        (
            r["model"],
            r.get("arch"),
            fmt(r.get("params")),
            fmt(r.get("train_tokens")),
            fmt(r.get("train_flops")),
            fmt(r["tokens"]),
            f"{r['loss']:.4f}",
            f"{r['perplexity']:.2f}",
            f"{r['bits_per_byte']:.4f}",
        )
        for r in rows
    ]
    sections: list[Section] = [
        (
            "Comparison, lowest bits per byte first",
            [
                (
                    "text",
                    f"{len(rows)} models scored on the same {comparison['sequences']} {comparison['split']} windows of "
                    f"{comparison['manifest']}. Bits per byte sums the NLL of the text tokens over the bytes they "
                    "decode to, so it compares across tokenizers; n-gram models have no FLOPs (counting is not "
                    "matmul work), and training tokens are consumed sequences x seq_len.",
                ),
                ("table", columns, table),
                ("figure", "baselines.png", plot_baselines(rows)),
            ],
        ),
        ("Sources", [("table", ("model", "checkpoint or model directory"), [(r["model"], r["source"]) for r in rows])]),
    ]
    results = {
        "kind": "baselines",
        "source": where.uri,
        **{k: comparison[k] for k in ("manifest", "split", "sequences")},
        "best": rows[0]["model"],
        "rows": rows,
    }
    return f"Baselines {where.name}", sections, results
