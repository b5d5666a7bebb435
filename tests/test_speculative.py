"""Speculative decoding: greedy output identical to plain decoding, sampled output following
the target's distribution (chi-square), clear errors for mismatched drafts."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ONE_LAYER

import einplan
from einplan.api import ENTRIES
from einplan.errors import EinplanError
from einplan.runtime.sampling import SamplingConfig
from einplan.runtime.speculative import accept_drafts, distribution

# chi-square 0.999 quantiles by degrees of freedom (the tests fail about once in 1000 runs of
# fresh seeds; the seeds here are fixed)
CHI2_999 = {3: 16.27, 4: 18.47, 5: 20.52, 7: 24.32}


def chi2(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    keep = expected > 0
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


@pytest.fixture(scope="module")
def models():
    target = einplan.Session(
        einplan.compile_model("tiny", entries=(*ENTRIES, "verify")),
        random_seed=0,
        tokenizer="bytes",
    )
    small = einplan.compile_model("tiny")
    same = einplan.Session(small, random_seed=0, tokenizer="bytes")
    other = einplan.Session(small, random_seed=1, tokenizer="bytes")
    return target, same, other


@pytest.mark.parametrize("k", [1, 3, 6])
@pytest.mark.parametrize("which", [1, 2])
def test_greedy_speculative_equals_plain(models, k, which):
    target, draft = models[0], models[which]
    plain = target.generate(["Hello there", "x"], 30, ctx=96)
    spec = target.generate(["Hello there", "x"], 30, ctx=96, draft=draft, draft_tokens=k)
    assert spec.tokens == plain.tokens and spec.texts == plain.texts
    assert spec.stop_reasons == plain.stop_reasons
    assert spec.stats.draft_tokens > 0
    if which == 1:  # the same weights: every draft is kept
        assert spec.stats.acceptance_rate == 1.0


def test_greedy_speculative_with_stop_and_context(models):
    target, _, draft = models
    plain = target.generate("Stop", 200, ctx=40)
    spec = target.generate("Stop", 200, ctx=40, draft=draft, draft_tokens=4)
    assert (spec.tokens, spec.stop_reasons) == (plain.tokens, ["context"])
    stop = plain.texts[0][6:8]
    a = target.generate("Stop", 30, stop=[stop], ctx=64)
    b = target.generate("Stop", 30, stop=[stop], ctx=64, draft=draft, draft_tokens=3)
    assert (b.texts, b.stop_reasons) == (a.texts, a.stop_reasons) == ([a.texts[0]], ["stop"])


def test_rejection_sampling_keeps_the_target_distribution():
    rng = np.random.default_rng(0)
    vocab, k = 6, 2
    p = rng.dirichlet(np.ones(vocab), size=k + 1)
    q = rng.dirichlet(np.ones(vocab) * 0.5, size=k)
    first = np.zeros(vocab)
    pairs = np.zeros((vocab, vocab))
    n = 40_000
    for _ in range(n):
        drafts = [int(rng.choice(vocab, p=q[i])) for i in range(k)]
        kept, nxt = accept_drafts(p, q, drafts, rng)
        out = [*drafts[:kept], nxt]
        first[out[0]] += 1
        if kept >= 1:  # the second token, given the first was the kept draft
            pairs[out[0], out[1]] += 1
    assert chi2(first, p[0]) < CHI2_999[vocab - 1]
    # given x_1 kept, the next token follows p_1 (the target's, conditioned on x_1)
    row = pairs.sum(axis=1).argmax()
    assert chi2(pairs[row], p[1]) < CHI2_999[vocab - 1]


def test_sampled_speculative_tokens_follow_the_target(models):
    """The first new token over many seeds: distributed as plain sampling's (top-k 4
    keeps the histogram small)."""
    target, _, draft = models
    kw = dict(temperature=1.5, top_k=4, ctx=32)
    logits = target.forward(np.array([list(b"ab")]))[0, -1]
    probs = distribution(logits, SamplingConfig(kw["temperature"], kw["top_k"]))[0]
    counts = np.zeros_like(probs)
    for seed in range(400):
        g = target.generate("ab", 2, seed=seed, draft=draft, draft_tokens=2, **kw)
        counts[g.tokens[0][0]] += 1
    top = probs > 0
    assert top.sum() == 4
    assert chi2(counts[top], probs[top]) < CHI2_999[3]


def test_errors(models):
    target, draft, _ = models
    with pytest.raises(EinplanError, match="verify entry"):
        draft.generate("x", 4, draft=target)
    bigger = einplan.Session(
        einplan.compile_model({**ONE_LAYER, "vocab_size": 300}),
        random_seed=0,
    )
    with pytest.raises(EinplanError, match="tokenizer differs"):
        target.generate([1, 2], 4, draft=bigger)
    with pytest.raises(EinplanError, match="repetition penalty"):
        target.generate("x", 4, draft=draft, repetition_penalty=1.2)


def test_run_cli_with_draft(tmp_path, capsys):
    from einplan.cli import main

    target, draft = tmp_path / "t.plan", tmp_path / "d.plan"
    assert main(["compile", "tiny", "--speculative", "-o", str(target)]) == 0
    assert main(["compile", "tiny", "-o", str(draft)]) == 0
    capsys.readouterr()
    args = ["run", str(target), "--random-weights", "0", "--tokenizer", "bytes"]
    args += ["--prompt", "Hi", "--max-new-tokens", "12"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main([*args, "--draft", str(draft), "--draft-random-weights", "1"]) == 0
    assert capsys.readouterr().out == plain
    assert main([*args, "--draft", str(draft)]) == 2
    assert "--draft-weights" in capsys.readouterr().err


@pytest.mark.parametrize("k", [1, 3])
def test_speculative_lanes_greedy_equal_plain(models, k):
    """Continuous batching with drafts: rows join and leave, the caches are compacted, and
    every row's tokens are plain greedy decoding's."""
    from einplan.runtime.batching import Sequence
    from einplan.runtime.spec_batching import SpecBatchEngine

    target, _, draft = models
    engine = SpecBatchEngine(
        target.plan, target.weights, draft.plan, draft.weights, k, max_batch=3, ctx=80, chunk=16
    )
    prompts = ["Hello world, a longer prompt here.", "Hi", "abc def", "x" * 40, "fox"]
    seqs = []
    for i, p in enumerate(prompts):
        seqs.append(Sequence(target.tokenizer.encode(p).ids, 20 + 9 * i))
        engine.add(seqs[-1])
    while not engine.idle:
        engine.step()
    for i, (p, s) in enumerate(zip(prompts, seqs, strict=True)):
        g = target.generate(p, 20 + 9 * i, ctx=80)
        assert (s.new, s.finish_reason) == (g.tokens[0], g.stop_reasons[0])
    assert engine.drafted > 0
