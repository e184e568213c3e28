"""Report blocks -> ``report.html`` (PNGs inlined as data URIs, inline CSS, nothing fetched) and
Markdown (PNGs referenced next to it). No templating engine: the blocks are the template.

A block is ("text", str) | ("table", headers, rows) | ("figure", file name, Figure) | ("code", str);
a section is (heading, blocks).
"""

from __future__ import annotations

import base64
import html
import io
import re
from typing import Any, Optional

from matplotlib.figure import Figure

Block = tuple
Section = tuple[str, list[Block]]


class ReportError(ValueError):
    """A directory that cannot be reported on, with what was expected there."""


def fmt(value: Any) -> str:
    """A number as a report shows it: 4 significant digits for floats, thousands separators for ints."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def with_ci(value: float, ci: Optional[tuple[float, float]]) -> str:
    return f"{value:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


CSS = (
    "body{font-family:sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}"
    "table{border-collapse:collapse;margin:1rem 0}td,th{border:1px solid #ccc;padding:.25rem .5rem;"
    "text-align:left}th{background:#f4f4f4}pre{background:#f7f7f7;padding:.75rem;overflow-x:auto}"
    "img{max-width:100%}"
)


def html_page(title: str, sections: list[Section], pngs: dict[str, bytes]) -> str:
    """The whole page, figures inlined."""
    e = html.escape
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title>"
        f"<style>{CSS}</style></head><body><h1>{e(title)}</h1>"
    ]
    for heading, blocks in sections:
        parts.append(f"<h2>{e(heading)}</h2>")
        for block in blocks:
            if block[0] == "text":
                parts.append(f"<p>{e(block[1])}</p>")
            elif block[0] == "code":
                parts.append(f"<pre>{e(block[1])}</pre>")
            elif block[0] == "figure":
                data = base64.b64encode(pngs[block[1]]).decode("ascii")
                parts.append(f"<img alt='{e(block[1])}' src='data:image/png;base64,{data}'>")
            else:
                head = "".join(f"<th>{e(h)}</th>" for h in block[1])
                body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in block[2])
                parts.append(f"<table><tr>{head}</tr>{body}</table>")
    return "\n".join(parts) + "\n</body></html>\n"


def markdown(title: str, sections: list[Section]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    parts = [f"# {title}"]
    for heading, blocks in sections:
        parts.append(f"## {heading}")
        for block in blocks:
            if block[0] == "text":
                parts.append(block[1])
            elif block[0] == "code":
                fence = "`" * max(3, 1 + max((len(run) for run in re.findall("`+", block[1])), default=0))
                parts.append(f"{fence}\n{block[1].rstrip()}\n{fence}")
            elif block[0] == "figure":
                parts.append(f"![{block[1]}]({block[1]})")
            else:
                lines = ["| " + " | ".join(cell(h) for h in block[1]) + " |", "|" + "---|" * len(block[1])]
                lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in block[2]]
                parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"
