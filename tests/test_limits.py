"""Sizes and resources: memory checked before allocating, absurd configs refused, token ids
beyond the model, overflowing perplexity, bounded chat templates, machine limits."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from conftest import ONE_LAYER

from einplan.api import Session, compile_model
from einplan.apps.chat import render_chat
from einplan.apps.compile import memory_warning
from einplan.apps.evaluate import EvalResult
from einplan.apps.prompts import encode_prompt
from einplan.cli import main
from einplan.errors import EinplanError
from einplan.formats.tokenizer import byte_tokenizer
from einplan.models.config import ConfigError, load_config
from einplan.report import machine
from einplan.runtime.kv_cache import allocate_cache
from einplan.runtime.memory_limit import MemoryLimitError, parse_bytes


@pytest.fixture(scope="module")
def plan():
    return compile_model(ONE_LAYER)


def test_arena_too_big_for_memory_is_refused(plan, monkeypatch):
    session = Session(plan, random_seed=0)
    monkeypatch.setenv("EINPLAN_MEMORY_LIMIT", "64K")
    with pytest.raises(MemoryLimitError, match=r"running forward .* lower batch \(now 4\)"):
        session.forward(np.zeros((4, 64), np.int64))
    monkeypatch.setenv("EINPLAN_MEMORY_LIMIT", "1G")
    assert session.forward(np.zeros((4, 64), np.int64)).shape == (4, 64, 32)


def test_kv_cache_too_big_is_refused(plan, monkeypatch):
    monkeypatch.setenv("EINPLAN_MEMORY_LIMIT", "1K")
    with pytest.raises(MemoryLimitError, match=r"state buffers of prefill .* ctx \(now 64\)"):
        allocate_cache(plan.entry("prefill"), 4, 64)


def test_memory_limit_parses_units():
    assert parse_bytes("2G") == 2 << 30 and parse_bytes("1.5MiB") == 3 << 19
    with pytest.raises(EinplanError, match="not a size"):
        parse_bytes("lots")


def test_compile_warns_when_estimate_exceeds_machine(plan, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("EINPLAN_MEMORY_LIMIT", "1K")
    assert "lower batch or seq" in memory_warning(plan, 4, 64)
    assert main(["compile", "tiny", "-o", str(tmp_path / "t.plan")]) == 0
    assert "einplan: warning:" in capsys.readouterr().err
    monkeypatch.setenv("EINPLAN_MEMORY_LIMIT", "1T")
    assert memory_warning(plan, 4, 64) is None


@pytest.mark.parametrize(
    ("key", "value", "limit"),
    [
        ("num_hidden_layers", 10**6, "100,000"),
        ("hidden_size", 10**9, "1,048,576"),
        ("vocab_size", 10**12, "16,777,216"),
    ],
)
def test_absurd_sizes_are_refused_with_the_limit(key, value, limit):
    with pytest.raises(ConfigError, match=f"{key} .* limit of {limit}"):
        load_config({**ONE_LAYER, key: value})


def test_real_model_sizes_pass():
    cfg = load_config(
        {
            **ONE_LAYER,
            "num_hidden_layers": 126,
            "hidden_size": 16384,
            "vocab_size": 128256,
            "intermediate_size": 53248,
            "num_attention_heads": 128,
            "num_key_value_heads": 8,
            "max_position_embeddings": 131072,
        }
    )
    assert cfg.num_hidden_layers == 126


def test_tokenizer_beyond_vocabulary_is_an_error():
    with pytest.raises(EinplanError, match="beyond the model's vocabulary of 32"):
        encode_prompt("hello", byte_tokenizer(), 32)


def test_huge_loss_gives_inf_perplexity():
    assert EvalResult(1e6, 10).perplexity == math.inf
    assert math.isnan(EvalResult(math.nan, 10).perplexity)
    assert EvalResult(1.0, 10).perplexity == pytest.approx(math.e)


@pytest.mark.parametrize(
    ("template", "match"),
    [
        (
            "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
            "took over",
        ),
        (
            "{% for i in range(99999) %}{% for j in range(99999) %}xx{% endfor %}{% endfor %}",
            "grew past",
        ),
        ("{{ 'x' * 10**9 }}", "items"),
    ],
)
def test_chat_template_is_bounded(template, match):
    with pytest.raises(EinplanError, match=match):
        render_chat({"chat_template": template}, [{"role": "user", "content": "hi"}])


def test_bench_machine_refuses_zero_size(capsys):
    assert main(["bench", "machine", "--gemm-n", "0"]) == 2
    assert "--gemm-n: expected a whole number of at least 1, got 0" in capsys.readouterr().err
    with pytest.raises(EinplanError, match="gemm_n must be at least 1"):
        machine.measure_machine(0, 1, 1)  # the API refuses it too


@pytest.mark.parametrize("peak", [0, -1.0, "nan", None])
def test_cached_machine_with_bad_peak_is_ignored(peak, capsys):
    path = machine.machine_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    value = float(peak) if peak == "nan" else peak
    path.write_text(json.dumps({"gemm_gflops": value, "bandwidth_gbs": 10.0}))
    assert machine.load_machine() is None
    assert "ignoring the file" in capsys.readouterr().err
    path.write_text(json.dumps({"gemm_gflops": 50.0, "bandwidth_gbs": 10.0}))
    assert machine.load_machine()["gemm_gflops"] == 50.0
