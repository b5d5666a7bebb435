"""The one timing recorder: a row per executed step, the raw material of every report.

``EINPLAN_DEBUG=1`` prints a line per run, ``EINPLAN_DEBUG=2`` also a live line per executed
step (name, ms, GFLOP/s) to standard error.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import NamedTuple

from einplan.errors import EinplanError
from einplan.runtime.moe import LOAD


def debug_level() -> int:
    """The level set by ``EINPLAN_DEBUG`` (0 when unset): 1 a line per run, 2 per step."""
    value = os.environ.get("EINPLAN_DEBUG", "").strip() or "0"
    if not value.isdigit():
        raise EinplanError(f"EINPLAN_DEBUG must be a level 0, 1 or 2, got {value!r}")
    return int(value)


class StepInfo(NamedTuple):
    """What a plan step is, for the dims of one run: the static half of a record."""

    name: str
    op: str
    flops: int
    bytes: int
    shapes: str = ""  # "f32[1,256,576], f32[576,576] -> f32[1,256,576]"
    tags: tuple[str, ...] = ()
    backend: str = "numpy"  # the kernels backend that made the step's kernel


@dataclass
class StepRecord:
    """One execution of one plan step."""

    step: int
    name: str
    op: str
    thread: int
    start_ns: int
    dur_ns: int
    flops: int
    bytes: int
    shapes: str = ""
    tags: tuple[str, ...] = ()
    backend: str = "numpy"


@dataclass
class Recorder:
    """Collects ``(step, thread, start_ns, dur_ns)`` per executed step; names, ops, FLOPs and
    bytes are joined in from the plan when the records are read."""

    raw: list[tuple[int, int, int, int, int]] = field(default_factory=list)  # run, step, ...
    runs: list[dict] = field(default_factory=list)  # per run: entry, dims, start/end ns, table
    # (run, step) -> tokens routed to that step's expert (mixture-of-experts steps only)
    loads: dict[tuple[int, int], int] = field(default_factory=dict)
    debug: int = field(default_factory=debug_level)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def begin_run(
        self,
        entry: str,
        dims: dict[str, int],
        table: list[StepInfo],
        memory: dict[str, int] | None = None,
    ) -> int:
        """Open a run; ``table`` describes each step for these dims, ``memory`` the bytes the
        run holds by kind (weights, kv_cache, activations, gradients, optimizer_state)."""
        self.runs.append(
            {
                "entry": entry,
                "dims": dict(dims),
                "start_ns": time.perf_counter_ns(),
                "end_ns": None,
                "table": table,
                "memory": dict(memory or {}),
            }
        )
        return len(self.runs) - 1

    def end_run(self, run: int) -> None:
        """Close a run, stamping its wall-clock end."""
        self.runs[run]["end_ns"] = time.perf_counter_ns()
        for step, info in enumerate(self.runs[run]["table"]):
            if info.op == "moe_expert":  # its kernel counted the tokens routed to it
                self.loads[(run, step)] = LOAD.get(info.name, 0)
        if self.debug >= 1:
            r = self.runs[run]
            dims = " ".join(f"{k}={v}" for k, v in r["dims"].items())
            sys.stderr.write(
                f"einplan: run {run} {r['entry']} {dims}: {self.wall_ns(run) / 1e6:.2f} ms, "
                f"{len(r['table'])} steps\n"
            )

    def add(self, run: int, step: int, thread: int, start_ns: int, dur_ns: int) -> None:
        """Record one executed step (thread-safe)."""
        with self._lock:
            self.raw.append((run, step, thread, start_ns, dur_ns))
            if self.debug >= 2:
                info = self.runs[run]["table"][step]
                rate = info.flops / dur_ns if dur_ns else 0.0  # FLOP/ns = GFLOP/s
                sys.stderr.write(
                    f"einplan: {step:5d} {info.name:<24} {info.op:<10} {dur_ns / 1e6:9.3f} ms "
                    f"{rate:8.1f} GFLOP/s  t{thread} {info.backend}\n"
                )

    def records(self, run: int | None = None) -> list[StepRecord]:
        """Return the full records, of one run or of all."""
        out = []
        for r, step, thread, start, dur in self.raw:
            if run is not None and r != run:
                continue
            info = self.runs[r]["table"][step]
            out.append(
                StepRecord(
                    step,
                    info.name,
                    info.op,
                    thread,
                    start,
                    dur,
                    info.flops,
                    info.bytes,
                    info.shapes,
                    info.tags,
                    info.backend,
                )
            )
        return out

    def wall_ns(self, run: int) -> int:
        """Wall-clock duration of one run."""
        return self.runs[run]["end_ns"] - self.runs[run]["start_ns"]
