"""Quantised plans: the graph rewrite, logits near float32, decode equal to forward, no
float32 copy of any weight at run time, quantised checkpoints on disk, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FIXTURES

import einplan
from einplan.cli import main
from einplan.commands.eval import BUNDLED_TEXT
from einplan.compiler.ops import Op
from einplan.compiler.pipeline import PassContext
from einplan.compiler.quant_scheme import QuantError
from einplan.formats.weights import WeightsError, open_checkpoint
from einplan.runtime import qmatmul
from einplan.runtime.generate import GenerationRequest, Generator
from einplan.runtime.qmatmul import QuantizedMatrix

CASE = FIXTURES / "llama_gqa_tied"  # hidden 64, MLP 160: int4 groups of 32
UNTIED = FIXTURES / "llama_mha_untied"
# relative RMS error of the logits against float32 each scheme must stay under
BOUNDS = {"w8a16": 0.02, "w8a8": 0.025, "w4a16": 0.25, "w8a4": 0.25, "w4a4": 0.35}


def _ids(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape)


def _rel(a, b):
    return float(np.sqrt(((a - b) ** 2).mean() / (b**2).mean()))


@pytest.fixture(scope="module")
def reference():
    return einplan.Session(einplan.compile_model(CASE), CASE).forward(_ids((2, 24)))


def test_graph_has_packed_params_and_a_dequantize_per_weight():
    quant = {"scheme": "w4a16", "group_size": 32}
    unpacked = einplan.compile_model(CASE, quant=quant, ctx=PassContext(pack=False)).entry()
    params = {n.name: n for n in unpacked.params()}
    q, s = params["attn_q-0.wq"], params["attn_q-0.ws"]
    assert (q.dtype, q.shape, s.shape) == ("u8", (64, 32), (64, 2))
    assert "attn_q-0.w" not in params and "embed.w" not in params  # the tied head too
    assert sum(n.op is Op.DEQUANTIZE for n in unpacked.nodes) == 2 * 7 + 1
    assert "dequantize[bits=4,group=32] %attn_q-0.wq %attn_q-0.ws" in str(unpacked)
    # packed: q/k/v and gate/up of a layer are one quantised product each
    g = einplan.compile_model(CASE, quant=quant).entry()
    params = {n.name: n for n in g.params()}
    qkv = params["attn_q+attn_k+attn_v-0.wq"]
    assert qkv.shape == (64 + 32 + 32, 32) and [m.rows for m in qkv.attrs["pack"]] == [64, 32, 32]
    assert sum(n.op is Op.DEQUANTIZE for n in g.nodes) == 2 * 4 + 1
    mem = g.meta["memory"]
    float_plan = einplan.compile_model(CASE).entry().meta["memory"]
    assert mem["weights_bytes"] < 0.2 * float_plan["weights_bytes"]


@pytest.mark.parametrize("scheme", list(BOUNDS))
def test_logits_stay_near_float32(reference, scheme, kernels):
    quant = {"scheme": scheme, "group_size": 32}
    plan = einplan.compile_model(CASE, quant=quant)
    logits = einplan.Session(plan, CASE, kernels=kernels).forward(_ids((2, 24)))
    assert _rel(logits, reference) < BOUNDS[scheme]
    assert _rel(logits, reference) > 1e-6  # the weights really were rounded


@pytest.mark.parametrize(
    "scheme, symmetric, bound",
    [("w8a16", False, 0.02), ("w4a16", False, 0.25), ("w4a16", True, 0.25)],
)
def test_untied_head_and_asymmetric_weights(scheme, symmetric, bound, kernels):
    quant = {"scheme": scheme, "group_size": 32, "symmetric": symmetric}
    ref = einplan.Session(einplan.compile_model(UNTIED), UNTIED).forward(_ids((1, 12)))
    plan = einplan.compile_model(UNTIED, quant=quant)
    got = einplan.Session(plan, UNTIED, kernels=kernels).forward(_ids((1, 12)))
    assert 1e-6 < _rel(got, ref) < bound
    numpy = einplan.Session(plan, UNTIED, kernels="numpy").forward(_ids((1, 12)))
    assert _rel(got, numpy) < 1e-5  # any backend: the numpy kernels' numbers to f32 rounding


def test_no_float_copy_of_a_weight_is_made(monkeypatch):
    """Blocks of 3 rows; the whole-matrix dequantize is never called in forward or decode."""
    monkeypatch.setattr(qmatmul, "BLOCK_ELEMENTS", 3 * 64)

    def forbidden(self):
        raise AssertionError("a run materialised a float32 weight")

    monkeypatch.setattr(QuantizedMatrix, "dequantize", forbidden)
    plan = einplan.compile_model(CASE, quant={"scheme": "w4a16", "group_size": 32})
    session = einplan.Session(plan, CASE)
    logits = session.forward(_ids((1, 12)))
    gen = Generator(plan, session.weights)
    out = gen.generate(GenerationRequest([_ids(12).tolist()], 4))
    assert np.isfinite(logits).all() and len(out.tokens[0]) == 4
    matrices = [a for k, a in session.weights.items() if k.endswith(".weight") and a.ndim == 2]
    assert len(matrices) == 9 and all(a.dtype == np.uint8 for a in matrices)  # 4 packed per layer


@pytest.mark.parametrize("scheme", ["w4a16", "w8a16"])
def test_decode_matches_forward_with_quantised_weights(scheme, kernels):
    plan = einplan.compile_model(CASE, quant={"scheme": scheme, "group_size": 32})
    session = einplan.Session(plan, CASE, kernels=kernels)
    prompt = _ids(10).tolist()
    gen = Generator(plan, session.weights, kernels=kernels)
    gen = gen.generate(GenerationRequest([prompt], 6))
    ids = list(prompt)
    for _ in range(6):  # greedy by full forward passes
        ids.append(int(session.forward(np.array([ids]))[0, -1].argmax()))
    assert gen.tokens[0] == ids[len(prompt) :]


def test_quantised_checkpoint_gives_the_same_logits(tmp_path, capsys):
    out = tmp_path / "q4"
    argv = ["quantize", str(CASE), "--scheme", "w4a16", "--group-size", "32", "-o", str(out)]
    assert main([*argv, "--calibrate", str(BUNDLED_TEXT), "--tokenizer", "bytes"]) == 0
    assert "activation ranges from 8 windows" in capsys.readouterr().out
    tensors = open_checkpoint(out)
    assert tensors["model.layers.0.mlp.up_proj.weight"][1] == "u8"
    assert tensors["model.layers.0.mlp.up_proj.input_absmax"][0].shape == (1,)
    size = (out / "model.safetensors").stat().st_size
    assert size < 0.2 * (CASE / "model.safetensors").stat().st_size
    plan = einplan.compile_model(CASE, quant={"scheme": "w4a16", "group_size": 32})
    on_load = einplan.Session(plan, CASE).forward(_ids((1, 16)))
    stored = einplan.Session(plan, out)
    assert stored.weights["model.layers.0.mlp.down_proj.weight"].dtype == np.uint8
    got = stored.forward(_ids((1, 16)))
    if stored.kernels.name == "numpy":
        np.testing.assert_array_equal(got, on_load)
    else:  # compiled kernels specialise on read-only (stored) arrays: same to f32 rounding
        np.testing.assert_allclose(got, on_load, rtol=1e-5, atol=1e-6)
    static = einplan.compile_model(
        CASE, quant={"scheme": "w4a4", "group_size": 32, "activations": "static"}
    )
    assert np.isfinite(einplan.Session(static, out).forward(_ids((1, 16)))).all()


def test_weights_of_another_scheme_are_refused(tmp_path):
    out = tmp_path / "q8"
    assert main(["quantize", str(CASE), "--scheme", "w8a16", "-o", str(out)]) == 0
    plan = einplan.compile_model(CASE, quant={"scheme": "w4a16", "group_size": 32})
    with pytest.raises(WeightsError, match="quantised with another scheme.*int4 g32 symmetric"):
        einplan.Session(plan, out)
    with pytest.raises(WeightsError, match="plan: float weights"):
        einplan.Session(einplan.compile_model(CASE), out)
    static = einplan.compile_model(CASE, quant={"scheme": "w8a8", "activations": "static"})
    with pytest.raises(WeightsError, match="einplan quantize --calibrate"):
        einplan.Session(static, out)


@pytest.mark.parametrize(
    "quant, message",
    [
        ("w3a16", "unknown quantisation scheme 'w3a16'"),
        ({"scheme": "w4a16", "group_size": 48}, "group size 48 is not one of 32, 64, 128"),
        ({"scheme": "w4a16", "group_size": 64}, "group size 64 does not divide its input"),
        ({"scheme": "w8a16", "activations": "static"}, "quantises no activations"),
        ({"scheme": "w8a16", "bits": 3}, "unknown key"),
    ],
)
def test_bad_schemes_are_refused(quant, message):
    with pytest.raises(QuantError, match=message):
        einplan.compile_model(CASE, quant=quant)


def test_cli_compile_quant_options(tmp_path, capsys):
    plan = tmp_path / "q.plan"
    argv = ["compile", str(CASE / "config.json"), "-o", str(plan)]
    assert main([*argv, "--quant", "w4a16", "--group-size", "32", "--asymmetric"]) == 0
    assert "w4a16 (groups of 32, asymmetric)" in capsys.readouterr().out
    quant = einplan.load_plan(plan).meta["quant"]
    assert quant == {
        "scheme": "w4a16",
        "group_size": 32,
        "symmetric": False,
        "activations": "dynamic",
    }
    assert main([*argv, "--group-size", "32"]) == 2
    assert "--group-size only apply with --quant" in capsys.readouterr().err
    assert main([*argv, "--quant", "int3"]) == 2
    assert "unknown quantisation scheme 'int3'" in capsys.readouterr().err


def test_cli_runs_a_quantised_plan_on_quantised_weights(tmp_path, capsys):
    plan, q4 = tmp_path / "q4.plan", tmp_path / "q4"
    argv = ["--quant", "w4a16", "--group-size", "32", "-o", str(plan)]
    assert main(["compile", str(CASE / "config.json"), *argv]) == 0
    assert (
        main(["quantize", str(CASE), "--scheme", "w4a16", "--group-size", "32", "-o", str(q4)]) == 0
    )
    capsys.readouterr()
    argv = ["run", str(plan), "--weights", str(q4), "--tokenizer", "bytes", "--prompt", "ab"]
    assert main([*argv, "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("ab") and len(out.out.strip()) == 5 and "generation" in out.err
