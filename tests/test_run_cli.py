"""``einplan run``: prompts, prompt files in batches, chat with the model's template, errors."""

from __future__ import annotations

import io
import json
import shutil

import pytest
from conftest import FIXTURES

from einplan.apps.chat import render_chat
from einplan.cli import main
from einplan.formats.tokenizer import byte_tokenizer

CASE = FIXTURES / "llama_mha_untied"
TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture
def model(tmp_path):
    """The fixture checkpoint with a byte tokenizer and a chat template beside it."""
    folder = tmp_path / "model"
    shutil.copytree(CASE, folder)
    byte_tokenizer().save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    plan = tmp_path / "m.plan"
    assert main(["compile", str(folder / "config.json"), "-o", str(plan)]) == 0
    return folder, plan


def _run(plan, weights, *args: str) -> int:
    """``einplan run PLAN --weights WEIGHTS ARGS...``: its exit code."""
    return main(["run", str(plan), "--weights", str(weights), *args])


def test_prompt_streams_text_and_prints_phases(model, capsys):
    folder, plan = model
    capsys.readouterr()
    assert (
        _run(
            plan,
            folder,
            "--prompt",
            "ROMEO:",
            "--max-new-tokens",
            "6",
            "--temperature",
            "0.8",
            "--seed",
            "1",
        )
        == 0
    )
    out = capsys.readouterr()
    assert out.out.startswith("ROMEO:") and "decode per token p50 / p99" in out.err


def test_prompts_file_in_batches(model, tmp_path, capsys):
    folder, plan = model
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a\nlonger prompt\n\nthird\n")
    capsys.readouterr()
    assert (
        _run(
            plan,
            folder,
            "--prompts-file",
            str(prompts),
            "--batch-size",
            "2",
            "--max-new-tokens",
            "4",
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.count("[stopped: ") == 3 and "longer prompt" in out


def test_chat_applies_the_template(model, capsys, monkeypatch):
    folder, plan = model
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\nagain\n"))
    capsys.readouterr()
    assert _run(plan, folder, "--chat", "--max-new-tokens", "3") == 0
    assert render_chat({"chat_template": TEMPLATE}, [{"role": "user", "content": "hi"}]) == (
        "<user>hi\n<assistant>"
    )


def test_errors(model, tmp_path, capsys):
    folder, plan = model
    assert _run(plan, folder, "--prompt", "") == 2
    assert "empty prompt" in capsys.readouterr().err
    long = "x" * 200
    assert _run(plan, folder, "--prompt", long, "--max-new-tokens", "4", "--ctx", "100") == 2
    assert "prompt of 200 tokens" in capsys.readouterr().err
    bare = tmp_path / "bare"
    shutil.copytree(CASE, bare)
    assert _run(plan, bare, "--prompt", "hi") == 2
    assert "tokenizer.json" in capsys.readouterr().err
    (folder / "tokenizer_config.json").write_text("{}")
    monkey_in = io.StringIO("hi\n")
    import sys

    old, sys.stdin = sys.stdin, monkey_in
    try:
        assert _run(plan, folder, "--chat") == 2
    finally:
        sys.stdin = old
    assert "no chat template" in capsys.readouterr().err


def test_profile_writes_a_trace_of_prefill_and_decode(model, tmp_path, capsys):
    folder, plan = model
    prof = tmp_path / "prof"
    assert (
        _run(plan, folder, "--prompt", "ROMEO:", "--max-new-tokens", "5", "--profile", str(prof))
        == 0
    )
    out = capsys.readouterr().out
    assert "cost by phase" in out and (prof / "trace.json").exists()
    assert main(["report", str(prof), "--by", "phase", "--format", "json"]) == 0
    runs = {r["entry"]: r for r in json.loads(capsys.readouterr().out)["runs"]}
    assert set(runs) == {"prefill", "decode"}
    assert runs["decode"]["runs"] == 3 and runs["decode"]["warmup_excluded"] == 1  # 4 decodes
    assert runs["prefill"]["ttft_ms"] == runs["prefill"]["p50_ms"]


def test_run_profile_reports_the_kv_cache(model, tmp_path, capsys):
    from einplan.report.memory import memory_rows
    from einplan.report.trace import read_trace

    folder, plan = model
    prof = tmp_path / "prof"
    assert (
        _run(plan, folder, "--prompt", "ab", "--max-new-tokens", "4", "--profile", str(prof)) == 0
    )
    assert "memory by kind" in capsys.readouterr().out
    kinds = {(e, k) for e, k, _, _ in memory_rows(read_trace(prof))}
    assert {("prefill", "kv_cache"), ("decode", "kv_cache"), ("decode", "weights")} <= kinds
