"""A cost report written out: a rich table for the terminal, CSV, JSON, or an HTML page (with
the bar and roofline plots inline when matplotlib is installed)."""

from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import asdict
from html import escape
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table

from einplan.report.cost import CostReport

FORMATS = ("table", "csv", "json", "html")
WIDE = ("runs", "mean_ms", "mb", "intensity")  # in CSV, JSON and HTML; left out on terminals
HEADINGS = {
    "runs": "runs",
    "warmup_excluded": "warm-up",
    "p50_ms": "p50 ms",
    "p99_ms": "p99 ms",
    "mean_ms": "mean ms",
    "share_pct": "share %",
    "gflop": "GFLOP",
    "mb": "MB",
    "gflops": "GFLOP/s",
    "gbs": "GB/s",
    "intensity": "FLOP/B",
    "bound": "bound",
    "roof_pct": "% of roof",
    "tokens_per_s": "tokens/s",
    "steps_pct_of_wall": "steps % of wall",
    "ttft_ms": "TTFT ms",
}


def format_cell(value: Any) -> str:
    """A number as people read it: three significant decimals at most; blanks for none."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.1f}"
    return str(value)


def columns(rows: list[dict[str, Any]]) -> list[str]:
    """The keys of the rows, in first-seen order."""
    return list(dict.fromkeys(k for r in rows for k in r))


def make_console(file: TextIO | None = None) -> Console:
    """A console as wide as the terminal, or 200 columns when writing to a pipe or file."""
    out = file or sys.stdout
    return Console(file=file, width=None if out.isatty() else 200)


def render_rich(report: CostReport, top: int | None, console: Console) -> None:
    """Print the runs table and the cost table (the columns that matter most) to a terminal."""
    rows = report.rows[:top] if top else report.rows
    for title, table_rows in (
        ("runs (warm-up excluded)", report.runs),
        (f"cost by {report.by}", [{k: v for k, v in r.items() if k not in WIDE} for r in rows]),
    ):
        t = Table(title=title)
        cols = columns(table_rows)
        for c in cols:
            left = c in ("shapes", "entry", "op", "kernels", report.by)
            t.add_column(HEADINGS.get(c, c), justify="left" if left else "right", no_wrap=True)
        for r in table_rows:
            t.add_row(*(format_cell(r.get(c)) for c in cols))
        console.print(t)
    if top and len(report.rows) > top:
        console.print(f"({len(report.rows) - top} more rows; --top 0 shows all)")
    for note in report.notes:
        console.print(f"note: {note}")


def render_csv(report: CostReport) -> str:
    """The cost rows as CSV (one header line, full precision)."""
    out = io.StringIO()
    writer = csv.DictWriter(out, columns(report.rows), lineterminator="\n")
    writer.writeheader()
    writer.writerows(report.rows)
    return out.getvalue()


def render_json(report: CostReport) -> str:
    """The whole report (runs, rows, machine, notes) as JSON."""
    return json.dumps(asdict(report), indent=1)


def html_table(rows: list[dict[str, Any]]) -> str:
    """Rows as an HTML table."""
    cols = columns(rows)
    head = "".join(f"<th>{escape(HEADINGS.get(c, c))}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(format_cell(r.get(c)))}</td>" for c in cols) + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(report: CostReport, figures: list[str]) -> str:
    """A self-contained page: runs, cost table, notes, and inline SVG ``figures``."""
    notes = "".join(f"<p class=note>{escape(n)}</p>" for n in report.notes)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>einplan cost by {escape(report.by)}</title>
<style>
body {{ font: 14px Helvetica, Arial, sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 2px 8px; text-align: right; }}
th {{ background: #f3f3f3; }} td:first-child, th:first-child {{ text-align: left; }}
.note {{ color: #a60; }} svg {{ max-width: 100%; height: auto; }}
</style></head><body>
<h2>Runs (warm-up excluded)</h2>{html_table(report.runs)}
<h2>Cost by {escape(report.by)}</h2>{notes}{"".join(figures)}{html_table(report.rows)}
</body></html>
"""
