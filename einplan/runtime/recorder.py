"""The one timing recorder: a row per executed step, the raw material of every report."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field


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


@dataclass
class Recorder:
    """Collects ``(step, thread, start_ns, dur_ns)`` per executed step; names, ops, FLOPs and
    bytes are joined in from the plan when the records are read."""

    raw: list[tuple[int, int, int, int, int]] = field(default_factory=list)  # run, step, ...
    runs: list[dict] = field(default_factory=list)  # per run: entry, dims, start/end ns, table
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def begin_run(self, entry: str, dims: dict[str, int], table: list[tuple]) -> int:
        """Open a run; ``table`` holds (name, op, flops, bytes) per step for these dims."""
        self.runs.append(
            {
                "entry": entry,
                "dims": dict(dims),
                "start_ns": time.perf_counter_ns(),
                "end_ns": None,
                "table": table,
            }
        )
        return len(self.runs) - 1

    def end_run(self, run: int) -> None:
        """Close a run, stamping its wall-clock end."""
        self.runs[run]["end_ns"] = time.perf_counter_ns()

    def add(self, run: int, step: int, thread: int, start_ns: int, dur_ns: int) -> None:
        """Record one executed step (thread-safe)."""
        with self._lock:
            self.raw.append((run, step, thread, start_ns, dur_ns))

    def records(self, run: int | None = None) -> list[StepRecord]:
        """Return the full records, of one run or of all."""
        out = []
        for r, step, thread, start, dur in self.raw:
            if run is not None and r != run:
                continue
            name, op, flops, nbytes = self.runs[r]["table"][step]
            out.append(StepRecord(step, name, op, thread, start, dur, flops, nbytes))
        return out

    def wall_ns(self, run: int) -> int:
        """Wall-clock duration of one run."""
        return self.runs[run]["end_ns"] - self.runs[run]["start_ns"]
