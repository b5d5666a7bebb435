"""Generation from a plan: prefill the prompts into the KV cache, then decode one token per
sequence per step, sampling, streaming text and timing each phase.

Prompts of different lengths share one batch, left-padded: slot j of row r holds the
prompt's token j - pad[r]. The mask given to every step (batch, queries, kv) lets a query
see the filled, non-padding slots up to its own; the cache's first ``kv`` slots are attended,
with ``kv`` rounded up to a multiple of KV_BUCKET so that the decode step's shapes (and its
prepared kernels and buffers) change only every KV_BUCKET tokens.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from einplan.compiler.plan import Plan
from einplan.errors import EinplanError
from einplan.runtime.executor import Executor
from einplan.runtime.kv_cache import allocate_cache, cache_bytes
from einplan.runtime.recorder import Recorder
from einplan.runtime.sampling import Sampler, SamplingConfig

KV_BUCKET = 64
PREFILL_CHUNK = 512
MASKED = np.finfo(np.float32).min  # finite, so a row with nothing visible gives no NaN


@dataclass
class PhaseStats:
    """Per-phase numbers of one generate call."""

    batch: int
    prompt_tokens: int  # padded prompt length
    ttft_s: float = 0.0
    prefill_s: float = 0.0
    decode_step_s: list[float] = field(default_factory=list)
    kv_cache_bytes: int = 0
    weights_bytes: int = 0
    activations_bytes: int = 0

    @property
    def prefill_tokens_per_s(self) -> float:
        """Prompt tokens (all rows) per second of prefill."""
        return self.batch * self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    def decode_ms(self, q: float) -> float:
        """Quantile ``q`` (0.5, 0.99) of the per-token decode step time, in ms."""
        if not self.decode_step_s:
            return 0.0
        if len(self.decode_step_s) == 1:
            return self.decode_step_s[0] * 1e3
        cuts = statistics.quantiles(self.decode_step_s, n=100, method="inclusive")
        return cuts[min(98, max(0, round(q * 100) - 1))] * 1e3

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second of the decode phase, all rows, at the median step time."""
        p50 = self.decode_ms(0.5)
        return self.batch * 1e3 / p50 if p50 else 0.0


@dataclass
class Generation:
    """The new tokens and text of every prompt, why each stopped, and the phase numbers."""

    tokens: list[list[int]]
    texts: list[str]
    stop_reasons: list[str]
    stats: PhaseStats


class TextStream:
    """Incremental detokenization: emits only complete UTF-8 text, never a half character."""

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self.decode = decode
        self.shown = 0

    def push(self, ids: list[int]) -> str:
        """New printable text after the tokens so far (``ids``: all new tokens of the row)."""
        text = self.decode(ids)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for more
            return ""
        piece, self.shown = text[self.shown :], len(text)
        return piece


def attention_mask(pads: np.ndarray, first: int, queries: int, kv: int) -> np.ndarray:
    """Additive mask (batch, queries, kv): query q (cache slot ``first + q``) of row r sees
    slots ``pads[r] .. first + q``."""
    slots = np.arange(kv)
    own = first + np.arange(queries)
    visible = (slots[None, None, :] <= own[None, :, None]) & (
        slots[None, None, :] >= pads[:, None, None]
    )
    return np.where(visible, np.float32(0), MASKED).astype(np.float32)


def bucket(n: int, ctx: int) -> int:
    """``n`` rounded up to a multiple of KV_BUCKET, at most ``ctx``."""
    return min(ctx, -(-n // KV_BUCKET) * KV_BUCKET)


class Generator:
    """Prefill and decode entry points of a plan bound to weights, sharing one KV cache."""

    def __init__(self, plan: Plan, weights: dict[str, np.ndarray], workers: int = 0) -> None:
        """``weights`` maps checkpoint keys to arrays (as :class:`einplan.Session` binds)."""
        self.plan, self.weights, self.workers = plan, weights, workers
        self.prefill_graph = plan.entry("prefill")
        self.decode_graph = plan.entry("decode")
        self.limit = self.prefill_graph.dims["ctx"]
        self._bound: tuple | None = None

    def bind(self, batch: int, ctx: int) -> tuple[Executor, Executor, dict[str, np.ndarray]]:
        """Executors over a zeroed cache for this batch and context (reused when they fit)."""
        if self._bound is None or self._bound[0] != (batch, ctx):
            cache = allocate_cache(self.prefill_graph, batch, ctx)
            arrays = {**self.weights, **cache}
            pre = Executor(self.prefill_graph, arrays, self.workers)
            dec = Executor(self.decode_graph, arrays, self.workers)
            self._bound = ((batch, ctx), pre, dec, cache)
        else:
            for a in self._bound[3].values():
                a.fill(0)
        return self._bound[1], self._bound[2], self._bound[3]

    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        sampling: SamplingConfig,
        eos_ids: list[int] = (),
        stop_strings: list[str] = (),
        decode_text: Callable[[list[int]], str] | None = None,
        on_text: Callable[[int, str], None] | None = None,
        ctx: int | None = None,
        pad_id: int = 0,
        recorder: Recorder | None = None,
    ) -> Generation:
        """Generate up to ``max_new_tokens`` for each prompt (token id lists).

        Each row stops on an EOS id, on a stop string (needs ``decode_text``), at the token
        limit, or when the context is full (reason "context"). ``on_text(row, piece)``
        receives text as it is generated.
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise EinplanError("empty prompt: give at least one token of prompt text")
        if max_new_tokens < 1:
            raise EinplanError(f"max new tokens must be >= 1, got {max_new_tokens}")
        batch, longest = len(prompts), max(len(p) for p in prompts)
        need = longest + max_new_tokens
        ctx = ctx or min(self.limit, need)
        if longest >= ctx or ctx > self.limit:
            raise EinplanError(
                f"prompt of {longest} tokens leaves no room to generate in a context of {ctx} "
                f"(the model's limit is {self.limit}); shorten the prompt or raise --ctx"
            )
        room = ctx - longest
        last_reason = "length" if max_new_tokens <= room else "context"
        max_new_tokens = min(max_new_tokens, room)
        pre, dec, cache = self.bind(batch, ctx)
        stats = PhaseStats(batch, longest, kv_cache_bytes=cache_bytes(cache))
        stats.weights_bytes = sum(a.nbytes for a in self.weights.values())
        pads = np.array([longest - len(p) for p in prompts])
        tokens = np.full((batch, longest), pad_id, dtype=np.int64)
        for r, p in enumerate(prompts):
            tokens[r, pads[r] :] = p
        positions = np.maximum(np.arange(longest)[None, :] - pads[:, None], 0)
        sampler = Sampler(sampling)
        next_ids = np.zeros(batch, np.int64)
        seen = [list(p) for p in prompts]
        new: list[list[int]] = [[] for _ in prompts]
        reasons = [last_reason] * batch
        done = np.zeros(batch, bool)
        streams = [TextStream(decode_text) for _ in prompts] if decode_text else []
        eos = set(eos_ids)

        t0 = time.perf_counter()
        for start in range(0, longest, PREFILL_CHUNK):  # long prompts in chunks: scores stay
            end = min(longest, start + PREFILL_CHUNK)  # (chunk x kv), not (prompt x prompt)
            kv = bucket(end, ctx)
            logits = pre.run(
                {
                    "tokens": tokens[:, start:end],
                    "positions": positions[:, start:end],
                    "mask": attention_mask(pads, start, end - start, kv),
                    "write_pos": np.array([start]),
                },
                recorder,
            )["logits"]
        stats.prefill_s = time.perf_counter() - t0
        for step in range(max_new_tokens):
            ts = time.perf_counter()
            if step:
                slot = longest + step - 1
                kv = bucket(slot + 1, ctx)
                logits = dec.run(
                    {
                        "tokens": next_ids[:, None],
                        "positions": (slot - pads)[:, None],
                        "mask": attention_mask(pads, slot, 1, kv),
                        "write_pos": np.array([slot]),
                    },
                    recorder,
                )["logits"]
            next_ids = sampler.pick(logits, seen).astype(np.int64)
            for r in np.flatnonzero(~done):
                tok = int(next_ids[r])
                seen[r].append(tok)
                if tok in eos:
                    done[r], reasons[r] = True, "eos"
                    continue
                new[r].append(tok)
                if streams:
                    piece = streams[r].push(new[r])
                    if piece and on_text:
                        on_text(r, piece)
                    text = decode_text(new[r])
                    if any(s in text for s in stop_strings):
                        done[r], reasons[r] = True, "stop"
            elapsed = time.perf_counter() - ts
            if step == 0:
                stats.ttft_s = time.perf_counter() - t0
            else:
                stats.decode_step_s.append(elapsed)
            if done.all():
                break
        stats.activations_bytes = max(pre.activation_bytes(), dec.activation_bytes())
        texts = [decode_text(t) for t in new] if decode_text else [""] * batch
        for r, text in enumerate(texts):
            for s in stop_strings:
                if s in text:
                    texts[r] = text[: text.index(s)]
        return Generation(new, texts, reasons, stats)
