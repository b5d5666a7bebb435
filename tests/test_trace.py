"""The Chrome trace: the trace event format's required fields, one track per runtime thread,
one slice per executed step, and a faithful round trip back into a recorder."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import ONE_LAYER

from einplan.api import Session, compile_model
from einplan.errors import EinplanError
from einplan.report.trace import chrome_trace, read_trace, write_trace
from einplan.runtime.recorder import Recorder


@pytest.fixture(scope="module")
def plan():
    return compile_model(ONE_LAYER)


def record(plan, workers: int = 0, runs: int = 2) -> Recorder:
    session = Session(plan, random_seed=0, workers=workers)
    rec = Recorder()
    for _ in range(runs):
        session.forward(np.arange(24)[None] % 32, recorder=rec)
    session.executor.close()
    return rec


def test_events_have_the_required_fields(plan):
    rec = record(plan)
    doc = json.loads(json.dumps(chrome_trace(rec)))  # plain JSON
    events = doc["traceEvents"]
    for e in events:
        assert {"ph", "name", "pid", "tid"} <= set(e), e
        assert e["ph"] in ("X", "M")
        if e["ph"] == "X":
            assert isinstance(e["ts"], int | float) and e["ts"] >= 0
            assert isinstance(e["dur"], int | float) and e["dur"] >= 0
    steps = [e for e in events if e["ph"] == "X" and e["cat"] != "run"]
    assert len(steps) == len(rec.raw)  # one slice per executed step
    assert {e["name"] for e in steps} == {r.name for r in rec.records(0)}
    q = next(e for e in steps if e["name"] == "attn_o-0")
    assert q["args"]["shapes"] == "f32[1,24,16], f32[16,16] -> f32[1,24,16]"
    assert q["args"]["flops"] == 2 * 24 * 16 * 16 and q["cat"] == "einsum"


def test_steps_nest_inside_their_run_slice(plan):
    rec = record(plan)
    events = chrome_trace(rec)["traceEvents"]
    runs = [e for e in events if e.get("cat") == "run"]
    assert [r["args"]["run"] for r in runs] == [0, 1]
    for e in events:
        if e["ph"] == "X" and e["cat"] != "run":
            r = runs[e["args"]["run"]]
            assert r["ts"] <= e["ts"] and e["ts"] + e["dur"] <= r["ts"] + r["dur"] + 1e-3


def test_one_named_track_per_runtime_thread(plan):
    rec = record(plan, workers=2)
    threads = {t for _, _, t, _, _ in rec.raw}
    assert len(threads) > 1  # q/k/v projections ran on the pool
    events = chrome_trace(rec)["traceEvents"]
    names = {e["tid"]: e["args"]["name"] for e in events if e["name"] == "thread_name"}
    assert set(names) == threads and names[0] == "main"
    assert {e["tid"] for e in events if e["ph"] == "X"} == threads


def test_round_trip_restores_the_records(plan, tmp_path):
    rec = record(plan)
    write_trace(rec, tmp_path / "trace.json")
    back = read_trace(tmp_path)  # a directory means its trace.json
    assert len(back.runs) == len(rec.runs)
    for a, b in zip(rec.records(), back.records(), strict=True):
        assert (a.step, a.name, a.op, a.thread, a.flops, a.bytes, a.shapes, a.tags) == (
            b.step,
            b.name,
            b.op,
            b.thread,
            b.flops,
            b.bytes,
            b.shapes,
            b.tags,
        )
        assert a.dur_ns == b.dur_ns
    assert [back.wall_ns(i) for i in range(2)] == [rec.wall_ns(i) for i in range(2)]


def test_foreign_files_are_refused(tmp_path):
    with pytest.raises(EinplanError, match="no trace at"):
        read_trace(tmp_path)
    (tmp_path / "trace.json").write_text('{"traceEvents": []}')
    with pytest.raises(EinplanError, match="not an einplan trace"):
        read_trace(tmp_path / "trace.json")
    (tmp_path / "trace.json").write_text("nope")
    with pytest.raises(EinplanError, match="not JSON"):
        read_trace(tmp_path)
