"""A whole graph as one self-contained HTML page: the Graphviz SVG inline, with pan, zoom and
search (also from the URL: ``page.html#search=attn_q-0``). Nothing is fetched from a network."""

from __future__ import annotations

from html import escape
from importlib.resources import files

import graphviz

from einplan.report.dot import render_dot

TEMPLATE = files("einplan.report").joinpath("graph_view.html")


def dot_to_html(dot: graphviz.Digraph, title: str) -> str:
    """Lay out ``dot`` as SVG and embed it in the viewer page."""
    svg = render_dot(dot, "svg").decode()
    svg = svg[svg.index("<svg") :]  # drop the XML prolog and doctype
    page = TEMPLATE.read_text(encoding="utf-8")
    return page.replace("@TITLE@", escape(title)).replace("@SVG@", svg, 1)
