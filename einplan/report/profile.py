"""``--profile DIR`` for any command that runs a plan: write the recorder's Chrome trace to
``DIR/trace.json`` (which ``einplan report DIR`` reads) and print the phase table."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from einplan.report.cost import EXPERT, cost_report
from einplan.report.machine import machine_of
from einplan.report.memory import print_memory_table
from einplan.report.tables import make_console, render_rich
from einplan.report.trace import write_trace
from einplan.runtime.recorder import Recorder

TRACE_NAME = "trace.json"  # the file in a --profile folder that einplan report reads


def write_profile(rec: Recorder, out_dir: str | Path, console: Console | None = None) -> Path:
    """Write ``out_dir/trace.json`` from ``rec`` and print its cost by phase (first run of each
    entry excluded as warm-up when there are more); returns the trace's path."""
    console = console or make_console()
    path = write_trace(rec, Path(out_dir) / TRACE_NAME)
    render_rich(cost_report(rec, "phase", warmup=1, machine=machine_of(rec)), None, console)
    print_memory_table(rec, console)
    print_expert_load(rec, console)
    console.print(
        f"wrote {path} (open it in Perfetto or chrome://tracing; per node: "
        f"einplan report {out_dir} --by node)"
    )
    return path


def expert_load(rec: Recorder) -> dict[tuple[str, int], dict[int, float]]:
    """Per (entry, layer): the mean tokens routed to each expert per run."""
    sums: dict[tuple[str, int], dict[int, list[int]]] = {}
    for (run, step), tokens in rec.loads.items():
        m = EXPERT.match(rec.runs[run]["table"][step].name)
        if m:
            key = (rec.runs[run]["entry"], int(m.group(1)))
            sums.setdefault(key, {}).setdefault(int(m.group(2)), []).append(tokens)
    return {k: {e: sum(v) / len(v) for e, v in sorted(d.items())} for k, d in sorted(sums.items())}


def print_expert_load(rec: Recorder, console: Console) -> None:
    """A mixture-of-experts profile: tokens routed to each expert per run, per layer, with the
    busiest expert's share (1/E when balanced)."""
    load = expert_load(rec)
    if not load:
        return
    experts = max(len(v) for v in load.values())
    t = Table(title="expert load (tokens routed per run)")
    for c in ("entry", "layer", *(f"e{e}" for e in range(experts)), "max share"):
        t.add_column(c, justify="left" if c == "entry" else "right")
    for (entry, layer), per in load.items():
        total = sum(per.values()) or 1
        cells = [f"{per.get(e, 0):,.1f}" for e in range(experts)]
        t.add_row(entry, str(layer), *cells, f"{max(per.values()) / total:.0%}")
    console.print(t)
