"""quant-report: bytes and output error per projection, perplexity per scheme."""

from __future__ import annotations

import json

from conftest import FIXTURES

from einplan.cli import main
from einplan.commands.eval import BUNDLED_TEXT

CASE = FIXTURES / "llama_gqa_tied"


def test_quant_report_on_a_fixture(tmp_path, capsys):
    plan, out = tmp_path / "q.plan", tmp_path / "r.json"
    argv = ["compile", str(CASE / "config.json"), "--quant", "w4a16", "--group-size", "32"]
    assert main([*argv, "-o", str(plan)]) == 0
    argv = ["quant-report", str(plan), "--weights", str(CASE), "--data", str(BUNDLED_TEXT)]
    argv += ["--tokenizer", "bytes", "--window", "64", "--calib-batches", "2"]
    argv += ["--eval-tokens", "256", "--compare", "fp32,w8a16,w4a16,w4a4", "--json", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "by role" in text and "whole model" in text
    doc = json.loads(out.read_text())
    rows = {r["name"]: r for r in doc["projections"]}
    assert len(rows) == 2 * 7 + 1 and doc["calibration_tokens"] == 128
    q = rows["attn_q-0"]
    assert q["params"] == 64 * 64 and q["float_bytes"] == 4 * 64 * 64
    assert q["quant_bytes"] == 64 * 32 + 64 * 2 * 4  # nibbles + one f32 scale per 32
    assert abs(q["saving"] - (1 - 5 / 32)) < 1e-9
    assert all(0.02 < r["rel_rms"] < 0.3 for r in rows.values())
    models = {m["scheme"]: m for m in doc["models"]}
    assert list(models) == ["fp32", "w8a16", "w4a16 g32", "w4a4 g32"]
    assert all(m["tokens"] == 256 for m in models.values())
    fp32 = models["fp32"]
    assert abs(models["w8a16"]["loss"] - fp32["loss"]) < 0.01
    assert models["w4a16 g32"]["weight_bytes"] < 0.2 * fp32["weight_bytes"]


def test_quant_report_needs_a_quantised_plan(tmp_path, capsys):
    plan = tmp_path / "f.plan"
    assert main(["compile", str(CASE / "config.json"), "-o", str(plan)]) == 0
    argv = ["quant-report", str(plan), "--weights", str(CASE), "--data", str(BUNDLED_TEXT)]
    assert main(argv) == 2
    assert "is not quantised; compile it with --quant" in capsys.readouterr().err
