"""Speculative decoding: a small draft plan proposes ``k`` tokens one at a time, the target
checks them all in one prefill-shaped step (its ``verify`` entry: logits at every position)
over its KV cache, and rejection sampling keeps the target's distribution exactly.

Per round, with the committed tokens ``t`` (prompt and accepted output): the target's cache
holds ``t[:-1]``; the draft's holds a prefix of ``t``. The draft catches up and samples
x_1..x_k from its distributions q_i; the target runs on ``[t[-1], x_1..x_k]`` (writing them
at slots len(t)-1..) and gives p_0..p_k. x_i is kept with probability min(1, p_{i-1}(x_i) /
q_i(x_i)); at the first rejection a token is drawn from norm(max(0, p_{i-1} - q_i)), and when
all are kept a bonus one from p_k (greedy: kept while x_i is p_{i-1}'s argmax, then that
argmax), so each round commits 1..k+1 tokens. Slots written past the kept tokens are
overwritten by the next round before any query may see them (the mask is causal).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from einplan.compiler.plan import Plan
from einplan.errors import EinplanError
from einplan.runtime.executor import Executor
from einplan.runtime.generate import (
    PREFILL_CHUNK,
    Generation,
    GenerationRequest,
    PhaseStats,
    Rows,
    attention_mask,
    bucket,
    fit_context,
)
from einplan.runtime.kv_cache import allocate_cache, cache_bytes
from einplan.runtime.recorder import Recorder
from einplan.runtime.sampling import SamplingConfig, filter_top_k_top_p


def distribution(logits: np.ndarray, sampling: SamplingConfig) -> np.ndarray:
    """The probabilities (rows, vocab), float64, the sampler draws from at temperature > 0."""
    x = filter_top_k_top_p(
        np.atleast_2d(logits) / np.float32(sampling.temperature), sampling.top_k, sampling.top_p
    ).astype(np.float64)
    p = np.exp(x - x.max(axis=-1, keepdims=True))
    return p / p.sum(axis=-1, keepdims=True)


def draw(p: np.ndarray, rng: np.random.Generator) -> int:
    """One token from the probabilities ``p`` (vocab,)."""
    return int(min(np.searchsorted(np.cumsum(p), rng.random() * p.sum(), "right"), len(p) - 1))


def accept_drafts(
    p: np.ndarray, q: np.ndarray, drafts: list[int], rng: np.random.Generator | None
) -> tuple[int, int]:
    """Rejection sampling of one round: ``p`` (k+1, vocab) target and ``q`` (k, vocab) draft
    probabilities (logits when greedy, ``rng`` None), ``drafts`` the k proposed tokens.
    Returns how many drafts are kept and the token that follows them."""
    for i, x in enumerate(drafts):
        if rng is None:
            best = int(np.argmax(p[i]))
            if best != x:
                return i, best
            continue
        if rng.random() * q[i, x] >= p[i, x]:  # rejected: draw from the leftover mass
            rest = np.maximum(p[i] - q[i], 0.0)
            return i, draw(rest if rest.sum() > 0 else p[i], rng)
    last = p[len(drafts)]
    return len(drafts), int(np.argmax(last)) if rng is None else draw(last, rng)


class Model:
    """One plan's prefill/decode/verify executors over a batch-1 cache of ``ctx`` slots."""

    def __init__(self, plan: Plan, weights: dict, ctx: int, workers: int, verify: bool) -> None:
        self.cache = allocate_cache(plan.entry("prefill"), 1, ctx)
        arrays = {**weights, **self.cache}
        self.ctx = ctx
        self.prefill = Executor(plan.entry("prefill"), arrays, workers)
        self.decode = Executor(plan.entry("decode"), arrays, workers)
        self.verify = Executor(plan.entry("verify"), arrays, workers) if verify else None
        self.weights_bytes = sum(a.nbytes for a in weights.values())

    def feed(self, tokens: list[int], at: int, recorder, all_logits: bool = False) -> np.ndarray:
        """Write ``tokens`` at slots at.. (positions equal slots); logits of the last
        token (vocab,), or of each (n, vocab) with ``all_logits`` (the verify entry)."""
        n = len(tokens)
        if all_logits:
            out = self.verify.run(self._inputs(tokens, at, n), recorder)["logits"]
            return out[0]
        if n == 1:
            return self.decode.run(self._inputs(tokens, at, 1), recorder)["logits"][0]
        for start in range(0, n, PREFILL_CHUNK):
            part = tokens[start : start + PREFILL_CHUNK]
            out = self.prefill.run(self._inputs(part, at + start, len(part)), recorder)
        return out["logits"][0]

    def _inputs(self, tokens: list[int], at: int, n: int) -> dict[str, np.ndarray]:
        pos = np.arange(at, at + n, dtype=np.int64)[None, :]
        return {
            "tokens": np.array([tokens], np.int64),
            "positions": pos,
            "mask": attention_mask(np.zeros(1, np.int64), at, n, bucket(at + n, self.ctx)),
            "write_pos": np.array([at]),
        }


def speculative_generate(
    target: tuple[Plan, dict],
    draft: tuple[Plan, dict],
    request: GenerationRequest,
    k: int = 4,
    workers: int = 0,
    decode_text: Callable[[list[int]], str] | None = None,
    on_text: Callable[[int, str], None] | None = None,
    recorder: Recorder | None = None,
) -> Generation:
    """Generate for one prompt as ``Generator.generate`` does, the target's tokens proposed
    by the draft (``(plan, weights)`` each); the stats count drafted and accepted tokens."""
    if len(request.prompts) != 1:
        raise EinplanError("speculative decoding runs one prompt at a time")
    if k < 1:
        raise EinplanError(f"draft tokens per step must be >= 1, got {k}")
    if request.sampling.repetition_penalty != 1.0:
        raise EinplanError("speculative decoding does not support a repetition penalty")
    (tplan, tweights), (dplan, dweights) = target, draft
    if "verify" not in tplan.entries:
        raise EinplanError(
            "speculative decoding needs the target plan's verify entry: compile it with "
            "einplan compile --speculative (or entries=(*ENTRIES, 'verify'))"
        )
    limit = min(tplan.entry("prefill").dims["ctx"], dplan.entry("prefill").dims["ctx"])
    ctx, steps, last_reason = fit_context(request, limit)
    tgt = Model(tplan, tweights, ctx, workers, verify=True)
    dft = Model(dplan, dweights, ctx, workers, verify=False)
    sampling = request.sampling
    greedy = sampling.temperature == 0.0
    rng = None if greedy else np.random.default_rng(sampling.seed)
    prompt = request.prompts[0]
    stats = PhaseStats(1, len(prompt), kv_cache_bytes=cache_bytes(tgt.cache))
    stats.weights_bytes = tgt.weights_bytes + dft.weights_bytes
    rows = Rows(request, last_reason, decode_text, on_text)

    t0 = time.perf_counter()
    if len(prompt) > 1:
        tgt.feed(prompt[:-1], 0, recorder)
    tokens = list(prompt)
    in_draft = 0  # tokens of ``tokens`` in the draft's cache
    made = 0
    stats.prefill_s = time.perf_counter() - t0
    drafted = accepted = 0
    while made < steps and not rows.done[0]:
        ts = time.perf_counter()
        n = len(tokens)
        kk = max(0, min(k, steps - made - 1, ctx - n))
        drafts: list[int] = []
        q = np.zeros((kk, 1))
        if kk:
            logits = dft.feed(tokens[in_draft:], in_draft, recorder)
            in_draft = n
            qs = []
            for i in range(kk):
                if i:
                    logits = dft.feed([drafts[-1]], n + i - 1, recorder)
                    in_draft = n + i
                if greedy:
                    qs.append(logits)
                    drafts.append(int(np.argmax(logits)))
                else:
                    qs.append(distribution(logits, sampling)[0])
                    drafts.append(draw(qs[-1], rng))
            q = np.stack(qs)
        p = tgt.feed([tokens[-1], *drafts], n - 1, recorder, all_logits=True)
        if not greedy:
            p = distribution(p, sampling)
        kept, nxt = accept_drafts(p, q, drafts, rng)
        drafted += kk
        accepted += kept
        new = [*drafts[:kept], nxt]
        in_draft = min(in_draft, n + kept)
        for tok in new:
            rows.accept(np.array([tok]))
            tokens.append(tok)
            made += 1
            if rows.done[0] or made >= steps:
                break
        elapsed = time.perf_counter() - ts
        if stats.ttft_s == 0.0:
            stats.ttft_s = time.perf_counter() - t0
        stats.decode_step_s.extend([elapsed / len(new)] * len(new))
    stats.draft_tokens, stats.accepted_tokens = drafted, accepted
    stats.activations_bytes = max(tgt.verify.activation_bytes(), dft.decode.activation_bytes())
    return Generation(rows.new, rows.texts(), rows.reasons, stats)
