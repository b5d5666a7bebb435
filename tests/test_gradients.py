"""Whole-model loss and gradients in float64 equal the transformers fixtures (made by
fixtures/make_fixtures.py with a truly float64 model), relative error below 1e-6 per tensor."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import CASES, FIXTURES
from safetensors.numpy import load_file

import einplan
from einplan.formats.weights import load_weights
from einplan.runtime.executor import Executor


def shifted_targets(ids: np.ndarray) -> np.ndarray:
    """Next-token targets as transformers' causal-LM loss takes them: the last is ignored."""
    return np.concatenate([ids[:, 1:], np.full((len(ids), 1), -100)], axis=1)


def run_grad_entry(case: str, dtype: str) -> tuple[dict, dict]:
    """The ``grad`` entry's outputs on the fixture's input ids, and the reference."""
    folder = FIXTURES / case
    plan = einplan.compile_model(folder / "config.json", compute_dtype=dtype, entries=("grad",))
    graph = plan.entry("grad")
    weights = load_weights(graph, folder, tied=plan.config["tie_word_embeddings"])
    ref = load_file(folder / "reference.safetensors")
    ids = ref["input_ids"]
    feed = {
        "tokens": ids,
        "positions": np.broadcast_to(np.arange(ids.shape[1]), ids.shape),
        "targets": shifted_targets(ids),
        "loss_grad": np.array(1.0),
    }
    return Executor(graph, weights).run(feed), ref


@pytest.mark.parametrize("case", CASES)
def test_float64_loss_and_gradients_match_transformers(case):
    out, ref = run_grad_entry(case, "f64")
    assert out["loss"].dtype == np.float64
    assert abs(float(out["loss"]) - float(ref["loss64"])) < 1e-6 * float(ref["loss64"])
    names = {k.removeprefix("grad64.") for k in ref if k.startswith("grad64.")}
    assert {k.removeprefix("grad.") for k in out if k.startswith("grad.")} == names
    for name in names:
        got, want = out[f"grad.{name}"], ref[f"grad64.{name}"]
        rel = np.abs(got - want).max() / np.abs(want).max()
        assert rel < 1e-6, f"{name}: relative error {rel:.2e}"


def test_float32_gradients_stay_float32_and_close():
    out, ref = run_grad_entry("llama_gqa_tied", "f32")
    assert all(v.dtype == np.float32 for v in out.values())
    got, want = out["grad.model.norm.weight"], ref["grad64.model.norm.weight"]
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-4
