"""The serving engine: one thread owns the plan and runs the continuous-batching loop
(:class:`einplan.runtime.batching.BatchEngine`); requests from any thread join it with
:meth:`ServingEngine.submit` and receive their text as it is made, through a callback called
on the engine's thread. Text, stop strings and timing live here; the server
(:mod:`einplan.apps.server`) turns them into HTTP."""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from einplan.apps.session import Session, check_same_tokenizer
from einplan.errors import EinplanError
from einplan.runtime.batching import BatchEngine, StepStats, TokenEvent
from einplan.runtime.batching import Sequence as Seq
from einplan.runtime.sampling import SamplingConfig
from einplan.runtime.spec_batching import SpecBatchEngine

log = logging.getLogger("einplan.serve")


class QueueFull(EinplanError):
    """Too many requests wait for a lane."""


@dataclass(frozen=True)
class GenParams:
    """What one request asks for."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: Sequence[str] = ()
    logprobs: int | None = None
    ignore_eos: bool = False


@dataclass
class Output:
    """A piece of a request's result, given to its callback: new text (may be empty), the
    tokens behind it, their log-probabilities, and the finish reason on the last one."""

    text: str
    tokens: list[int] = field(default_factory=list)
    logprobs: list[tuple[int, float, list[tuple[int, float]] | None]] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (EOS or a stop string), "length", "cancelled"
    error: str | None = None


FINISH = {"eos": "stop", "stop": "stop", "length": "length", "context": "length"}


class StopText:
    """A row's text as it grows: what may be shown now (never a half character, never the
    start of what may become a stop string) and whether a stop string has appeared."""

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str]) -> None:
        self.decode, self.stops = decode, [s for s in stops if s]
        self.shown = 0
        self.stopped = False

    def push(self, ids: list[int], final: bool = False) -> str:
        text = self.decode(ids)
        cut = min((text.find(s) for s in self.stops if s in text), default=-1)
        if cut >= 0:
            self.stopped = True
            end = cut
        elif final:
            end = len(text)
        else:
            end = len(text)
            if text.endswith("\ufffd"):
                end = len(text.rstrip("\ufffd"))
            for s in self.stops:  # hold back a tail that may be the start of a stop string
                for k in range(min(len(s) - 1, end), 0, -1):
                    if text[:end].endswith(s[:k]):
                        end = min(end, len(text[:end]) - k)
                        break
        piece = text[self.shown : end] if end > self.shown else ""
        self.shown = max(self.shown, end)
        return piece


class Metrics:
    """Observation hooks (no-ops); the server passes one that feeds Prometheus."""

    def request_done(self, prompt_tokens: int, completion_tokens: int, reason: str) -> None:
        pass

    def ttft(self, seconds: float) -> None:
        pass

    def token_latency(self, seconds: float) -> None:
        pass

    def step(self, stats: StepStats) -> None:
        pass


@dataclass(eq=False)
class Request:
    """A request in the engine: its sequence, text state and callback."""

    seq: Seq
    params: GenParams
    on_output: Callable[[Output], None]
    text: StopText | None
    last_token_s: float = 0.0


class ServingEngine:
    """Continuous batching over a session's plan on one background thread."""

    def __init__(
        self,
        session: Session,
        max_batch: int = 8,
        ctx: int | None = None,
        max_queue: int = 64,
        chunk: int = 256,
        metrics: Metrics | None = None,
        draft: Session | None = None,
        draft_tokens: int = 4,
    ) -> None:
        """``draft``: a small session of the same tokenizer for speculative decoding (the
        session's plan needs the verify entry), proposing ``draft_tokens`` a step."""
        self.session = session
        if draft is not None:
            check_same_tokenizer(session, draft)
            self.batch: BatchEngine = SpecBatchEngine(
                session.plan,
                session.weights,
                draft.plan,
                draft.weights,
                draft_tokens,
                max_batch=max_batch,
                ctx=ctx,
                workers=session.workers,
                chunk=chunk,
            )
        else:
            self.batch = BatchEngine(
                session.plan, session.weights, max_batch, ctx, session.workers, chunk
            )
        self.ctx = self.batch.ctx
        self.max_queue = max_queue
        self.metrics = metrics or Metrics()
        self._lock = threading.Condition()
        self._inbox: list[Request] = []
        self._cancels: list[Request] = []
        self._requests: dict[int, Request] = {}
        self._stop = False
        self._thread: threading.Thread | None = None

    # -- life ------------------------------------------------------------------------------
    def start(self) -> ServingEngine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="einplan-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    @property
    def cache_bytes(self) -> int:
        """Bytes of the KV caches (lanes and prompt caches, the draft's too)."""
        engines = [self.batch, getattr(self.batch, "draft", None)]
        return sum(
            a.nbytes
            for e in engines
            if e is not None
            for c in (e.cache, e.short_cache, e.long_cache)
            for a in c.values()
        )

    @property
    def queue_length(self) -> int:
        """Requests waiting for a lane."""
        return len(self._inbox) + len(self.batch.waiting)

    @property
    def running(self) -> int:
        return self.batch.running

    # -- requests --------------------------------------------------------------------------
    def encode(self, prompt: str | list[int], special: bool = True) -> list[int]:
        """Token ids of a prompt (text, or ids checked against the vocabulary)."""
        if isinstance(prompt, str):
            if self.session.tokenizer is None:
                raise EinplanError("text prompts need a tokenizer; this server has none")
            return self.session.tokenizer.encode(prompt, add_special_tokens=special).ids
        vocab = self.session.config.vocab_size
        if any(not isinstance(t, int) or t < 0 or t >= vocab for t in prompt):
            raise EinplanError(f"token ids must be integers in 0..{vocab - 1}")
        return list(prompt)

    def submit(
        self, ids: list[int], params: GenParams, on_output: Callable[[Output], None]
    ) -> Request:
        """Queue a request (EinplanError when it cannot run, QueueFull when too many wait);
        ``on_output`` is called on the engine thread with each piece of its result."""
        seed = params.seed % 2**64 if params.seed is not None else random.getrandbits(63)
        sampling = SamplingConfig(params.temperature, params.top_k, params.top_p, 1.0, seed)
        eos = () if params.ignore_eos else self.session.eos_ids
        seq = Seq(ids, params.max_tokens, sampling, eos, params.logprobs)
        self.batch.check(seq)
        has_text = self.session.tokenizer is not None
        if params.stop and not has_text:
            raise EinplanError("stop strings need a tokenizer; this server has none")
        text = StopText(self.session.decode, params.stop) if has_text else None
        req = Request(seq, params, on_output, text)
        with self._lock:
            if self._stop:
                raise QueueFull("the server is shutting down")
            if self.queue_length >= self.max_queue:
                raise QueueFull(
                    f"{self.queue_length} requests are waiting (the limit is {self.max_queue}); "
                    "retry later"
                )
            self._inbox.append(req)
            self._lock.notify_all()
        return req

    def cancel(self, req: Request) -> None:
        """Drop a request (its client went away): its lane is freed before the next step."""
        with self._lock:
            self._cancels.append(req)
            self._lock.notify_all()

    # -- the loop --------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not self._inbox and not self._cancels and self.batch.idle:
                    self._lock.wait(0.5)
                if self._stop:
                    break
                inbox, self._inbox = self._inbox, []
                cancels, self._cancels = self._cancels, []
            for req in inbox:
                self._requests[req.seq.id] = req
                self.batch.add(req.seq)
            for req in cancels:
                if not req.seq.done:
                    self.batch.cancel(req.seq)
                    self._finish(req, "cancelled")
            if self.batch.idle:
                continue
            try:
                events, stats = self.batch.step()
            except Exception as e:  # keep serving: fail the requests in flight
                log.exception("engine step failed")
                self._fail_all(f"internal error: {e}")
                continue
            self.metrics.step(stats)
            for event in events:
                self._deliver(event)
        self._fail_all("the server is shutting down")

    def _fail_all(self, message: str) -> None:
        for req in list(self._requests.values()):
            if not req.seq.done:
                self.batch.cancel(req.seq, "error")
            self._requests.pop(req.seq.id, None)
            self._send(req, Output("", finish_reason="error", error=message))
        with self._lock:
            inbox, self._inbox = self._inbox, []
        for req in inbox:
            self._send(req, Output("", finish_reason="error", error=message))

    def _send(self, req: Request, out: Output) -> None:
        try:
            req.on_output(out)
        except Exception:  # a callback of a gone client must not stop the engine
            log.exception("output callback failed")

    def _deliver(self, event: TokenEvent) -> None:
        req = self._requests.get(event.seq.id)
        if req is None:
            return
        seq, now = event.seq, time.perf_counter()
        if req.last_token_s == 0.0:
            self.metrics.ttft(now - seq.submitted_s)
        else:
            self.metrics.token_latency(now - req.last_token_s)
        req.last_token_s = now
        out = Output("")
        if event.token is not None:
            out.tokens = [event.token]
            if event.logprob is not None:
                out.logprobs = [(event.token, event.logprob, event.top)]
            if req.text is not None:
                out.text = req.text.push(seq.new, final=seq.done)
                if req.text.stopped and not seq.done:
                    self.batch.cancel(seq, "stop")
        if seq.done:
            out.finish_reason = FINISH.get(seq.finish_reason, seq.finish_reason)
            if req.text is not None and req.text.stopped:
                out.finish_reason = "stop"
            if req.text is not None and not req.text.stopped and seq.finish_reason == "eos":
                out.text += req.text.push(seq.new, final=True)
            self._requests.pop(seq.id, None)
            self.metrics.request_done(len(seq.prompt), len(seq.new), out.finish_reason)
        self._send(req, out)

    def _finish(self, req: Request, reason: str) -> None:
        self._requests.pop(req.seq.id, None)
        self.metrics.request_done(len(req.seq.prompt), len(req.seq.new), reason)
        self._send(req, Output("", finish_reason=reason))

    # -- for callers without a thread of their own -----------------------------------------
    def generate(self, prompt: str | list[int], params: GenParams) -> tuple[str, Output]:
        """Run one request to its end (blocking); its text and last output."""
        done = threading.Event()
        parts: list[str] = []
        last: list[Output] = []

        def collect(out: Output) -> None:
            parts.append(out.text)
            if out.finish_reason:
                last.append(out)
                done.set()

        self.submit(self.encode(prompt), params, collect)
        done.wait()
        return "".join(parts), last[0]
