"""The per-node cost report, a view of the recorder: for every node (or op, layer, phase,
stage) its time p50/p99 over the measured runs, share of the wall time, FLOPs, bytes, achieved
GFLOP/s and GB/s, and whether it is compute- or memory-bound against this machine's roofs."""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from einplan.compiler.names import layer_of
from einplan.errors import EinplanError
from einplan.report.phases import phase_of, phase_rank, role_of, stage_of
from einplan.runtime.recorder import Recorder, StepRecord

GROUPINGS = ("node", "op", "layer", "phase", "stage", "expert")
EXPERT = re.compile(r"moe_expert-(\d+)\.(\d+)(?:\.|$)")  # moe_expert-3.5[.grad2]: layer 3, expert 5


def expert_of(name: str) -> str | None:
    """``layer 3 expert 5`` for a routed expert's step (forward or reverse), else None."""
    m = EXPERT.match(name)
    return f"layer {m.group(1)} expert {m.group(2)}" if m else None


@dataclass
class CostReport:
    """Rows of one grouping plus the runs they were measured over."""

    by: str
    rows: list[dict[str, Any]]
    runs: list[dict[str, Any]]  # per entry: runs measured, warm-up excluded, wall p50/p99
    machine: dict[str, Any] | None
    notes: list[str] = field(default_factory=list)


def measured_runs(rec: Recorder, warmup: int) -> tuple[list[int], dict[str, int]]:
    """The runs that count: all but the first ``warmup`` of each entry (all of them when an
    entry has no more runs than that). Also returns how many were excluded per entry."""
    by_entry: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rec.runs):
        if r["end_ns"] is not None:
            by_entry[r["entry"]].append(i)
    if not by_entry:
        raise EinplanError("the profile holds no finished run")
    kept, excluded = [], {}
    for entry, runs in by_entry.items():
        skip = warmup if len(runs) > warmup else 0
        excluded[entry] = skip
        kept += runs[skip:]
    return sorted(kept), excluded


def group_of(r: StepRecord, by: str) -> str:
    """The group a step belongs to: its node, op, layer (or role outside layers), phase or
    stage."""
    if by == "node":
        return r.name
    if by == "op":
        return r.op
    if by == "layer":
        layer = layer_of(r.name)
        return f"layer {layer}" if layer is not None else role_of(r.name).split(".")[0]
    if by == "phase":
        return phase_of(r.name, r.tags)
    if by == "expert":
        return expert_of(r.name) or ""
    return stage_of(r.tags)


def roofline(flops: float, nbytes: float, seconds: float, machine: dict | None) -> dict:
    """Achieved rates, arithmetic intensity and, given the machine's roofs, the bound and the
    share of the attainable rate reached."""
    out = {
        "gflops": flops / seconds / 1e9 if seconds else 0.0,
        "gbs": nbytes / seconds / 1e9 if seconds else 0.0,
        "intensity": flops / nbytes if nbytes else None,
        "bound": "",
        "roof_pct": None,
    }
    if machine is None or not (flops or nbytes):
        return out
    peak, bw = machine["gemm_gflops"], machine["bandwidth_gbs"]
    intensity = out["intensity"]
    compute = intensity is None or intensity >= peak / bw
    out["bound"] = "compute" if compute else "memory"
    attainable = peak if compute else intensity * bw
    out["roof_pct"] = 100 * out["gflops"] / attainable if flops else 100 * out["gbs"] / bw
    return out


def cost_report(
    rec: Recorder, by: str = "node", warmup: int = 1, machine: dict | None = None
) -> CostReport:
    """Aggregate the recorder's steps by ``by`` over the measured runs."""
    if by not in GROUPINGS:
        raise EinplanError(f"cannot group by {by!r} (choose from {', '.join(GROUPINGS)})")
    runs, excluded = measured_runs(rec, warmup)
    entries = sorted({rec.runs[i]["entry"] for i in runs})
    wall = {i: rec.wall_ns(i) for i in runs}
    total_wall = sum(wall.values())
    # (entry, group) -> per run: [ns, flops, bytes]; plus op/shapes of node rows
    sums: dict[tuple[str, str], dict[int, list[int]]] = defaultdict(dict)
    meta: dict[tuple[str, str], dict[str, str]] = {}
    tokens: dict[tuple[str, str], int] = defaultdict(int)  # by expert: tokens routed, all runs
    for i in runs:
        entry = rec.runs[i]["entry"]
        for r in rec.records(i):
            group = group_of(r, by)
            if by == "expert":
                if not group:  # not an expert's step
                    continue
                tokens[(entry, group)] += rec.loads.get((i, r.step), 0)
            key = (entry, group)
            acc = sums[key].setdefault(i, [0, 0, 0])
            acc[0] += r.dur_ns
            acc[1] += r.flops
            acc[2] += r.bytes
            if key not in meta:  # the first step of a group places it in model order
                order = phase_rank(group) if by == "phase" else (r.step,)
                meta[key] = {"op": r.op, "shapes": r.shapes, "order": order, "kernels": set()}
            meta[key]["kernels"].add(r.backend)
    placed = []  # (model order, row)
    for (entry, group), per_run in sums.items():
        ns = np.array([v[0] for v in per_run.values()], dtype=np.float64)
        flops = sum(v[1] for v in per_run.values())
        nbytes = sum(v[2] for v in per_run.values())
        row: dict[str, Any] = {by: group}
        if len(entries) > 1:
            row["entry"] = entry
        if by == "node":
            row["op"] = meta[(entry, group)]["op"]
            row["shapes"] = meta[(entry, group)]["shapes"]
        if by == "expert":
            row["tokens"] = tokens[(entry, group)] / len(ns)  # per run
        row["kernels"] = "+".join(sorted(meta[(entry, group)]["kernels"]))
        row |= {
            "runs": len(ns),
            "p50_ms": float(np.percentile(ns, 50)) / 1e6,
            "p99_ms": float(np.percentile(ns, 99)) / 1e6,
            "mean_ms": float(ns.mean()) / 1e6,
            "share_pct": 100 * float(ns.sum()) / total_wall if total_wall else 0.0,
            "gflop": flops / len(ns) / 1e9,
            "mb": nbytes / len(ns) / 1e6,
        }
        row |= roofline(flops, nbytes, float(ns.sum()) / 1e9, machine)
        placed.append(((entry, meta[(entry, group)]["order"]), row))
    if by in ("node", "op"):  # the costliest first
        rows = [row for _, row in sorted(placed, key=lambda p: -p[1]["mean_ms"])]
    else:
        rows = [row for _, row in sorted(placed, key=lambda p: p[0])]
    notes = []
    if by == "expert" and not rows:
        raise EinplanError(
            "the profile holds no routed-expert step (not a mixture-of-experts plan)"
        )
    if by == "expert":
        notes.append("tokens: routed to the expert per run (its forward step)")
    if machine is None:
        notes.append("no roofs for this machine yet: run `einplan bench machine` for the bound")
    return CostReport(by, rows, run_summary(rec, runs, excluded), machine, notes)


def run_summary(rec: Recorder, runs: list[int], excluded: dict[str, int]) -> list[dict]:
    """Per entry: runs measured and excluded, wall p50/p99, tokens per second, and how much of
    the wall time the timed steps cover (the rest is the interpreter between steps)."""
    out = []
    for entry in sorted({rec.runs[i]["entry"] for i in runs}):
        ids = [i for i in runs if rec.runs[i]["entry"] == entry]
        wall = np.array([rec.wall_ns(i) for i in ids], dtype=np.float64)
        steps = sum(r.dur_ns for i in ids for r in rec.records(i))
        dims = [rec.runs[i]["dims"] for i in ids]  # decode has no seq: one token per row
        tokens = sum(d.get("batch", 1) * d.get("seq", 1) for d in dims)
        row = {
            "entry": entry,
            "runs": len(ids),
            "warmup_excluded": excluded[entry],
            "p50_ms": float(np.percentile(wall, 50)) / 1e6,
            "p99_ms": float(np.percentile(wall, 99)) / 1e6,
            "tokens_per_s": float(tokens / (wall.sum() / 1e9)),
            "steps_pct_of_wall": float(100 * steps / wall.sum()),
        }
        if entry == "prefill":
            row["ttft_ms"] = row["p50_ms"]  # the first token waits for the prefill
        out.append(row)
    return out
