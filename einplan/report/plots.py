"""Pictures of a cost report with matplotlib (the ``plots`` extra): time per group as bars,
and the roofline, a scatter of nodes under the machine's compute and bandwidth roofs."""

from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

from einplan.errors import EinplanError
from einplan.formats.files import write_atomic
from einplan.report.cost import CostReport
from einplan.report.phases import role_of

if TYPE_CHECKING:
    from matplotlib.figure import Figure

BOUND_COLORS = {"compute": "#2c7fb8", "memory": "#d95f0e", "": "#888888"}


def new_figure(width: float, height: float) -> Figure:
    """A matplotlib figure without pyplot's global state; a clear error without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise EinplanError(
            "plots need matplotlib: pip install 'einplan[plots]' (or pip install matplotlib)"
        ) from None
    return Figure(figsize=(width, height), layout="constrained")


def plot_bars(report: CostReport, top: int = 30) -> Figure:
    """Mean time per run of each group (the ``top`` largest for nodes and ops), as bars."""
    rows = report.rows[:top] if report.by in ("node", "op") else report.rows
    labels = [" ".join(str(r[k]) for k in ("entry", report.by) if k in r) for r in rows]
    fig = new_figure(8, 0.6 + 0.28 * len(rows))
    ax = fig.add_subplot()
    ax.barh(labels, [r["mean_ms"] for r in rows], color=[BOUND_COLORS[r["bound"]] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("ms per run (mean)")
    ax.set_title(
        f"time by {report.by}"
        + ("  (blue: compute-bound, orange: memory-bound)" if report.machine else "")
    )
    ax.tick_params(axis="y", labelsize=8)
    return fig


def plot_roofline(report: CostReport) -> Figure:
    """Achieved GFLOP/s against arithmetic intensity per group, under the roofs of
    ``einplan bench machine``; the size of a dot is its share of the time."""
    if report.machine is None:
        raise EinplanError("the roofline needs this machine's roofs: run einplan bench machine")
    import numpy as np

    peak, bw = report.machine["gemm_gflops"], report.machine["bandwidth_gbs"]
    rows = [r for r in report.rows if r["intensity"] and r["gflops"]]
    fig = new_figure(7, 5)
    ax = fig.add_subplot()
    lo = min([r["intensity"] for r in rows] + [0.05]) / 2
    hi = max([r["intensity"] for r in rows] + [peak / bw]) * 4
    x = np.geomspace(lo, hi, 200)
    ax.plot(x, np.minimum(peak, x * bw), color="black", lw=1.5, label="roof")
    ax.axvline(peak / bw, color="grey", ls=":", lw=1)
    ax.scatter(
        [r["intensity"] for r in rows],
        [r["gflops"] for r in rows],
        s=[10 + 8 * r["share_pct"] for r in rows],
        c=[BOUND_COLORS[r["bound"]] for r in rows],
        alpha=0.7,
    )
    labelled: set[str] = set()  # one label per role: ffn_down-3 and ffn_down-7 sit together
    for r in sorted(rows, key=lambda r: -r["share_pct"]):
        label = role_of(str(r[report.by])) if report.by == "node" else str(r[report.by])
        if label not in labelled and len(labelled) < 8:
            labelled.add(label)
            ax.annotate(
                label,
                (r["intensity"], r["gflops"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP/byte)")
    ax.set_ylabel("achieved GFLOP/s")
    ax.set_title(f"roofline by {report.by}: peak {peak:.0f} GFLOP/s, {bw:.0f} GB/s")
    return fig


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write a figure; the suffix picks the format (.svg, .png, .pdf)."""
    fmt = Path(path).suffix[1:] or None
    return write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format=fmt))


def figure_svg(fig: Figure) -> str:
    """A figure as inline SVG markup, for HTML pages."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg")
    text = buf.getvalue()
    return text[text.index("<svg") :]
