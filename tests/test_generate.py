"""Generation: greedy continuations equal transformers', KV-cache decode equals a full
forward, batched equals unbatched, sampling is seeded, streaming text is whole UTF-8."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import CASES, FIXTURES
from safetensors.numpy import load_file

import einplan
from einplan.errors import EinplanError
from einplan.formats.tokenizer import byte_tokenizer
from einplan.runtime.executor import Executor
from einplan.runtime.generate import GenerationRequest, Generator, TextStream, attention_mask
from einplan.runtime.kv_cache import allocate_cache
from einplan.runtime.sampling import SamplingConfig, filter_top_k_top_p, penalize_repeats

GREEDY = SamplingConfig()


def _load(case):
    folder = FIXTURES / case
    plan = einplan.compile_model(folder / "config.json")
    session = einplan.Session(plan, folder)
    return plan, session, load_file(folder / "reference.safetensors")


@pytest.mark.parametrize("case", CASES)
def test_greedy_continuation_matches_transformers(case, kernels):
    plan, session, ref = _load(case)
    prompt = ref["prompt_ids"][0].tolist()
    gen = Generator(plan, session.weights, kernels=kernels)
    out = gen.generate(GenerationRequest([prompt], 16, GREEDY))
    assert out.tokens[0] == ref["greedy_ids"][0, len(prompt) :].tolist()


@pytest.mark.parametrize("case", ["llama3_rope_scaling", "qwen2_bias_mqa", "qwen2_moe_shared"])
def test_cached_decode_logits_equal_full_forward(case):
    plan, session, ref = _load(case)
    ids = ref["input_ids"]
    batch, total = ids.shape
    full = session.forward(ids)
    cache = allocate_cache(plan.entry("prefill"), batch, total)
    arrays = {**session.weights, **cache}
    prefill = Executor(plan.entry("prefill"), arrays)
    decode = Executor(plan.entry("decode"), arrays)
    pads = np.zeros(batch, np.int64)
    first = 7
    out = prefill.run(
        {
            "tokens": ids[:, :first],
            "positions": np.tile(np.arange(first), (batch, 1)),
            "mask": attention_mask(pads, 0, first, first),
            "write_pos": np.array([0]),
        }
    )
    assert np.abs(out["logits"] - full[:, first - 1]).max() < 1e-4
    for t in range(first, total):
        out = decode.run(
            {
                "tokens": ids[:, t : t + 1],
                "positions": np.full((batch, 1), t),
                "mask": attention_mask(pads, t, 1, total),
                "write_pos": np.array([t]),
            }
        )
        assert np.abs(out["logits"] - full[:, t]).max() < 1e-4


@pytest.mark.parametrize("case", ["llama_mha_untied", "mistral_head_dim", "mixtral_moe"])
def test_batched_padded_generation_equals_each_prompt_alone(case):
    plan, session, ref = _load(case)
    gen = Generator(plan, session.weights)
    prompts = [
        ref["input_ids"][0, :11].tolist(),
        ref["prompt_ids"][0].tolist(),
        ref["input_ids"][1, :3].tolist(),
    ]
    together = gen.generate(GenerationRequest(prompts, 12, GREEDY))
    for row, prompt in enumerate(prompts):
        alone = gen.generate(GenerationRequest([prompt], 12, GREEDY))
        assert together.tokens[row] == alone.tokens[0]


def test_rows_stop_on_their_own_at_eos():
    plan, session, ref = _load("llama_mha_untied")
    prompt = ref["prompt_ids"][0].tolist()
    greedy = ref["greedy_ids"][0, len(prompt) :].tolist()
    eos = greedy[5]
    out = Generator(plan, session.weights).generate(
        GenerationRequest([prompt, ref["input_ids"][1, :4].tolist()], 16, GREEDY, eos_ids=[eos])
    )
    assert out.tokens[0] == greedy[: greedy.index(eos)] and out.stop_reasons[0] == "eos"
    assert eos not in out.tokens[1] or out.stop_reasons[1] == "eos"


def test_stop_strings_and_streaming_text():
    plan = einplan.compile_model("tiny")
    session = einplan.Session(plan, random_seed=0)
    tok = byte_tokenizer()
    pieces = []
    out = Generator(plan, session.weights).generate(
        GenerationRequest([tok.encode("JULIET:").ids], 40, SamplingConfig(temperature=1.0, seed=3)),
        decode_text=tok.decode,
        on_text=lambda row, p: pieces.append(p),
    )
    streamed = "".join(pieces)  # all of the text, but a trailing incomplete character
    assert streamed and out.texts[0].startswith(streamed)
    assert len(out.texts[0]) - len(streamed) <= 1
    stop = out.texts[0][5:8]
    again = Generator(plan, session.weights).generate(
        GenerationRequest(
            [tok.encode("JULIET:").ids],
            40,
            SamplingConfig(temperature=1.0, seed=3),
            stop_strings=[stop],
        ),
        decode_text=tok.decode,
    )
    assert again.stop_reasons[0] == "stop" and stop not in again.texts[0]


def test_text_stream_never_splits_a_character():
    tok = byte_tokenizer()
    ids = tok.encode("héllo → ok").ids
    stream = TextStream(tok.decode)
    pieces = [stream.push(ids[: i + 1]) for i in range(len(ids))]
    assert "".join(pieces) == "héllo → ok"
    assert all("\ufffd" not in p for p in pieces)


def test_seeded_sampling_repeats_and_seeds_differ():
    plan = einplan.compile_model("tiny")
    session = einplan.Session(plan, random_seed=0)
    gen = Generator(plan, session.weights)
    cfg = SamplingConfig(temperature=1.0, top_k=50, top_p=0.95, seed=7)
    a = gen.generate(GenerationRequest([[1, 2, 3]], 20, cfg)).tokens
    assert a == gen.generate(GenerationRequest([[1, 2, 3]], 20, cfg)).tokens
    other = SamplingConfig(temperature=1.0, top_k=50, top_p=0.95, seed=8)
    assert a != gen.generate(GenerationRequest([[1, 2, 3]], 20, other)).tokens


def test_top_k_and_top_p_filters():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
    kept = np.isfinite(filter_top_k_top_p(logits, 2, 1.0))
    assert kept.tolist() == [[True, True, False, False]]
    kept = np.isfinite(filter_top_k_top_p(logits, 0, 0.7))
    assert kept.tolist() == [[True, True, False, False]]
    kept = np.isfinite(filter_top_k_top_p(logits, 0, 0.5))
    assert kept.tolist() == [[True, False, False, False]]


def test_repetition_penalty_follows_transformers_rule():
    logits = np.array([[2.0, -2.0, 1.0]], np.float32)
    out = penalize_repeats(logits, [[0, 1]], 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]


def test_bad_generation_requests():
    plan = einplan.compile_model("tiny")
    gen = Generator(plan, einplan.Session(plan, random_seed=0).weights)
    with pytest.raises(EinplanError, match="empty prompt"):
        gen.generate(GenerationRequest([[]], 4, GREEDY))
    with pytest.raises(EinplanError, match="prompt of 600 tokens"):
        gen.generate(GenerationRequest([[1] * 600], 4, GREEDY))
    with pytest.raises(EinplanError, match="top-p"):
        SamplingConfig(top_p=0.0)


def test_chunked_prefill_equals_one_chunk(monkeypatch):
    plan, session, ref = _load("llama3_rope_scaling")
    prompt = ref["input_ids"][0, :50].tolist()
    gen = Generator(plan, session.weights)
    whole = gen.generate(GenerationRequest([prompt], 8, GREEDY))
    monkeypatch.setattr("einplan.runtime.generate.PREFILL_CHUNK", 16)
    chunked = gen.generate(GenerationRequest([prompt], 8, GREEDY))
    assert chunked.tokens == whole.tokens


def test_full_context_is_a_stop_reason():
    plan, session, ref = _load("llama_mha_untied")
    request = GenerationRequest([[1, 2, 3]], 10, GREEDY, ctx=6)
    out = Generator(plan, session.weights).generate(request)
    assert len(out.tokens[0]) == 3 and out.stop_reasons == ["context"]
