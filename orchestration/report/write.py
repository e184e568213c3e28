"""`raylm report`: one self-contained page for a training run, a scaling sweep, a tune search, a
baseline comparison, a tokenizer study or a μP coordinate check: ``report.html`` (plots inlined),
``report.md`` (+ PNGs) and ``results.json``.

Each kind (``report.run``, ``report.sweep``, ``report.tune``, ``report.baselines``, ``report.tokenizers``,
``report.mup_check``) builds a title, sections of blocks and a ``results`` dict from the artifacts its
command wrote; ``report.render`` turns blocks into HTML and Markdown.
"""

from __future__ import annotations

from typing import Optional

from orchestration.artifacts import (
    BASELINES_FILE,
    METRICS_FILE,
    MUP_CHECK_FILE,
    RUN_FILE,
    SCALING_POINTS_FILE,
    TOKENIZER_STUDY_FILE,
    TUNE_RESULTS_FILE,
    RunDir,
)
from orchestration.report.render import ReportError, html_page, markdown, png


def write_report(path: str, *, out: Optional[str] = None, endpoint_url: Optional[str] = None) -> dict[str, str]:
    """Report on a run directory (metrics.jsonl + run.json), a scaling sweep (scaling_points.json),
    a tune search (tune_results.json), a baseline comparison (baselines.json), a tokenizer study
    (tokenizer_study.json) or a μP coordinate check (mup_check.json) at ``path`` (local or
    s3://). Writes report.html, report.md, results.json and the figures' PNGs to ``out`` (default:
    ``path``); returns {file name: URI}."""
    from orchestration.report.baselines import baselines_report
    from orchestration.report.mup_check import mup_check_report
    from orchestration.report.run import run_report
    from orchestration.report.sweep import sweep_report
    from orchestration.report.tokenizers import tokenizers_report
    from orchestration.report.tune import tune_report

    where = RunDir.at(path, endpoint_url)
    if not where.exists():
        raise ReportError(f"{path} is not a directory; give a run, sweep, tune or baselines directory")
    names = where.names()
    if SCALING_POINTS_FILE in names:
        title, sections, results = sweep_report(where)
    elif TUNE_RESULTS_FILE in names:
        title, sections, results = tune_report(where)
    elif BASELINES_FILE in names:
        title, sections, results = baselines_report(where)
    elif TOKENIZER_STUDY_FILE in names:
        title, sections, results = tokenizers_report(where)
    elif MUP_CHECK_FILE in names:
        title, sections, results = mup_check_report(where)
    elif {METRICS_FILE, RUN_FILE} <= names:
        title, sections, results = run_report(where)
    else:
        raise ReportError(
            f"{path} is not a run, sweep, tune or baselines directory: expected {METRICS_FILE} and {RUN_FILE} "
            f"(`raylm train`), {SCALING_POINTS_FILE} (`raylm scaling`), {TUNE_RESULTS_FILE} (`raylm tune`), "
            f"{BASELINES_FILE} (`raylm baseline compare`), {TOKENIZER_STUDY_FILE} (`raylm tokenizers`) or "
            f"{MUP_CHECK_FILE} (`raylm mup-check`); "
            f"found {', '.join(sorted(names)) or 'nothing'}"
        )
    target = RunDir.at(out, endpoint_url) if out else where
    pngs = {block[1]: png(block[2]) for _, blocks in sections for block in blocks if block[0] == "figure"}
    files = {
        "report.html": html_page(title, sections, pngs).encode(),
        "report.md": markdown(title, sections).encode(),
        "results.json": None,
        **pngs,
    }
    written = {}
    for name, data in files.items():
        written[name] = target.write_json(name, results) if data is None else target.write_bytes(name, data)
    return written
