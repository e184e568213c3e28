"""The report of a tokenizer study (`raylm tokenizers`): bits per byte at equal training compute."""

from __future__ import annotations

from orchestration.artifacts import TOKENIZER_STUDY_FILE, RunDir
from orchestration.report.plots import plot_tokenizers
from orchestration.report.render import ReportError, Section, fmt


def tokenizers_report(where: RunDir) -> tuple[str, list[Section], dict]:
    """(title, sections, results) of a ``raylm tokenizers`` directory (tokenizer_study.json)."""
    study = where.read_json(TOKENIZER_STUDY_FILE)
    rows = study.get("rows") or []
    if not rows:
        raise ReportError(f"{where.uri_of(TOKENIZER_STUDY_FILE)} has no rows; re-run `raylm tokenizers`")
    columns = (
        "tokenizer",
        "vocab",
        "chars/token",
        "val bits/byte",
        "val loss (nats/token)",
        "params",
        "steps",
        "train FLOPs",
        "train bytes",
        "wall (s)",
    )
    table = [
        (
            r["tokenizer"],
            fmt(r["vocab_size"]),
            f"{r['chars_per_token']:.3f}",
            f"{r['val_bits_per_byte']:.4f}",
            f"{r['val_loss']:.4f}",
            fmt(r["params"]),
            fmt(r["steps"]),
            fmt(float(r["train_flops"])),
            fmt(r["train_bytes"]),
            f"{r['wall_s']:.0f}",
        )
        for r in rows
    ]
    best = min(rows, key=lambda r: r["val_bits_per_byte"])
    sections: list[Section] = [
        (
            "Bits per byte at equal training compute",
            [
                (
                    "text",
                    f"Each tokenizer was trained on the same train text of {', '.join(study['corpus'])} "
                    f"({study['train_documents']} documents); the same model was trained on its tokens for "
                    f"{study['train_flops_budget']:.3g} FLOPs (6N + attention per token, the head included) and "
                    f"scored on the same {study['val_text_bytes']:,} val bytes of {', '.join(study['val_works'])}. "
                    "Bits per byte sums each target's NLL over the bytes it decodes to, so it compares across "
                    "vocabularies; the training curves are on the same scale at the train text's bytes per token. "
                    f"Lowest: {best['tokenizer']} at {best['val_bits_per_byte']:.4f} bits/byte. One model per "
                    "tokenizer (study.seed): at a small budget another seed can move a row by tenths of a bit, so "
                    "rerun with another seed before reading a small gap.",
                ),
                ("table", columns, table),
                ("figure", "tokenizers.png", plot_tokenizers(rows)),
            ],
        )
    ]
    results = {
        "kind": "tokenizers",
        "source": where.uri,
        "best": best["tokenizer"],
        **{k: study[k] for k in ("date", "corpus", "val_works", "val_text_bytes", "train_flops_budget")},
        "rows": [{k: v for k, v in r.items() if k != "curve"} for r in rows],
    }
    return f"Tokenizer study {where.name}", sections, results
