"""The memory breakdown of profiled runs: weights, KV cache, activations (the arena and
scratch buffers at peak), gradients and optimizer state, per entry point, p50 and p99 over its
runs (a KV cache or an arena grows with the sequence, so runs differ)."""

from __future__ import annotations

import numpy as np
from rich.console import Console
from rich.table import Table

from einplan.runtime.recorder import Recorder

KINDS = ("weights", "kv_cache", "activations", "gradients", "optimizer_state")


def memory_rows(rec: Recorder) -> list[tuple[str, str, float, float]]:
    """(entry, kind, p50 MiB, p99 MiB) for every kind a run of the entry holds."""
    by_entry: dict[str, list[dict[str, int]]] = {}
    for run in rec.runs:
        if run.get("memory"):
            by_entry.setdefault(run["entry"], []).append(run["memory"])
    rows = []
    for entry, runs in by_entry.items():
        for kind in KINDS:
            mib = np.array([r.get(kind, 0) for r in runs], dtype=np.float64) / 2**20
            if mib.any():
                rows.append(
                    (entry, kind, float(np.percentile(mib, 50)), float(np.percentile(mib, 99)))
                )
    return rows


def print_memory_table(rec: Recorder, console: Console) -> None:
    """Print the memory breakdown (nothing when the trace holds none)."""
    rows = memory_rows(rec)
    if not rows:
        return
    t = Table(title="memory by kind (MiB)")
    for col in ("entry", "kind", "p50", "p99"):
        t.add_column(col, justify="right" if col in ("p50", "p99") else "left")
    for entry, kind, p50, p99 in rows:
        t.add_row(entry, kind.replace("_", " "), f"{p50:,.1f}", f"{p99:,.1f}")
    console.print(t)
