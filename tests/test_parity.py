"""Logits equal Hugging Face transformers' on every fixture (made by fixtures/make_fixtures.py)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import CASES, FIXTURES
from safetensors.numpy import load_file

import einplan


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case):
    folder = FIXTURES / case
    ref = load_file(folder / "reference.safetensors")
    session = einplan.Session(einplan.compile_model(folder / "config.json"), folder)
    logits = session.forward(ref["input_ids"])
    assert logits.dtype == np.float32 and logits.shape == ref["logits"].shape
    assert np.abs(logits - ref["logits"]).max() < 1e-4


@pytest.mark.parametrize("case", ["llama_gqa_tied", "qwen2_bias_mqa"])
def test_rope_positions_matter(case):
    """Guards the parity test against a model insensitive to positions."""
    folder = FIXTURES / case
    ref = load_file(folder / "reference.safetensors")
    session = einplan.Session(einplan.compile_model(folder / "config.json"), folder)
    ids = ref["input_ids"]
    zero = session.forward(ids, positions=np.zeros_like(ids))
    assert np.abs(zero - ref["logits"]).max() > 1e-3


def test_smollm2_parameter_count():
    plan = einplan.compile_model("configs/smollm2-135m.json")
    assert plan.meta["parameters"] == 134_515_008
