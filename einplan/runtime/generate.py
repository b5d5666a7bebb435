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
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

import numpy as np

from einplan.compiler.plan import Plan
from einplan.errors import EinplanError
from einplan.runtime.backends import get_backend
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
    backend: str = "numpy"  # the kernels backend asked for
    decode_steps_by_backend: dict[str, int] = field(default_factory=dict)  # who ran them
    draft_tokens: int = 0  # speculative decoding: tokens the draft proposed
    accepted_tokens: int = 0  # ... and the target kept

    @property
    def acceptance_rate(self) -> float:
        """Share of drafted tokens the target kept (speculative decoding)."""
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    def to_json(self) -> dict:
        """The phase table as plain numbers (``einplan run --stats-json``)."""
        return {
            "batch": self.batch,
            "prompt_tokens": self.prompt_tokens,
            "ttft_ms": self.ttft_s * 1e3,
            "prefill_tokens_per_s": self.prefill_tokens_per_s,
            "decode_tokens_per_s": self.decode_tokens_per_s,
            "decode_ms_p50": self.decode_ms(0.5),
            "decode_ms_p99": self.decode_ms(0.99),
            "decode_steps": len(self.decode_step_s),
            "memory_bytes": {
                "weights": self.weights_bytes,
                "kv_cache": self.kv_cache_bytes,
                "activations": self.activations_bytes,
            },
            "backend": self.backend,
            "decode_steps_by_backend": dict(self.decode_steps_by_backend),
            "draft_tokens": self.draft_tokens,
            "acceptance_rate": self.acceptance_rate,
        }

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


@dataclass(frozen=True)
class GenerationRequest:
    """What to generate: up to ``max_new_tokens`` for each prompt (token id lists), picked
    by ``sampling``; a row stops at an EOS id or a stop string, within a KV cache of ``ctx``
    slots (default: longest prompt + new tokens); shorter prompts are padded with ``pad_id``."""

    prompts: list[list[int]]
    max_new_tokens: int
    sampling: SamplingConfig = SamplingConfig()
    eos_ids: Collection[int] = ()
    stop_strings: Sequence[str] = ()
    ctx: int | None = None
    pad_id: int = 0

    def __post_init__(self) -> None:
        if not self.prompts or any(len(p) == 0 for p in self.prompts):
            raise EinplanError("empty prompt: give at least one token of prompt text")
        if self.max_new_tokens < 1:
            raise EinplanError(f"max new tokens must be >= 1, got {self.max_new_tokens}")


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


def fit_context(request: GenerationRequest, limit: int) -> tuple[int, int, str]:
    """The cache length, the number of decode steps that fit in it, and the stop reason of a
    row that runs out of them ("length", or "context" when the cache cut them short)."""
    longest = max(len(p) for p in request.prompts)
    ctx = request.ctx or min(limit, longest + request.max_new_tokens)
    if longest >= ctx or ctx > limit:
        raise EinplanError(
            f"prompt of {longest} tokens leaves no room to generate in a context of {ctx} "
            f"(the model's limit is {limit}); shorten the prompt or raise --ctx"
        )
    room = ctx - longest
    reason = "length" if request.max_new_tokens <= room else "context"
    return ctx, min(request.max_new_tokens, room), reason


@dataclass
class PromptBatch:
    """Prompts left-padded into one batch: slot j of row r holds the prompt's token
    j - pads[r]; positions count from each prompt's first token."""

    tokens: np.ndarray  # (batch, length) int64
    positions: np.ndarray  # (batch, length)
    pads: np.ndarray  # (batch,)

    @classmethod
    def build(cls, prompts: list[list[int]], pad_id: int) -> PromptBatch:
        """Pad ``prompts`` on the left with ``pad_id`` to the longest one."""
        longest = max(len(p) for p in prompts)
        pads = np.array([longest - len(p) for p in prompts])
        tokens = np.full((len(prompts), longest), pad_id, dtype=np.int64)
        for r, p in enumerate(prompts):
            tokens[r, pads[r] :] = p
        positions = np.maximum(np.arange(longest)[None, :] - pads[:, None], 0)
        return cls(tokens, positions, pads)

    @property
    def length(self) -> int:
        """Slots the padded prompts fill."""
        return self.tokens.shape[1]


def prefill(
    executor: Executor, prompts: PromptBatch, ctx: int, recorder: Recorder | None
) -> np.ndarray:
    """Write the prompts into the cache; the logits (batch, vocab) after the last slot."""
    length = prompts.length
    for start in range(0, length, PREFILL_CHUNK):  # long prompts in chunks: scores stay
        end = min(length, start + PREFILL_CHUNK)  # (chunk x kv), not (prompt x prompt)
        logits = executor.run(
            {
                "tokens": prompts.tokens[:, start:end],
                "positions": prompts.positions[:, start:end],
                "mask": attention_mask(prompts.pads, start, end - start, bucket(end, ctx)),
                "write_pos": np.array([start]),
            },
            recorder,
        )["logits"]
    return logits


def decode_step(
    executor: Executor,
    prompts: PromptBatch,
    ids: np.ndarray,
    slot: int,
    ctx: int,
    recorder: Recorder | None,
) -> np.ndarray:
    """Write one token per row (``ids``) at cache ``slot``; the logits (batch, vocab) after it."""
    return executor.run(
        {
            "tokens": ids[:, None],
            "positions": (slot - prompts.pads)[:, None],
            "mask": attention_mask(prompts.pads, slot, 1, bucket(slot + 1, ctx)),
            "write_pos": np.array([slot]),
        },
        recorder,
    )["logits"]


class Rows:
    """Per-row bookkeeping: the tokens each row has seen and generated, which rows are done
    and why, and their text as it streams (with ``decode_text``; ``on_text(row, piece)``)."""

    def __init__(
        self,
        request: GenerationRequest,
        last_reason: str,
        decode_text: Callable[[list[int]], str] | None,
        on_text: Callable[[int, str], None] | None,
    ) -> None:
        self.eos, self.stop_strings = set(request.eos_ids), request.stop_strings
        self.decode_text, self.on_text = decode_text, on_text
        self.seen = [list(p) for p in request.prompts]
        self.new: list[list[int]] = [[] for _ in request.prompts]
        self.reasons = [last_reason] * len(request.prompts)
        self.done = np.zeros(len(request.prompts), bool)
        self.streams = [TextStream(decode_text) for _ in request.prompts] if decode_text else []

    def accept(self, ids: np.ndarray) -> None:
        """Take each running row's next token: an EOS id ends the row, other tokens join its
        text, which ends the row once it holds a stop string."""
        for r in np.flatnonzero(~self.done):
            tok = int(ids[r])
            self.seen[r].append(tok)
            if tok in self.eos:
                self.done[r], self.reasons[r] = True, "eos"
                continue
            self.new[r].append(tok)
            if self.streams:
                piece = self.streams[r].push(self.new[r])
                if piece and self.on_text:
                    self.on_text(r, piece)
                text = self.decode_text(self.new[r])
                if any(s in text for s in self.stop_strings):
                    self.done[r], self.reasons[r] = True, "stop"

    def texts(self) -> list[str]:
        """Each row's text, cut before its first stop string ("" without ``decode_text``)."""
        if not self.decode_text:
            return [""] * len(self.new)
        texts = [self.decode_text(t) for t in self.new]
        for r, text in enumerate(texts):
            for s in self.stop_strings:
                if s in text:
                    texts[r] = text[: text.index(s)]
        return texts


class Generator:
    """Prefill and decode entry points of a plan bound to weights, sharing one KV cache."""

    def __init__(
        self,
        plan: Plan,
        weights: dict[str, np.ndarray],
        workers: int = 0,
        kernels: str | None = None,
    ) -> None:
        """``weights`` maps checkpoint keys to arrays (as :class:`einplan.Session` binds);
        ``kernels``: the kernels backend (runtime/backends; None: the fastest installed)."""
        self.plan, self.weights, self.workers = plan, weights, workers
        self.kernels = get_backend(kernels)
        self.prefill_graph = plan.entry("prefill")
        self.decode_graph = plan.entry("decode")
        self.limit = self.prefill_graph.dims["ctx"]
        self._bound: tuple | None = None

    def bind(self, batch: int, ctx: int) -> tuple[Executor, Executor, dict[str, np.ndarray]]:
        """Executors over a zeroed cache for this batch and context (reused when they fit)."""
        if self._bound is None or self._bound[0] != (batch, ctx):
            cache = allocate_cache(self.prefill_graph, batch, ctx, self.kernels.xp)
            arrays = {**self.weights, **cache}
            pre = Executor(self.prefill_graph, arrays, self.workers, self.kernels)
            dec = Executor(self.decode_graph, arrays, self.workers, self.kernels)
            self._bound = ((batch, ctx), pre, dec, cache)
        else:
            for a in self._bound[3].values():
                a.fill(0)
        return self._bound[1], self._bound[2], self._bound[3]

    def generate(
        self,
        request: GenerationRequest,
        decode_text: Callable[[list[int]], str] | None = None,
        on_text: Callable[[int, str], None] | None = None,
        recorder: Recorder | None = None,
    ) -> Generation:
        """Generate what ``request`` asks: each row stops on an EOS id, on a stop string
        (needs ``decode_text``), at the token limit, or when the context is full (reason
        "context"). ``on_text(row, piece)`` receives text as it is generated."""
        ctx, steps, last_reason = fit_context(request, self.limit)
        prompts = PromptBatch.build(request.prompts, request.pad_id)
        batch = len(request.prompts)
        pre, dec, cache = self.bind(batch, ctx)
        stats = PhaseStats(batch, prompts.length, kv_cache_bytes=cache_bytes(cache))
        stats.weights_bytes = sum(a.nbytes for a in self.weights.values())
        sampler = Sampler(request.sampling)
        rows = Rows(request, last_reason, decode_text, on_text)
        next_ids = np.zeros(batch, np.int64)

        t0 = time.perf_counter()
        logits = prefill(pre, prompts, ctx, recorder)
        stats.prefill_s = time.perf_counter() - t0
        for step in range(steps):
            ts = time.perf_counter()
            if step:
                slot = prompts.length + step - 1
                logits = decode_step(dec, prompts, next_ids, slot, ctx, recorder)
            next_ids = sampler.pick(logits, rows.seen).astype(np.int64)
            rows.accept(next_ids)
            elapsed = time.perf_counter() - ts
            if step == 0:
                stats.ttft_s = time.perf_counter() - t0
            else:
                stats.decode_step_s.append(elapsed)
            if rows.done.all():
                break
        stats.activations_bytes = max(pre.activation_bytes(), dec.activation_bytes())
        stats.backend = self.kernels.name
        stats.decode_steps_by_backend = dec.steps_by_backend()
        return Generation(rows.new, rows.texts(), rows.reasons, stats)
