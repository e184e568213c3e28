"""gpu_suite.sh's closing table: one row per result line that ``bench_train.py --json`` appended.

python benchmarks/gpu_table.py RESULTS_JSONL SECONDS
"""

from __future__ import annotations

import argparse
import json


def table(rows: list[dict], seconds: float) -> str:
    """The suite's Markdown table (tokens/s, MFU, peak memory, raylm / bare), then its summary line
    (the last line of the suite's output: what a log tail shows first)."""
    pct = lambda v: f"{v:.1%}" if v is not None else "-"  # noqa: E731
    gib = lambda v: f"{v / 2**30:.1f}" if v else "-"  # noqa: E731
    peak = rows[0]["peak_flops"]
    head = ("model", "path", "bare tok/s", "raylm tok/s", "raylm/bare")
    head += ("bare MFU", "raylm MFU", "bare GiB", "raylm GiB")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        shape = f"{r['params'] / 1e6:.3g}M, head {r['head_rows']:,}, mb {r['micro_batch_size']}x{r['seq_len']}"
        cells = (
            f"{r['preset']} ({shape})",
            r["path"],
            f"{r['bare_tokens_per_s']:,.0f}",
            f"{r['raylm_tokens_per_s']:,.0f}",
            f"{r['ratio']:.3f}",
            pct(r["bare_mfu"]),
            pct(r["raylm_mfu"]),
            gib(r["bare_peak_bytes"]),
            gib(r["raylm_peak_bytes"]),
        )
        lines.append("| " + " | ".join(cells) + " |")
    mfu = f"MFU against {peak / 1e12:.0f} TFLOP/s" if peak else "no MFU (no known peak for this device)"
    lines.append(f"gpu_suite: {len(rows)} measurements in {seconds:.0f} s; {mfu}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", help="the results.jsonl that bench_train.py --json appended to")
    parser.add_argument("seconds", type=float, help="the suite's wall time so far")
    args = parser.parse_args(argv)
    with open(args.results) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        parser.error(f"{args.results} holds no results: did every bench_train.py run fail?")
    text = table(rows, args.seconds)
    print("\n" + text)
    return text


if __name__ == "__main__":
    main()
