"""Speculative decoding inside continuous batching: every running lane drafts ``k`` tokens
with a small draft plan (its own lane cache, same lanes), the target checks all lanes' drafts
in one ``verify`` step, and each lane keeps what rejection sampling accepts (see
:mod:`einplan.runtime.speculative`).

The draft's cache follows the same shared-cursor scheme as the target's: at the start of a
round each lane feeds the draft the tokens it has not seen (1 or 2 after a round; prompts
are prefilled into the draft when the target's prefill of them ends), right-aligned so the
last column holds every lane's newest token; then k-1 draft decode steps; the verify step writes
``[last token, x_1..x_k]`` of every lane at the target's cursor, each query seeing its lane's
slots and the round's slots up to its own. Kept slots become visible; the rest stay hidden.
"""

from __future__ import annotations

import numpy as np

from einplan.compiler.plan import Plan
from einplan.errors import EinplanError
from einplan.runtime.batching import BatchEngine, PrefillJob, Sequence, StepStats, TokenEvent
from einplan.runtime.executor import Executor
from einplan.runtime.generate import MASKED, bucket
from einplan.runtime.speculative import accept_drafts, distribution, draw


class SpecBatchEngine(BatchEngine):
    """A :class:`BatchEngine` whose decode steps are speculative rounds."""

    def __init__(
        self,
        plan: Plan,
        weights: dict[str, np.ndarray],
        draft_plan: Plan,
        draft_weights: dict[str, np.ndarray],
        k: int = 4,
        **options,
    ) -> None:
        if "verify" not in plan.entries:
            raise EinplanError(
                "speculative decoding needs the target plan's verify entry: compile it with "
                "einplan compile --speculative"
            )
        if k < 1:
            raise EinplanError(f"draft tokens per step must be >= 1, got {k}")
        super().__init__(plan, weights, **options)
        self.k = k
        self.verify_graph = plan.entry("verify")
        self.draft = BatchEngine(
            draft_plan,
            draft_weights,
            self.max_batch,
            self.ctx,
            self.workers,
            self.chunk,
            self.prefill_batch,
        )
        self._verifiers: dict[int, Executor] = {}
        self._draft_prefill: dict[int, Executor] = {}
        self.in_draft: dict[int, int] = {}  # sequence id -> its tokens in the draft's cache
        self.drafted = self.accepted = 0
        self._draft_job: PrefillJob | None = None

    # -- lanes ----------------------------------------------------------------------------
    def _free(self, seq: Sequence) -> None:
        lane = seq.lane
        if 0 <= lane < self.max_batch and self.draft.lanes[lane] is seq:
            self.draft.lanes[lane] = None
            self.draft.visible[lane] = False
        self.in_draft.pop(seq.id, None)
        super()._free(seq)
        if all(s is None for s in self.draft.lanes):
            self.draft.cursor = 0

    def _place(self, seq: Sequence, job: PrefillJob, row: int) -> None:
        super()._place(seq, job, row)
        d, n, dj = self.draft, len(seq.prompt), self._draft_job
        at = d.cursor - n
        pad = dj.batch.pads[row]
        for key, arr in d.cache.items():
            arr[seq.lane, :, at : at + n] = dj.cache[key][row, :, pad : dj.batch.length]
        d.visible[seq.lane] = False
        d.visible[seq.lane, at : at + n] = True
        d.lanes[seq.lane] = seq
        self.in_draft[seq.id] = n

    def _finish_job(self, job: PrefillJob, logits: np.ndarray, events: list[TokenEvent]) -> None:
        """Prefill the draft with the same prompts, then place both."""
        d = self.draft
        cache = d.long_cache if job.cache is self.long_cache else d.short_cache
        self._draft_job = PrefillJob(job.seqs, cache, job.ctx)
        while not self._draft_job.finished:
            d._run_chunk(self._draft_job)
        if d.cursor + 1 > d.ctx:
            d._compact()
        live = [s for s in job.seqs if not s.done]
        d.cursor = max([d.cursor] + [len(s.prompt) for s in live])
        super()._finish_job(job, logits, events)
        self._draft_job = None

    # -- executors ------------------------------------------------------------------------
    def _verifier(self, b: int) -> Executor:
        if b not in self._verifiers:
            views = {k: v[:b] for k, v in self.cache.items()}
            arrays = {**self.weights, **views}
            self._verifiers[b] = Executor(self.verify_graph, arrays, self.workers)
        return self._verifiers[b]

    def _draft_feeder(self, b: int) -> Executor:
        d = self.draft
        if b not in self._draft_prefill:
            views = {k: v[:b] for k, v in d.cache.items()}
            arrays = {**d.weights, **views}
            self._draft_prefill[b] = Executor(d.prefill_graph, arrays, self.workers)
        return self._draft_prefill[b]

    # -- a round --------------------------------------------------------------------------
    def _decode(
        self, running: list[Sequence], events: list[TokenEvent], stats: StepStats | None = None
    ) -> None:
        d = self.draft
        longest = max(len(s.seen) for s in running)
        k = min(self.k, self.ctx - longest, min(s.max_new_tokens - len(s.new) for s in running) - 1)
        if k >= 1 and self.cursor + k + 1 > self.ctx:
            self._compact()
        pending = {s.id: len(s.seen) - self.in_draft[s.id] for s in running}
        m = max(pending.values())
        if k >= 1 and d.cursor + m + k > d.ctx:
            d._compact()
        if k < 1 or d.cursor + m + k > d.ctx or self.cursor + k + 1 > self.ctx:
            return super()._decode(running, events, stats)  # no room to draft: plain step
        top = max(s.lane for s in running) + 1
        b = min(self.max_batch, 1 << (top - 1).bit_length())

        # the draft catches up (right-aligned) and proposes k tokens per lane
        t0 = d.cursor
        kv = bucket(t0 + m + k, self.ctx)
        round_see = np.zeros((b, kv), bool)  # this round's draft slots each lane has written
        tokens = np.zeros((b, m), np.int64)
        positions = np.zeros((b, m), np.int64)
        mask = np.full((b, m, kv), MASKED, np.float32)
        for s in running:
            p, lane = pending[s.id], s.lane
            tokens[lane, m - p :] = s.seen[-p:]
            positions[lane, m - p :] = np.arange(len(s.seen) - p, len(s.seen))
            round_see[lane, t0 + m - p : t0 + m] = True
            base = d.visible[lane, :kv]
            for i in range(m):
                own = round_see[lane] & (np.arange(kv) <= t0 + i)
                mask[lane, i] = np.where(base | own, np.float32(0), MASKED)
        for lane in range(b):  # idle lanes and padding: see their own slot (no empty rows)
            for i in range(m):
                mask[lane, i, t0 + i] = 0
        ex = d._decoder(b) if m == 1 else self._draft_feeder(b)
        logits = ex.run(
            {
                "tokens": tokens,
                "positions": positions,
                "mask": mask[:, :, :kv],
                "write_pos": np.array([t0]),
            }
        )["logits"]
        d.cursor = t0 + m
        drafts = {s.id: [] for s in running}
        qs = {s.id: [] for s in running}
        for i in range(k):
            if i:
                t = d.cursor
                tokens = np.zeros((b, 1), np.int64)
                positions = np.zeros((b, 1), np.int64)
                see = d.visible[:b, :kv] | round_see
                see[:, t] = True
                for s in running:
                    tokens[s.lane, 0] = drafts[s.id][-1]
                    positions[s.lane, 0] = len(s.seen) + i - 1
                    round_see[s.lane, t] = True
                step_mask = np.where(see, np.float32(0), MASKED).astype(np.float32)[:, None, :]
                logits = d._decoder(b).run(
                    {
                        "tokens": tokens,
                        "positions": positions,
                        "mask": step_mask,
                        "write_pos": np.array([t]),
                    }
                )["logits"]
                d.cursor = t + 1
            for s in running:
                row = logits[s.lane]
                if s.sampling.temperature == 0.0:
                    qs[s.id].append(row)
                    drafts[s.id].append(int(np.argmax(row)))
                else:
                    q = distribution(row, s.sampling)[0]
                    qs[s.id].append(q)
                    drafts[s.id].append(draw(q, s.sampler.rng))

        # the target checks every lane's [last token, x_1..x_k] in one step
        t = self.cursor
        kv = bucket(t + k + 1, self.ctx)
        tokens = np.zeros((b, k + 1), np.int64)
        positions = np.zeros((b, k + 1), np.int64)
        slots = np.arange(kv)
        mask = np.empty((b, k + 1, kv), np.float32)
        for i in range(k + 1):
            own = (slots >= t) & (slots <= t + i)
            mask[:, i] = np.where(self.visible[:b, :kv] | own[None, :], np.float32(0), MASKED)
        for s in running:
            tokens[s.lane] = [s.seen[-1], *drafts[s.id]]
            positions[s.lane] = np.arange(len(s.seen) - 1, len(s.seen) + k)
        logits = self._verifier(b).run(
            {"tokens": tokens, "positions": positions, "mask": mask, "write_pos": np.array([t])}
        )["logits"]
        self.cursor = t + k + 1
        for s in running:
            raw = logits[s.lane]
            greedy = s.sampling.temperature == 0.0
            p = raw if greedy else distribution(raw, s.sampling)
            kept, nxt = accept_drafts(
                p, np.stack(qs[s.id]), drafts[s.id], None if greedy else s.sampler.rng
            )
            self.drafted += k
            self.accepted += kept
            if stats is not None:
                stats.drafted += k
                stats.accepted += kept
            lane = s.lane
            self.visible[lane, t : t + kept + 1] = True
            fed = np.flatnonzero(round_see[lane])  # catch-up slots, then x_1..x_(k-1)
            keep_draft = len(fed) - (k - 1) + min(kept, k - 1)
            d.visible[lane, fed[:keep_draft]] = True
            self.in_draft[s.id] = len(s.seen) + min(kept, k - 1)
            for j, tok in enumerate([*drafts[s.id][:kept], nxt]):
                self._take(s, tok, raw[j], events)
                if s.done:
                    break
