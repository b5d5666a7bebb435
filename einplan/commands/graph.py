"""``einplan graph``: a plan's graph as text, DOT, SVG, PNG or a self-contained HTML view."""

from __future__ import annotations

import argparse
from pathlib import Path

from einplan.commands.arguments import non_negative_int
from einplan.errors import EinplanError
from einplan.formats.files import check_not_input, write_atomic

FORMATS = ("text", "dot", "svg", "png", "html")
SUFFIXES = {
    ".txt": "text",
    ".dot": "dot",
    ".gv": "dot",
    ".svg": "svg",
    ".png": "png",
    ".html": "html",
}


def pick_format(fmt: str | None, output: str | None) -> str:
    """The ``--format`` given, else the one the output file's suffix names, else text."""
    if fmt is not None:
        return fmt
    if output is not None and Path(output).suffix.lower() in SUFFIXES:
        return SUFFIXES[Path(output).suffix.lower()]
    return "text"


def describe(entry: str, layer: int | None, pattern: str | None) -> str:
    """The title of a picture: entry and filters."""
    parts = [entry]
    if layer is not None:
        parts.append(f"layer {layer}")
    if pattern is not None:
        parts.append(f"names ~ /{pattern}/")
    return ", ".join(parts)


def run(args: argparse.Namespace) -> None:
    """Select the nodes asked for and write them in the chosen format."""
    from einplan.api import load_plan
    from einplan.report.dot import graph_to_dot, render_dot
    from einplan.report.html import dot_to_html
    from einplan.report.select import select_nodes

    if args.output is not None:
        check_not_input(args.output, [args.plan])
    fmt = pick_format(args.format, args.output)
    graph = load_plan(args.plan).entry(args.entry)
    nodes = select_nodes(graph, args.layer, args.filter)
    title = describe(graph.name, args.layer, args.filter)
    if fmt == "text":
        out: str | bytes = graph.format({n.id for n in nodes}) + "\n"
    elif fmt == "dot":
        out = graph_to_dot(graph, nodes, title).source
    elif fmt == "html":
        out = dot_to_html(graph_to_dot(graph, nodes, title), title)
    else:
        out = render_dot(graph_to_dot(graph, nodes, title), fmt)
    if args.output is None:
        if isinstance(out, bytes):
            if args.stdout.isatty():
                raise EinplanError(f"--format {fmt} is binary: give -o FILE")
            args.stdout.buffer.write(out)
        else:
            args.stdout.write(out)
        return
    write_atomic(args.output, out)
    print(f"wrote {args.output} ({fmt}, {len(nodes)} nodes)")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``graph`` parser."""
    g = sub.add_parser("graph", help="draw or list a plan's graph (text, dot, svg, png, html)")
    g.add_argument("plan", help="plan file from einplan compile")
    g.add_argument("--entry", default="forward", help="entry point")
    g.add_argument("--layer", type=non_negative_int, help="only the nodes of this layer")
    g.add_argument("--filter", metavar="REGEX", help="only nodes whose name matches REGEX")
    g.add_argument(
        "--format",
        choices=FORMATS,
        help="output format (default: from the -o suffix, else text); svg, png and html need "
        "Graphviz's dot",
    )
    g.add_argument("-o", "--output", help="file to write (default: standard output)")
    g.set_defaults(func=run)
