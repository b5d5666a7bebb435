"""The cost report: per-node times add up to the measured wall time, warm-up runs are left
out, every node has a phase, the roofline's verdicts, and `einplan report` / `bench machine`
/ `eval --profile` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import ONE_LAYER

from einplan.api import TRAIN_ENTRIES, Session, compile_model
from einplan.cli import main
from einplan.compiler.names import layer_of
from einplan.compiler.ops import LEAVES
from einplan.report.cost import cost_report, roofline
from einplan.report.machine import load_machine
from einplan.report.phases import PHASE_ORDER, phase_of, role_of, stage_of
from einplan.report.plots import plot_bars, plot_roofline, save_figure
from einplan.runtime.recorder import Recorder

MACHINE = {"gemm_gflops": 200.0, "bandwidth_gbs": 40.0}  # ridge at 5 FLOP/byte


@pytest.fixture(scope="module")
def rec():
    session = Session(compile_model("tiny"), random_seed=0)
    rec = Recorder()
    for _ in range(4):
        session.forward(np.arange(256)[None], recorder=rec)
    return rec


def test_node_times_sum_to_the_wall_time(rec):
    report = cost_report(rec, "node", warmup=1)
    measured = [1, 2, 3]
    wall_ms = np.mean([rec.wall_ns(i) for i in measured]) / 1e6
    nodes_ms = sum(r["mean_ms"] for r in report.rows)
    # steps run one after another inside the run: their times cannot exceed its wall time, and
    # the runtime's own work between steps is small (on a loaded host it grows: a bound only)
    assert 0.5 * wall_ms < nodes_ms <= wall_ms
    assert sum(r["share_pct"] for r in report.rows) == pytest.approx(100, abs=5)
    assert len(report.rows) == len(rec.runs[0]["table"])  # one row per node


@pytest.mark.parametrize("by", ["op", "layer", "phase", "stage"])
def test_groupings_partition_the_nodes(rec, by):
    nodes = cost_report(rec, "node")
    groups = cost_report(rec, by)
    assert sum(r["mean_ms"] for r in groups.rows) == pytest.approx(
        sum(r["mean_ms"] for r in nodes.rows)
    )
    assert sum(r["gflop"] for r in groups.rows) == pytest.approx(
        sum(r["gflop"] for r in nodes.rows)
    )


def test_warmup_runs_are_left_out(rec):
    report = cost_report(rec, "phase", warmup=1)
    assert report.runs[0]["runs"] == 3 and report.runs[0]["warmup_excluded"] == 1
    assert all(r["runs"] == 3 for r in report.rows)
    assert cost_report(rec, "phase", warmup=0).runs[0]["runs"] == 4
    # an entry with no more runs than the warm-up keeps them, and says so
    assert cost_report(rec, "phase", warmup=9).runs[0]["warmup_excluded"] == 0


def test_layers_and_phases_come_in_model_order(rec):
    layers = [r["layer"] for r in cost_report(rec, "layer").rows]
    assert layers == ["embed", "rope_table", "layer 0", "layer 1", "layer 2", "layer 3"] + [
        "output_norm",
        "output",
    ]
    phases = [r["phase"] for r in cost_report(rec, "phase").rows]
    assert phases == [p for p in PHASE_ORDER if p in phases] and "Other" not in phases


def test_every_node_of_the_model_has_a_phase():
    plan = compile_model("tiny", entries=TRAIN_ENTRIES)
    assert {"train_step", "prefill", "decode"} <= set(plan.entries)
    for graph in plan.entries.values():
        for n in graph.nodes:
            if n.op not in LEAVES:
                assert not phase_of(n.name, n.tags).endswith("Other"), n.name
    step = {phase_of(n.name, n.tags) for n in plan.entry("train_step").nodes if n.op not in LEAVES}
    assert {"FFN", "Loss", "Backward / FFN", "Backward / Attention: RoPE", "Optimizer"} <= step
    assert phase_of("attn_k-3.rope") == "Attention: RoPE"
    assert phase_of("attn_k-3") == "Attention: QKV projection"
    assert phase_of("ffn_down-3", {"reverse"}) == "Backward / FFN"
    assert phase_of("attn_q-3.w", {"optimizer"}) == "Optimizer"
    assert stage_of({"reverse"}) == "Backward" and stage_of(()) == "Forward"
    assert layer_of("attn_q-12.w") == 12 and layer_of("output") is None
    assert role_of("attn_q-12.heads") == "attn_q.heads"


def test_roofline_verdicts():
    # 1 GFLOP over 1 MB in 10 ms: intensity 1000 >= 5, compute-bound at 100 of 200 GFLOP/s
    hot = roofline(1e9, 1e6, 0.01, MACHINE)
    assert hot["bound"] == "compute" and hot["roof_pct"] == pytest.approx(50)
    # 1 MFLOP over 1 GB in 50 ms: intensity 0.001, memory-bound at 20 of 40 GB/s
    cold = roofline(1e6, 1e9, 0.05, MACHINE)
    assert cold["bound"] == "memory" and cold["gbs"] == pytest.approx(20)
    assert cold["roof_pct"] == pytest.approx(100 * 0.02 / (0.001 * 40))
    assert roofline(1e9, 1e6, 0.01, None)["bound"] == ""  # no roofs measured: no verdict


def test_plots_are_written(rec, tmp_path):
    bars = save_figure(plot_bars(cost_report(rec, "layer")), tmp_path / "bars.png")
    roof = save_figure(plot_roofline(cost_report(rec, "node", machine=MACHINE)), tmp_path / "r.svg")
    assert bars.read_bytes()[:4] == b"\x89PNG" and "<svg" in roof.read_text()


def test_profile_then_report_end_to_end(tmp_path, capsys):
    plan, prof = tmp_path / "t.plan", tmp_path / "prof"
    main(["compile", "tiny", "-o", str(plan)])
    argv = ["eval", str(plan), "--random-weights", "0", "--tokenizer", "bytes"]
    assert main([*argv, "--max-tokens", "300", "--window", "64", "--profile", str(prof)]) == 0
    out = capsys.readouterr().out
    assert "cost by phase" in out and "FFN" in out and (prof / "trace.json").exists()
    assert main(["bench", "machine", "--gemm-n", "128", "--copy-mib", "4", "--reps", "1"]) == 0
    assert load_machine()["gemm_gflops"] > 0
    capsys.readouterr()
    assert main(["report", str(prof), "--by", "op", "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["runs"][0]["runs"] == 3 and doc["runs"][0]["warmup_excluded"] == 1
    assert {r["bound"] for r in doc["rows"]} <= {"compute", "memory", ""}
    assert any(r["op"] == "einsum" and r["bound"] for r in doc["rows"])
    assert main(["report", str(prof), "--by", "layer", "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("layer,kernels,runs,p50_ms,p99_ms") and len(lines) == 1 + 8
    assert (
        main(
            ["report", str(prof / "trace.json"), "--format", "html", "-o", str(tmp_path / "r.html")]
        )
        == 0
    )
    html = (tmp_path / "r.html").read_text()
    assert html.count("<svg") == 2 and "attn_q-0" in html
    assert main(["report", str(prof), "--top", "3"]) == 0
    assert "more rows" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "no trace at" in capsys.readouterr().err


def test_debug_level_two_prints_a_line_per_step(monkeypatch, capsys):
    session = Session(compile_model(ONE_LAYER), random_seed=0)
    session.forward(np.arange(8)[None])
    assert capsys.readouterr().err == ""  # off by default
    monkeypatch.setenv("EINPLAN_DEBUG", "2")
    session.forward(np.arange(8)[None])
    lines = capsys.readouterr().err.splitlines()
    steps = len(session.executor.prepare({"batch": 1, "seq": 8}).steps)
    assert sum("GFLOP/s" in line for line in lines) == steps
    assert any(" attn_o-0 " in line and " ms " in line for line in lines)
    assert lines[-1].startswith("einplan: run 0 forward batch=1 seq=8:")
    monkeypatch.setenv("EINPLAN_DEBUG", "1")
    session.forward(np.arange(8)[None])
    assert len(capsys.readouterr().err.splitlines()) == 1
    monkeypatch.setenv("EINPLAN_DEBUG", "loud")
    with pytest.raises(ValueError, match="EINPLAN_DEBUG must be a level"):
        session.forward(np.arange(8)[None])
