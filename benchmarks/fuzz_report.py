"""Fuzz report of einplan's input files (issue #12): N seeded mutations per input class (plan
files, safetensors, GGUF, training checkpoints, configs), each run in-process through
``einplan.cli.main`` with a time limit, counted by outcome.

    python benchmarks/fuzz_report.py                    # 50 per class, at most 240 s
    python benchmarks/fuzz_report.py --per-class 20 --budget-seconds 60 --class plan
    python benchmarks/fuzz_report.py --show traceback   # list the failing cases

Outcomes: ok (with the right result where an oracle exists), clear_error (exit 2,
``einplan: error: ...``), and the failures traceback, hang, silent_wrong (accepted with a
wrong or NaN result) and data_loss (a failing command changed its input). The mutators and
the classification live in tests/fuzz_inputs.py (shared with tests/test_fuzz.py). Prints the
class x outcome table and the distinct failure kinds, writes JSON (every case).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from common import ROOT, write_results  # noqa: E402
from fuzz_inputs import BAD, CLASSES, OUTCOMES, as_dicts, fuzz, table  # noqa: E402


def failure_kinds(results) -> dict[str, list]:
    """Failing cases grouped by (class, outcome, exception type, innermost einplan frame)."""
    kinds: dict[str, list] = {}
    for r in results:
        if r.outcome not in BAD:
            continue
        exc = r.message.split(":", 1)[0] if r.outcome == "traceback" else ""
        key = f"{r.cls} | {r.outcome} | {exc} {r.where}".strip()
        if r.outcome == "silent_wrong":
            key = f"{r.cls} | silent_wrong | {r.mutation}"
        if r.outcome == "data_loss":
            key = f"{r.cls} | data_loss | {r.mutation}"
        kinds.setdefault(key, []).append(r)
    return kinds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=50, help="cases per input class")
    ap.add_argument("--budget-seconds", type=float, default=240, help="stop after this long")
    ap.add_argument("--timeout", type=float, default=10, help="seconds per case before 'hang'")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--class", dest="classes", action="append", choices=CLASSES)
    ap.add_argument("--show", action="append", choices=OUTCOMES, help="list these cases")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "fuzz.json"))
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 150))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="einplan-fuzz-") as tmp:
        results = fuzz(
            Path(tmp),
            args.per_class,
            tuple(args.classes or CLASSES),
            budget=args.budget_seconds,
            timeout=args.timeout,
            first_seed=args.first_seed,
        )
    seconds = time.perf_counter() - t0

    counts = table(results)
    t = Table(title=f"fuzz outcomes by input class ({len(results)} cases, {seconds:.0f} s)")
    t.add_column("class")
    for o in OUTCOMES:
        t.add_column(o, justify="right", style="red" if o in BAD else None)
    t.add_column("failing", justify="right")
    for cls, row in counts.items():
        bad = sum(row[o] for o in BAD)
        t.add_row(cls, *(str(row[o]) for o in OUTCOMES), f"{bad}/{sum(row.values())}")
    console.print(t)

    kinds = failure_kinds(results)
    k = Table(title=f"distinct failure kinds ({len(kinds)})")
    k.add_column("class | outcome | where")
    k.add_column("cases", justify="right")
    k.add_column("example")
    for key, rs in sorted(kinds.items()):
        r = rs[0]
        k.add_row(key, str(len(rs)), f"{r.mutation} ({r.detail}): {r.message}\neinplan {r.argv}")
    console.print(k)
    for r in results:
        if r.outcome in (args.show or ()):
            console.print(r.describe(), markup=False, highlight=False)

    summary = [
        {"kind": key, "cases": len(rs), "example": as_dicts(rs[:1])[0]}
        for key, rs in sorted(kinds.items())
    ]
    write_results(
        args.json,
        [
            {"table": counts, "seconds": round(seconds, 1), "failure_kinds": summary},
            *as_dicts(results),
        ],
    )


if __name__ == "__main__":
    main()
