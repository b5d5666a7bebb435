"""The public API: Session.generate (ids or text, stop reasons, streaming, EOS), loss and
gradients against transformers' float64 reference, and einplan.train's history and checkpoint."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import FIXTURES
from safetensors.numpy import load_file

import einplan
from einplan.errors import EinplanError
from einplan.formats.tokenizer import byte_tokenizer

CASE = FIXTURES / "llama_gqa_tied"  # vocab 256: byte ids are its token ids; eos 2
CORPUS = FIXTURES.parent.parent / "einplan" / "data" / "shakespeare_sample.txt"


@pytest.fixture(scope="module")
def plan():
    return einplan.compile_model(CASE / "config.json")


@pytest.fixture(scope="module")
def session(plan):
    return einplan.Session(plan, CASE, tokenizer="bytes")


def _with_eos(tmp_path, eos: int):
    """The fixture weights in a folder whose generation_config.json names ``eos``."""
    folder = tmp_path / "model"
    shutil.copytree(CASE, folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    return folder


def test_parameters_are_the_compile_summary_count(plan):
    assert plan.parameters == plan.meta["parameters"] == einplan.api.parameter_count(plan.entry())


def test_greedy_equals_argmax_of_forward_step_by_step(session):
    prompt = [72, 101, 108, 108, 111]
    out = session.generate(prompt, max_new_tokens=8, ignore_eos=True)
    ids = list(prompt)
    for _ in range(8):
        ids.append(int(session.forward(np.array([ids]))[0, -1].argmax()))
    assert out.tokens == [ids[len(prompt) :]] and out.stop_reasons == ["length"]


def test_text_prompts_equal_their_token_ids(session):
    texts = ["JULIET:", "ROMEO: my"]
    ids = [list(t.encode()) for t in texts]
    kw = {"max_new_tokens": 6, "temperature": 0.9, "top_k": 50, "seed": 7}
    by_text, by_ids = session.generate(texts, **kw), session.generate(ids, **kw)
    assert by_text.tokens == by_ids.tokens and by_text.texts == by_ids.texts
    greedy = session.generate(ids, 6).tokens
    assert session.generate(texts[1], 6).tokens == [greedy[1]]  # one text: a batch of one
    assert by_ids.texts[0] == byte_tokenizer().decode(by_ids.tokens[0])


def test_stream_pieces_make_up_the_texts(session):
    pieces: dict[int, list[str]] = {0: [], 1: []}
    out = session.generate(
        ["a", "bc"],
        max_new_tokens=24,
        temperature=1.0,
        seed=3,
        ignore_eos=True,
        stream=lambda row, piece: pieces[row].append(piece),
    )
    for row, text in enumerate(out.texts):
        # all the text but a trailing incomplete UTF-8 character, which never streams
        assert pieces[row] and "".join(pieces[row]) == text.rstrip("\ufffd")


def test_stop_string_ends_a_row_and_is_cut_from_its_text(session):
    kw = {"max_new_tokens": 20, "temperature": 1.0, "seed": 5, "ignore_eos": True}
    free = session.generate("JULIET:", **kw)
    stop = free.texts[0][4:6]
    cut = session.generate("JULIET:", stop=[stop], **kw)
    assert cut.stop_reasons == ["stop"] and stop not in cut.texts[0]
    assert free.texts[0].startswith(cut.texts[0]) and len(cut.tokens[0]) < 20


def test_eos_from_generation_config_and_ignore_eos(tmp_path, plan):
    greedy = einplan.Session(plan, CASE).generate([1, 2, 3], 12, ignore_eos=True).tokens[0]
    eos = greedy[4]
    s = einplan.Session(plan, _with_eos(tmp_path, eos))
    assert eos in s.eos_ids and 2 in s.eos_ids  # generation_config.json's and the config's
    out = s.generate([[1, 2, 3], [1, 2, 3]], 12)
    assert out.tokens == [greedy[: greedy.index(eos)]] * 2 and out.stop_reasons == ["eos"] * 2
    assert s.generate([1, 2, 3], 12, ignore_eos=True).tokens == [greedy]


def test_full_cache_stops_with_reason_context(session):
    out = session.generate([1, 2, 3], 10, ctx=6, ignore_eos=True)
    assert len(out.tokens[0]) == 3 and out.stop_reasons == ["context"]


def test_tokenizer_comes_with_the_weights_or_is_none(tmp_path, plan):
    assert einplan.Session(plan, CASE).tokenizer is None
    folder = _with_eos(tmp_path, 2)
    byte_tokenizer().save(str(folder / "tokenizer.json"))
    assert einplan.Session(plan, folder).generate("ab", 2).texts[0] != ""


def test_text_without_a_tokenizer_is_refused(plan):
    s = einplan.Session(plan, random_seed=0)
    assert s.tokenizer is None and s.generate([5, 6], 2).texts == [""]
    with pytest.raises(EinplanError, match="text prompts need a tokenizer.*tokenizer="):
        s.generate("hello", 4)
    with pytest.raises(EinplanError, match="stop strings and stream work on text"):
        s.generate([5, 6], 4, stop=["x"])
    with pytest.raises(EinplanError, match="token ids must lie in 0..255"):
        s.generate([5, 300], 4)


def test_loss_and_gradients_equal_transformers_float64():
    p64 = einplan.compile_model(
        CASE / "config.json", compute_dtype="f64", entries=("forward", "grad")
    )
    ref = load_file(CASE / "reference.safetensors")
    loss, grads = einplan.Session(p64, CASE).loss_and_grads(ref["input_ids"])
    assert loss.dtype == np.float64 and abs(loss - ref["loss64"]) < 1e-6 * ref["loss64"]
    names = {k.removeprefix("grad64.") for k in ref if k.startswith("grad64.")}
    assert set(grads) == names and "model.layers.0.self_attn.q_proj.weight" in names
    for name in names:
        want = ref[f"grad64.{name}"]
        assert grads[name].dtype == np.float64 and grads[name].shape == want.shape
        assert np.abs(grads[name] - want).max() / np.abs(want).max() < 1e-6, name


def test_ignored_targets_add_nothing_to_the_loss():
    p64 = einplan.compile_model(
        CASE / "config.json", compute_dtype="f64", entries=("forward", "grad")
    )
    s = einplan.Session(p64, CASE)
    ids = np.random.default_rng(0).integers(0, 256, (2, 9))
    targets = np.random.default_rng(1).integers(0, 256, (2, 9))
    targets[0, 3] = targets[1, :5] = -100
    logits = s.forward(ids).astype(np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    kept = targets != -100
    want = -np.take_along_axis(logp, np.where(kept, targets, 0)[..., None], -1)[..., 0][kept]
    loss, _ = s.loss_and_grads(ids, targets)
    assert loss == pytest.approx(want.mean(), rel=1e-9)
    shifted = np.concatenate([ids[:, 1:], np.full((2, 1), -100)], axis=1)
    assert s.loss_and_grads(ids)[0] == s.loss_and_grads(ids, shifted)[0]


def test_float32_plan_gives_float32_gradients():
    p32 = einplan.compile_model("tiny", entries=("forward", "grad"))
    loss, grads = einplan.Session(p32, random_seed=0).loss_and_grads([[1, 2, 3, 4]])
    assert loss.dtype == np.float32 and np.isfinite(loss)
    assert all(g.dtype == np.float32 for g in grads.values())


def test_missing_entries_say_how_to_compile_them(plan):
    with pytest.raises(
        EinplanError, match=r'compile_model\(config, entries=\("forward", "grad"\)\)'
    ):
        einplan.Session(plan, random_seed=0).loss_and_grads([[1, 2]])
    p = einplan.compile_model("tiny", entries=("forward", "grad"))
    with pytest.raises(EinplanError, match="generate needs the plan's prefill and decode"):
        einplan.Session(p, random_seed=0).generate([1, 2], 2)
    with pytest.raises(EinplanError, match="targets must have the tokens' shape"):
        einplan.Session(p, random_seed=0).loss_and_grads([[1, 2]], [[1, 2, 3]])


def test_train_returns_the_logged_history_and_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    small = {"seq_len": 16, "micro_batch": 2, "eval_batches": 1, "log_every": 2}
    run = einplan.train("tiny", data=CORPUS, out=out, steps=3, overrides=small)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert run.history == logged and [r["step"] for r in logged] == [2, 3]
    assert run.checkpoint == out / "checkpoints" / "step-000003" and run.checkpoint.is_dir()
    assert np.isfinite([r["loss"] for r in run.history]).all()
    again = einplan.train(out / "model.plan", data=CORPUS, out=out, steps=4, resume=True)
    assert [r["step"] for r in again.history] == [2, 3, 4]
    assert again.checkpoint == out / "checkpoints" / "step-000004"
