"""``einplan report``: the per-node cost report of a profile (``--profile DIR``'s trace)."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

from einplan.commands.arguments import non_negative_int
from einplan.errors import EinplanError
from einplan.formats.files import check_not_input, write_atomic
from einplan.report import plots
from einplan.report.cost import GROUPINGS, CostReport, cost_report
from einplan.report.machine import machine_of
from einplan.report.memory import print_memory_table
from einplan.report.profile import TRACE_NAME
from einplan.report.tables import (
    FORMATS,
    make_console,
    render_csv,
    render_html,
    render_json,
    render_rich,
)
from einplan.report.trace import read_trace


def run(args: argparse.Namespace) -> None:
    """Read the trace, aggregate, and write the report and any plots asked for."""
    for output in (args.output, args.bars, args.roofline):
        if output is not None:
            check_not_input(output, [args.profile, Path(args.profile) / TRACE_NAME])
    rec = read_trace(args.profile)
    report = cost_report(rec, args.by, args.warmup, machine_of(rec))
    for path, draw in ((args.bars, "bars"), (args.roofline, "roofline")):
        if path:
            fig = plots.plot_bars(report) if draw == "bars" else plots.plot_roofline(report)
            print(f"wrote {plots.save_figure(fig, path)}")
    if args.format == "table":
        if args.output is None:
            render_rich(report, args.top, make_console(args.stdout))
            print_memory_table(rec, make_console(args.stdout))
            return
        table = io.StringIO()
        render_rich(report, args.top, make_console(table))
        write_atomic(args.output, table.getvalue())
        print(f"wrote {args.output}")
        return
    if args.top:
        report.rows = report.rows[: args.top]
    if args.format == "csv":
        text = render_csv(report)
    elif args.format == "json":
        text = render_json(report)
    else:
        text = render_html(report, html_figures(report))
    if args.output:
        write_atomic(args.output, text)
        print(f"wrote {args.output}")
    else:
        print(text, end="", file=args.stdout)


def html_figures(report: CostReport) -> list[str]:
    """The bars and (given the machine's roofs) the roofline as inline SVG; none, with a
    note, without matplotlib."""
    try:
        figs = [plots.plot_bars(report)]
        if report.machine is not None:
            figs.append(plots.plot_roofline(report))
    except EinplanError as e:
        report.notes.append(str(e))
        return []
    return [plots.figure_svg(f) for f in figs]


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``report`` parser."""
    r = sub.add_parser("report", help="per-node cost report of a profile (trace.json)")
    r.add_argument("profile", help="a --profile DIR, or its trace.json")
    r.add_argument("--by", choices=GROUPINGS, default="node", help="group steps by")
    r.add_argument("--format", choices=FORMATS, default="table", help="output format")
    r.add_argument("-o", "--output", help="file to write (default: standard output)")
    r.add_argument(
        "--warmup", type=non_negative_int, default=1, help="first runs of each entry to leave out"
    )
    r.add_argument(
        "--top", type=non_negative_int, default=0, help="only the N largest rows (0: all)"
    )
    r.add_argument("--bars", metavar="FILE", help="also draw time per group (.svg/.png)")
    r.add_argument("--roofline", metavar="FILE", help="also draw the roofline (.svg/.png)")
    r.set_defaults(func=run)
