"""Shared test helpers: fixture folders, golden files, an isolated path cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from einplan.runtime.backends import available_backends

# compiled kernels are cached once per machine, not per test session (whose EINPLAN_CACHE_DIR
# is a fresh temporary folder): the JIT is paid by the first run only
os.environ.setdefault(
    "NUMBA_CACHE_DIR",
    os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "einplan-test-numba"),
)

BACKENDS = available_backends()  # the kernels backends this machine can run


@pytest.fixture(params=BACKENDS)
def kernels(request) -> str:
    """Each installed kernels backend in turn (numpy always; numba when installed)."""
    return request.param


TESTS = Path(__file__).parent
FIXTURES = TESTS / "fixtures"
GOLDEN = TESTS / "golden"
CASES = [
    "llama_gqa_tied",
    "llama_mha_untied",
    "llama3_rope_scaling",
    "mistral_head_dim",
    "qwen2_bias_mqa",
    "mixtral_moe",
    "qwen2_moe_shared",
]
MOE_CASES = ["mixtral_moe", "qwen2_moe_shared"]

ONE_LAYER = {
    "name": "one-layer",
    "vocab_size": 32,
    "hidden_size": 16,
    "intermediate_size": 24,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "tie_word_embeddings": True,
    "max_batch": 4,
}


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep the contraction-path cache of the tests out of the user's home."""
    monkeypatch.setenv("EINPLAN_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


def check_golden(name: str, text: str) -> None:
    """Compare ``text`` with tests/golden/NAME; UPDATE_GOLDEN=1 rewrites the file."""
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text + "\n")
    assert path.exists(), f"no golden file {path}; run with UPDATE_GOLDEN=1 to create it"
    assert text + "\n" == path.read_text(), f"printed graph differs from {path}"
