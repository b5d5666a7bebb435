"""Continuous batching over a plan's prefill and decode entries: sequences join and leave the
running decode batch between steps, each in its own lane of one KV cache.

Design (no change to the plan): the decode entry writes every row's new key/value at one
shared cache slot (``write_pos``), the *cursor*, which advances by one each decode step. A
row's keys live at whatever slots it wrote and its mask row lets it see exactly those
(attention does not care where a slot is: RoPE was applied by position before the write).
So each lane keeps a ``visible`` set of slots; a free lane's old slots are simply hidden.

New prompts are prefilled in their own small caches between decode steps: the short ones
(up to ``chunk`` tokens) that wait, together (left-padded, up to ``prefill_batch`` of them),
in the step they arrive; a long one alone, one ``chunk`` a step, so it never stalls the
running rows or the short prompts behind it for long. Each prompt's keys are then copied into
a free lane just below the cursor.
When the cursor reaches the end of the cache, every lane's visible slots are packed to the
front (``compact``). The decode step runs over the lowest ``b`` lanes only (``b`` a power of
two covering the highest busy lane; the executors bind views of the cache), so a lone
request pays for a batch of one.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass, field

import numpy as np

from einplan.compiler.plan import Plan
from einplan.errors import EinplanError
from einplan.runtime.executor import Executor
from einplan.runtime.generate import KV_BUCKET, MASKED, PromptBatch, attention_mask, bucket
from einplan.runtime.kv_cache import allocate_cache
from einplan.runtime.sampling import Sampler, SamplingConfig

_ids = itertools.count()


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities of one row of logits (float64 for exact sums)."""
    x = logits.astype(np.float64)
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


@dataclass(eq=False)
class Sequence:
    """One request in flight: its prompt, how to sample, its new tokens, why it stopped."""

    prompt: list[int]
    max_new_tokens: int
    sampling: SamplingConfig = SamplingConfig()
    eos_ids: Collection[int] = ()
    logprobs: int | None = None  # top-n log-probabilities wanted per token (0: just its own)
    id: int = field(default_factory=lambda: next(_ids))
    new: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "eos", "length", "context", "stop", "cancelled"
    lane: int = -1
    submitted_s: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None

    def __post_init__(self) -> None:
        self.sampler = Sampler(self.sampling)
        self.seen = list(self.prompt)
        self.eos = set(self.eos_ids)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass
class TokenEvent:
    """A token a sequence produced (``token`` None when it only finished), its log-probability
    and the top alternatives when asked, and its finish reason once it ends."""

    seq: Sequence
    token: int | None
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None
    finish_reason: str | None = None


@dataclass
class StepStats:
    """What one engine step did."""

    prefill_tokens: int = 0
    decode_rows: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    drafted: int = 0  # speculative decoding: tokens proposed by the draft
    accepted: int = 0  # ... and kept by the target


class PrefillJob:
    """Prompts prefilled together (left-padded) into a prompt cache of ``ctx`` slots."""

    def __init__(self, seqs: list[Sequence], cache: dict[str, np.ndarray], ctx: int) -> None:
        self.seqs, self.cache, self.ctx = seqs, cache, ctx
        self.batch = PromptBatch.build([s.prompt for s in seqs], 0)
        self.done = 0  # slots prefilled so far

    @property
    def finished(self) -> bool:
        return self.done == self.batch.length


class BatchEngine:
    """Sequences in lanes of one KV cache, decoded together; not thread-safe (one thread
    owns it and calls :meth:`add`, :meth:`cancel` and :meth:`step`)."""

    def __init__(
        self,
        plan: Plan,
        weights: dict[str, np.ndarray],
        max_batch: int = 8,
        ctx: int | None = None,
        workers: int = 0,
        chunk: int = 256,
        prefill_batch: int = 8,
    ) -> None:
        self.prefill_graph = plan.entry("prefill")
        self.decode_graph = plan.entry("decode")
        limit = self.prefill_graph.dims["ctx"]
        self.ctx = min(ctx or limit, limit)
        if self.ctx < 2:
            raise EinplanError(f"context must be >= 2 tokens, got {self.ctx}")
        batch_limit = self.decode_graph.dims.get("batch", max_batch)
        if not 1 <= max_batch <= batch_limit:
            raise EinplanError(f"max batch must lie in 1..{batch_limit}, got {max_batch}")
        self.max_batch, self.workers, self.chunk = max_batch, workers, chunk
        self.weights = weights
        self.cache = allocate_cache(self.prefill_graph, max_batch, self.ctx)
        self.prefill_batch = min(max_batch, prefill_batch)
        # short prompts (up to a chunk) are prefilled together in a small cache; a long one
        # alone, a chunk a step, in a cache of the full context
        self.short_cache = allocate_cache(
            self.prefill_graph, self.prefill_batch, min(chunk, self.ctx)
        )
        self.long_cache = allocate_cache(self.prefill_graph, 1, self.ctx)
        self._prefillers: dict[tuple[int, int], Executor] = {}
        self._decoders: dict[int, Executor] = {}
        self.visible = np.zeros((max_batch, self.ctx), bool)
        self.cursor = 0
        self.lanes: list[Sequence | None] = [None] * max_batch
        self.waiting: deque[Sequence] = deque()
        self.long_job: PrefillJob | None = None  # a long prompt, prefilled a chunk a step
        self.pending: list[TokenEvent] = []  # events made outside step (cancel)

    # -- requests -------------------------------------------------------------------------
    def check(self, seq: Sequence) -> None:
        """Refuse a sequence that cannot run here (empty, or no room to generate)."""
        if not seq.prompt:
            raise EinplanError("empty prompt: give at least one token of prompt text")
        if len(seq.prompt) >= self.ctx:
            raise EinplanError(
                f"prompt of {len(seq.prompt)} tokens leaves no room to generate in a context "
                f"of {self.ctx}; shorten the prompt"
            )
        if seq.max_new_tokens < 1:
            raise EinplanError(f"max new tokens must be >= 1, got {seq.max_new_tokens}")

    def add(self, seq: Sequence) -> None:
        """Queue a sequence; it is prefilled once a lane is free."""
        self.check(seq)
        self.waiting.append(seq)

    def cancel(self, seq: Sequence, reason: str = "cancelled") -> None:
        """Stop a sequence now and free its lane (or drop it from the queue)."""
        if seq.done:
            return
        seq.finish_reason = reason
        if seq in self.waiting:
            self.waiting.remove(seq)
        if self.long_job is not None and seq in self.long_job.seqs:
            self.long_job = None
        self._free(seq)

    @property
    def running(self) -> int:
        """Sequences in lanes or being prefilled."""
        return sum(s is not None for s in self.lanes) + (self.long_job is not None)

    @property
    def idle(self) -> bool:
        return not self.waiting and self.running == 0

    def _free(self, seq: Sequence) -> None:
        if 0 <= seq.lane < self.max_batch and self.lanes[seq.lane] is seq:
            self.lanes[seq.lane] = None
            self.visible[seq.lane] = False
        seq.lane = -1
        if all(s is None for s in self.lanes):
            self.cursor = 0

    # -- one step -------------------------------------------------------------------------
    def step(self) -> tuple[list[TokenEvent], StepStats]:
        """Either prefill the waiting short prompts that have a lane (together, up to a
        chunk of tokens), so that their first tokens go out at once; or a chunk of a long
        prompt (if one waits) and one decode step of every running lane. Returns the tokens
        made."""
        events, stats = self.pending, StepStats()
        self.pending = []
        decoding = [s for s in self.lanes if s is not None]
        t0 = time.perf_counter()
        free = self.lanes.count(None) - (self.long_job is not None)
        if self.long_job is None and free > 0:
            long = next((s for s in self.waiting if len(s.prompt) > self.chunk), None)
            if long is not None:
                self.waiting.remove(long)
                self.long_job = PrefillJob([long], self.long_cache, self.ctx)
                free -= 1
        shorts, budget = [], self.chunk  # prompt tokens per step, so decode never stalls long
        for s in self.waiting:
            if len(shorts) >= min(free, self.prefill_batch):
                break
            if len(s.prompt) <= self.chunk and (not shorts or len(s.prompt) <= budget):
                shorts.append(s)
                budget -= len(s.prompt)
        if shorts:
            for seq in shorts:
                self.waiting.remove(seq)
            job = PrefillJob(shorts, self.short_cache, min(self.chunk, self.ctx))
            stats.prefill_tokens += self._run_job(job, events)
            stats.prefill_s = time.perf_counter() - t0
            return events, stats  # their first tokens go out now; the others decode next
        if self.long_job is not None:
            job = self.long_job
            stats.prefill_tokens += self._run_job(job, events)
            if job.finished:
                self.long_job = None
        stats.prefill_s = time.perf_counter() - t0
        if decoding:
            t0 = time.perf_counter()
            self._decode(decoding, events, stats)
            stats.decode_rows, stats.decode_s = len(decoding), time.perf_counter() - t0
        return events, stats

    def _prefiller(self, job: PrefillJob) -> Executor:
        """The prefill executor over the first rows of a job's prompt cache."""
        b = len(job.seqs)
        key = (id(job.cache), b)
        if key not in self._prefillers:
            views = {k: v[:b] for k, v in job.cache.items()}
            arrays = {**self.weights, **views}
            self._prefillers[key] = Executor(self.prefill_graph, arrays, self.workers)
        return self._prefillers[key]

    def _run_chunk(self, job: PrefillJob) -> np.ndarray:
        """Prefill the job's next chunk; its logits (rows, vocab)."""
        group, start = job.batch, job.done
        end = min(group.length, start + self.chunk)
        logits = self._prefiller(job).run(
            {
                "tokens": group.tokens[:, start:end],
                "positions": group.positions[:, start:end],
                "mask": attention_mask(group.pads, start, end - start, bucket(end, job.ctx)),
                "write_pos": np.array([start]),
            }
        )["logits"]
        job.done = end
        return logits

    def _run_job(self, job: PrefillJob, events: list[TokenEvent]) -> int:
        """One chunk of a job; once it is whole, its prompts take lanes. Tokens prefilled."""
        start = job.done
        logits = self._run_chunk(job)
        if job.finished:
            self._finish_job(job, logits, events)
        return len(job.seqs) * (job.done - start)

    def _finish_job(self, job: PrefillJob, logits: np.ndarray, events: list[TokenEvent]) -> None:
        """Copy a prefilled job's prompts into free lanes and pick their first tokens."""
        live = [(row, s) for row, s in enumerate(job.seqs) if not s.done]
        if self.cursor + 1 > self.ctx:
            self._compact()
        self.cursor = max([self.cursor] + [len(s.prompt) for _, s in live])
        for row, seq in live:
            self._place(seq, job, row)
            self._accept(seq, logits[row], events)

    def _place(self, seq: Sequence, job: PrefillJob, row: int) -> None:
        """Copy a prefilled prompt's keys (``row`` of the job's cache) into a free lane, just
        below the cursor."""
        lane = self.lanes.index(None)
        n = len(seq.prompt)
        at = self.cursor - n
        for key, arr in self.cache.items():
            arr[lane, :, at : at + n] = job.cache[key][
                row, :, job.batch.pads[row] : job.batch.length
            ]
        self.visible[lane] = False
        self.visible[lane, at : at + n] = True
        self.lanes[lane], seq.lane = seq, lane

    def _compact(self) -> None:
        """Pack every lane's visible slots to the front of the cache; the cursor follows."""
        top = 0
        for lane, seq in enumerate(self.lanes):
            if seq is None:
                continue
            idx = np.flatnonzero(self.visible[lane])
            m = len(idx)
            if m and idx[-1] != m - 1:
                for arr in self.cache.values():
                    arr[lane, :, :m] = arr[lane][:, idx]
            self.visible[lane] = False
            self.visible[lane, :m] = True
            top = max(top, m)
        self.cursor = top

    def _decoder(self, b: int) -> Executor:
        if b not in self._decoders:
            views = {k: v[:b] for k, v in self.cache.items()}
            ex = Executor(self.decode_graph, {**self.weights, **views}, self.workers)
            ex.max_prepared = -(-self.ctx // KV_BUCKET)  # every kv bucket: arenas are small
            self._decoders[b] = ex
        return self._decoders[b]

    def _decode(
        self, running: list[Sequence], events: list[TokenEvent], stats: StepStats | None = None
    ) -> None:
        if self.cursor >= self.ctx:
            self._compact()
        top = max(s.lane for s in running) + 1
        b = min(self.max_batch, 1 << (top - 1).bit_length())
        t = self.cursor
        kv = bucket(t + 1, self.ctx)
        tokens = np.zeros((b, 1), np.int64)
        positions = np.zeros((b, 1), np.int64)
        see = self.visible[:b, :kv].copy()
        see[:, t] = True
        for s in running:
            tokens[s.lane, 0] = s.seen[-1]
            positions[s.lane, 0] = len(s.seen) - 1
        mask = np.where(see, np.float32(0), MASKED).astype(np.float32)[:, None, :]
        logits = self._decoder(b).run(
            {"tokens": tokens, "positions": positions, "mask": mask, "write_pos": np.array([t])}
        )["logits"]
        self.cursor = t + 1
        for s in running:
            self.visible[s.lane, t] = True
            self._accept(s, logits[s.lane], events)

    def _accept(self, seq: Sequence, logits: np.ndarray, events: list[TokenEvent]) -> None:
        """Sample the sequence's next token from its logits row and decide whether it ends."""
        self._take(seq, int(seq.sampler.pick(logits[None, :], [seq.seen])[0]), logits, events)

    def _take(self, seq: Sequence, tok: int, logits: np.ndarray, events: list[TokenEvent]) -> None:
        """Append the token picked from ``logits`` and decide whether the sequence ends."""
        if seq.first_token_s is None:
            seq.first_token_s = time.perf_counter()
        event = TokenEvent(seq, tok)
        if seq.logprobs is not None:
            lp = log_softmax(logits)
            event.logprob = float(lp[tok])
            if seq.logprobs:
                best = np.argsort(-lp, kind="stable")[: seq.logprobs]
                event.top = [(int(i), float(lp[i])) for i in best]
        seq.seen.append(tok)
        if tok in seq.eos:
            event.token, event.logprob, event.top = None, None, None
            seq.finish_reason = "eos"
        else:
            seq.new.append(tok)
            if len(seq.new) >= seq.max_new_tokens:
                seq.finish_reason = "length"
            elif len(seq.seen) >= self.ctx:
                seq.finish_reason = "context"
        event.finish_reason = seq.finish_reason
        if seq.done:
            self._free(seq)
        events.append(event)
