"""``--profile DIR`` for any command that runs a plan: write the recorder's Chrome trace to
``DIR/trace.json`` (which ``einplan report DIR`` reads) and print the phase table."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from einplan.report.cost import cost_report
from einplan.report.machine import load_machine
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
    render_rich(cost_report(rec, "phase", warmup=1, machine=load_machine()), None, console)
    print_memory_table(rec, console)
    console.print(
        f"wrote {path} (open it in Perfetto or chrome://tracing; per node: "
        f"einplan report {out_dir} --by node)"
    )
    return path
