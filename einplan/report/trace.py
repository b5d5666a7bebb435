"""The recorder as a Chrome trace (JSON object format; opens in Perfetto and chrome://tracing):
one track per runtime thread, a slice per run on the main track and a slice per executed step
carrying its op, shapes, FLOPs and bytes. The file holds everything the cost report needs, so
``einplan report`` reads it back into a :class:`Recorder`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from einplan._version import __version__
from einplan.errors import EinplanError
from einplan.formats.files import write_atomic
from einplan.runtime.recorder import Recorder, StepInfo

FORMAT = "einplan-trace"
VERSION = 1
PID = 1


def micros(ns: int) -> float:
    """Nanoseconds as the trace's microseconds, kept to the nanosecond."""
    return round(ns / 1000, 3)


def chrome_trace(rec: Recorder) -> dict[str, Any]:
    """The Chrome trace document of every run in ``rec``; times start at the first run."""
    origin = min((r["start_ns"] for r in rec.runs), default=0)
    threads = sorted({thread for _, _, thread, _, _ in rec.raw} | {0})
    events: list[dict[str, Any]] = [
        {"ph": "M", "name": "process_name", "pid": PID, "tid": 0, "args": {"name": "einplan"}}
    ]
    for t in threads:
        name = "main" if t == 0 else f"worker {t}"
        events.append(
            {"ph": "M", "name": "thread_name", "pid": PID, "tid": t, "args": {"name": name}}
        )
    for i, r in enumerate(rec.runs):
        events.append(
            {
                "ph": "X",
                "cat": "run",
                "name": r["entry"],
                "pid": PID,
                "tid": 0,
                "ts": micros(r["start_ns"] - origin),
                "dur": micros(r["end_ns"] - r["start_ns"]),
                "args": {
                    "run": i,
                    "entry": r["entry"],
                    "dims": r["dims"],
                    "memory": r.get("memory", {}),
                },
            }
        )
    for run, step, thread, start, dur in rec.raw:
        info = rec.runs[run]["table"][step]
        events.append(
            {
                "ph": "X",
                "cat": info.op,
                "name": info.name,
                "pid": PID,
                "tid": thread,
                "ts": micros(start - origin),
                "dur": micros(dur),
                "args": {
                    "run": run,
                    "step": step,
                    "op": info.op,
                    "shapes": info.shapes,
                    "flops": info.flops,
                    "bytes": info.bytes,
                    "tags": list(info.tags),
                    "backend": info.backend,
                    **({"tokens": rec.loads[(run, step)]} if (run, step) in rec.loads else {}),
                },
            }
        )
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {"format": FORMAT, "version": VERSION, "einplan": __version__},
    }


def write_trace(rec: Recorder, path: str | Path) -> Path:
    """Write the Chrome trace of ``rec`` to ``path``."""
    return write_atomic(path, json.dumps(chrome_trace(rec), separators=(",", ":")))


def read_trace(path: str | Path) -> Recorder:
    """Rebuild the recorder a trace was written from (a clear error for other files)."""
    path = Path(path)
    if path.is_dir():
        path = path / "trace.json"
    if not path.is_file():
        raise EinplanError(
            f"no trace at {str(path)!r} (make one with --profile DIR, e.g. einplan eval ... "
            "--profile DIR)"
        )
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise EinplanError(f"{path}: not a trace (not JSON)") from None
    other = doc.get("otherData", {}) if isinstance(doc, dict) else {}
    if other.get("format") != FORMAT or other.get("version") != VERSION:
        raise EinplanError(f"{path}: not an einplan trace (format {FORMAT} {VERSION})")
    rec = Recorder(debug=0)
    tables: list[dict[int, StepInfo]] = []
    for e in doc["traceEvents"]:
        if e.get("ph") != "X":
            continue
        a = e["args"]
        start = round(e["ts"] * 1000)
        if e.get("cat") == "run":
            rec.runs.append(
                {
                    "entry": a["entry"],
                    "dims": a["dims"],
                    "start_ns": start,
                    "end_ns": start + round(e["dur"] * 1000),
                    "table": [],
                    "memory": a.get("memory", {}),
                }
            )
            tables.append({})
            continue
        info = StepInfo(
            e["name"],
            a["op"],
            a["flops"],
            a["bytes"],
            a["shapes"],
            tuple(a["tags"]),
            a.get("backend", "numpy"),  # traces written before backends ran numpy
        )
        tables[a["run"]][a["step"]] = info
        rec.raw.append((a["run"], a["step"], e["tid"], start, round(e["dur"] * 1000)))
        if "tokens" in a:
            rec.loads[(a["run"], a["step"])] = a["tokens"]
    for run, table in zip(rec.runs, tables, strict=True):
        run["table"] = [table[k] for k in sorted(table)]
    return rec
