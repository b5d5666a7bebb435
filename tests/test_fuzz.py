"""Issue #12: seeded mutations of plan files, safetensors files, GGUF files, training
checkpoints and configs (tests/fuzz_inputs.py) must each end in a clear ``einplan: error:``
(exit 2) or a correct result: never a traceback, a hang, a silently wrong result or a
changed input. Bounded to about a minute on 2 cores; benchmarks/fuzz_report.py runs more
cases and prints the table."""

from __future__ import annotations

import pytest
from fuzz_inputs import BAD, CLASSES, MUTATORS, fuzz, table

PER_CLASS = 3 * max(len(m) for m in MUTATORS.values()) + 8  # every mutator 3 times (~30 s)
BUDGET_S = 50
TIMEOUT_S = 5


@pytest.mark.fuzz
def test_mutated_inputs_fail_clearly_or_work(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    results = fuzz(tmp_path, PER_CLASS, CLASSES, budget=BUDGET_S, timeout=TIMEOUT_S)
    bad = [r for r in results if r.outcome in BAD]
    counts = table(results)
    summary = "\n".join(f"  {cls}: {row}" for cls, row in counts.items())
    assert not bad, (
        f"{len(bad)} of {len(results)} fuzz cases failed (outcomes by class:\n{summary}\n):\n"
        + "\n".join(r.describe() for r in bad)
    )
