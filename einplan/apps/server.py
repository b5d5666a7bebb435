"""An OpenAI-compatible HTTP server over a :class:`ServingEngine` (FastAPI on uvicorn; the
``einplan[serve]`` extra): ``/v1/completions``, ``/v1/chat/completions`` (the model's chat
template), ``/v1/models``, ``/health`` and ``/metrics`` (Prometheus text).

Streaming is server-sent events as the OpenAI clients parse them (``data: {json}`` chunks,
then ``data: [DONE]``). Errors are OpenAI's JSON shape, ``{"error": {"message", "type",
"param", "code"}}``, with the status saying whose fault it is: 400 bad request (and a prompt
longer than the context, code ``context_length_exceeded``), 401 without the API key, 404 an
unknown model, 413 a body over the limit, 503 when too many requests wait. A client that goes
away (disconnects mid-stream or while waiting) has its request cancelled at once.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from einplan.apps.chat import render_chat
from einplan.apps.serving import GenParams, Metrics, Output, QueueFull, ServingEngine
from einplan.errors import EinplanError
from einplan.runtime.batching import StepStats

MAX_BODY = 8 * 2**20  # bytes of a request body
MAX_LOGPROBS = 20


class ApiError(Exception):
    """An error answered as OpenAI's JSON with ``status``."""

    def __init__(
        self, status: int, message: str, kind: str = "invalid_request_error", param=None, code=None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = (
            status,
            message,
            kind,
            param,
            code,
        )

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


class PromMetrics(Metrics):
    """The engine's observations as Prometheus metrics in their own registry."""

    def __init__(self, engine_ref: list) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "einplan_requests",
            "HTTP requests by endpoint and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.finished = Counter(
            "einplan_finished_requests",
            "Generation requests ended, by reason",
            ["reason"],
            registry=r,
        )
        self.prompt_tokens = Counter("einplan_prompt_tokens", "Prompt tokens", registry=r)
        self.generation_tokens = Counter(
            "einplan_generation_tokens", "Generated tokens", registry=r
        )
        self.ttft_h = Histogram(
            "einplan_time_to_first_token_seconds",
            "Time to first token",
            registry=r,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
        )
        self.tpot_h = Histogram(
            "einplan_time_per_output_token_seconds",
            "Time between tokens of a request",
            registry=r,
            buckets=(0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56),
        )
        self.step_h = Histogram(
            "einplan_decode_step_seconds",
            "Time of one batched decode step",
            registry=r,
            buckets=(0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28),
        )
        self.batch_g = Gauge("einplan_decode_batch", "Rows in the last decode step", registry=r)
        self.drafted = Counter(
            "einplan_spec_draft_tokens", "Speculative decoding: tokens drafted", registry=r
        )
        self.accepted = Counter(
            "einplan_spec_accepted_tokens", "Speculative decoding: drafts kept", registry=r
        )
        self.acceptance = Gauge(
            "einplan_spec_acceptance_rate", "Share of drafted tokens kept, so far", registry=r
        )
        self.tokens_per_step = Gauge(
            "einplan_spec_tokens_per_step",
            "Tokens per target step per row, so far (the speed-up before the draft's cost)",
            registry=r,
        )
        self._rounds = 0
        queue = Gauge("einplan_queue_length", "Requests waiting for a lane", registry=r)
        running = Gauge("einplan_running_requests", "Requests in lanes or prefill", registry=r)
        queue.set_function(lambda: engine_ref[0].queue_length if engine_ref else 0)
        running.set_function(lambda: engine_ref[0].running if engine_ref else 0)

    def request_done(self, prompt_tokens: int, completion_tokens: int, reason: str) -> None:
        self.finished.labels(reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)

    def ttft(self, seconds: float) -> None:
        self.ttft_h.observe(seconds)

    def token_latency(self, seconds: float) -> None:
        self.tpot_h.observe(seconds)

    def step(self, stats: StepStats) -> None:
        if stats.decode_rows:
            self.step_h.observe(stats.decode_s)
            self.batch_g.set(stats.decode_rows)
        if stats.drafted:
            self.drafted.inc(stats.drafted)
            self.accepted.inc(stats.accepted)
            self._rounds += stats.decode_rows
            drafted, kept = self.drafted._value.get(), self.accepted._value.get()
            self.acceptance.set(kept / drafted)
            self.tokens_per_step.set((kept + self._rounds) / self._rounds)


# -- request parsing ----------------------------------------------------------------------
def _num(body: dict, name: str, default, lo, hi, integer: bool = False):
    value = body.get(name, default)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if not ok or isinstance(value, bool) or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        raise ApiError(400, f"'{name}' must be {kind} in [{lo}, {hi}], got {value!r}", param=name)
    return value


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4:
        return stop
    raise ApiError(400, "'stop' must be a string or a list of up to 4 strings", param="stop")


def _unsupported(body: dict) -> None:
    if _num(body, "n", 1, 1, 1_000_000, integer=True) != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    if body.get("best_of") not in (None, 1):
        raise ApiError(400, "only best_of=1 is supported", param="best_of")
    if body.get("echo"):
        raise ApiError(400, "echo is not supported", param="echo")
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise ApiError(400, f"'{name}' is not supported (give 0)", param=name)


class Server:
    """The FastAPI application over one engine."""

    def __init__(self, engine: ServingEngine, model: str, api_key: str | None = None) -> None:
        self.engine, self.model, self.api_key = engine, model, api_key
        self.created = int(time.time())
        self.app = self._build()

    # -- helpers --------------------------------------------------------------------------
    def _params(self, body: dict, prompt_len: int, default_max: int | None, max_name: str):
        _unsupported(body)
        model = body.get("model")
        if model is not None and model != self.model:
            raise ApiError(
                404,
                f"the model {model!r} does not exist; this server serves {self.model!r}",
                param="model",
                code="model_not_found",
            )
        ctx = self.engine.ctx
        if prompt_len >= ctx:
            raise ApiError(
                400,
                f"this model's context is {ctx} tokens; the prompt has {prompt_len}, which "
                "leaves no room to generate: shorten it",
                param="messages" if max_name == "max_completion_tokens" else "prompt",
                code="context_length_exceeded",
            )
        room = ctx - prompt_len
        max_tokens = body.get(max_name, body.get("max_tokens"))
        if max_tokens is None:
            max_tokens = default_max or room
        else:
            max_tokens = _num({"max_tokens": max_tokens}, "max_tokens", None, 1, 2**31, True)
        return GenParams(
            max_tokens=int(max_tokens),
            temperature=float(_num(body, "temperature", 1.0, 0.0, 2.0)),
            top_p=float(_num(body, "top_p", 1.0, 1e-9, 1.0)),
            top_k=int(_num(body, "top_k", 0, 0, 2**31, True)),
            seed=_num(body, "seed", None, -(2**63), 2**64, True),
            stop=_stops(body),
            ignore_eos=bool(body.get("ignore_eos", False)),
        )

    def token_text(self, token: int) -> str:
        """A token's text; a piece of a character shows as its vocabulary entry instead (so that
        distinct tokens stay distinct in a top-logprobs mapping)."""
        tk = self.engine.session.tokenizer
        if tk is None:
            return str(token)
        text = tk.decode([token], skip_special_tokens=False)
        return text if "\ufffd" not in text else (tk.id_to_token(token) or f"<{token}>")

    async def _body(self, request: Request) -> dict:
        raw = await request.body()
        if len(raw) > MAX_BODY:
            raise ApiError(413, f"request body of {len(raw)} bytes is over {MAX_BODY}")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    def _submit(self, ids: list[int], params: GenParams):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Output] = asyncio.Queue()

        def on_output(out: Output) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, out)

        try:
            req = self.engine.submit(ids, params, on_output)
        except QueueFull as e:
            raise ApiError(503, str(e), kind="server_error", code="server_overloaded") from None
        except EinplanError as e:
            raise ApiError(400, str(e)) from None
        return req, queue

    async def _collect(self, request: Request, req, queue) -> tuple[list[Output], str]:
        outs: list[Output] = []
        try:
            while True:
                try:
                    out = await asyncio.wait_for(queue.get(), 0.5)
                except TimeoutError:
                    if await request.is_disconnected():
                        self.engine.cancel(req)
                        raise ApiError(499, "client disconnected") from None
                    continue
                outs.append(out)
                if out.error:
                    raise ApiError(500, out.error, kind="server_error")
                if out.finish_reason:
                    return outs, out.finish_reason
        except asyncio.CancelledError:
            self.engine.cancel(req)
            raise

    def _logprobs_completion(self, outs: list[Output]) -> dict:
        tokens, lps, tops, offsets, at = [], [], [], [], 0
        for o in outs:
            for tok, lp, top in o.logprobs:
                text = self.token_text(tok)
                tokens.append(text)
                lps.append(lp)
                tops.append({self.token_text(t): v for t, v in (top or [])})
                offsets.append(at)
                at += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": lps,
            "top_logprobs": tops,
            "text_offset": offsets,
        }

    def _logprobs_chat(self, outs: list[Output]) -> dict:
        content = []
        for o in outs:
            for tok, lp, top in o.logprobs:
                text = self.token_text(tok)
                content.append(
                    {
                        "token": text,
                        "logprob": lp,
                        "bytes": list(text.encode()),
                        "top_logprobs": [
                            {
                                "token": self.token_text(t),
                                "logprob": v,
                                "bytes": list(self.token_text(t).encode()),
                            }
                            for t, v in (top or [])
                        ],
                    }
                )
        return {"content": content}

    # -- endpoints ------------------------------------------------------------------------
    async def completions(self, request: Request):
        body = await self._body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt:
                raise ApiError(400, "'prompt' is empty", param="prompt")
            ids = self.engine.encode(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            try:
                ids = self.engine.encode(prompt)
            except EinplanError as e:
                raise ApiError(400, str(e), param="prompt") from None
        else:
            raise ApiError(
                400,
                "'prompt' must be a non-empty string or list of token ids (one prompt)",
                param="prompt",
            )
        params = self._params(body, len(ids), 16, "max_tokens")
        lp = _num(body, "logprobs", None, 0, MAX_LOGPROBS, integer=True)
        if lp is not None:
            params = GenParams(**{**params.__dict__, "logprobs": lp})
        return await self._respond(request, body, ids, params, chat=False)

    async def chat(self, request: Request):
        body = await self._body(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list", param="messages")
        clean = []
        for m in messages:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise ApiError(400, "each message needs a 'role' and 'content'", param="messages")
            content = m.get("content", "")
            if isinstance(content, list):  # content parts: keep the text ones
                if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                    raise ApiError(400, "only text content parts are supported", param="messages")
                content = "".join(str(p.get("text", "")) for p in content)
            if content is None:
                content = ""
            if not isinstance(content, str):
                raise ApiError(400, "message content must be text", param="messages")
            clean.append({"role": m["role"], "content": content})
        session = self.engine.session
        if session.tokenizer is None:
            raise ApiError(400, "chat needs a tokenizer; this server has none")
        try:
            text = render_chat(session.tokenizer_config, clean)
        except EinplanError as e:
            raise ApiError(400, str(e), param="messages") from None
        ids = self.engine.encode(text, special=False)
        params = self._params(body, len(ids), None, "max_completion_tokens")
        if body.get("logprobs"):
            top = _num(body, "top_logprobs", 0, 0, MAX_LOGPROBS, integer=True)
            params = GenParams(**{**params.__dict__, "logprobs": top})
        return await self._respond(request, body, ids, params, chat=True)

    async def _respond(self, request: Request, body: dict, ids, params: GenParams, chat: bool):
        req, queue = self._submit(ids, params)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        head = {"id": rid, "object": kind, "created": created, "model": self.model}
        if body.get("stream"):
            opts = body.get("stream_options") or {}
            usage_wanted = isinstance(opts, dict) and bool(opts.get("include_usage"))
            gen = self._stream(req, queue, head, chat, len(ids), usage_wanted, params)
            return StreamingResponse(gen, media_type="text/event-stream")
        outs, reason = await self._collect(request, req, queue)
        text = "".join(o.text for o in outs)
        n = sum(len(o.tokens) for o in outs)
        usage = {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}
        choice: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
            if params.logprobs is not None:
                choice["logprobs"] = self._logprobs_chat(outs)
        else:
            choice["text"] = text
            if params.logprobs is not None:
                choice["logprobs"] = self._logprobs_completion(outs)
        return JSONResponse({**head, "choices": [choice], "usage": usage})

    async def _stream(self, req, queue, head, chat, prompt_tokens, usage_wanted, params):
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

        def event(obj: dict) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        def chunk(delta_text: str | None, reason, outs: list[Output] | None) -> dict:
            choice: dict[str, Any] = {"index": 0, "finish_reason": reason, "logprobs": None}
            if chat:
                choice["delta"] = {} if delta_text is None else {"content": delta_text}
                if outs and params.logprobs is not None:
                    choice["logprobs"] = self._logprobs_chat(outs)
            else:
                choice["text"] = delta_text or ""
                if outs and params.logprobs is not None:
                    choice["logprobs"] = self._logprobs_completion(outs)
            return {**head, "choices": [choice]}

        finished, n = False, 0
        try:
            if chat:
                first = {"index": 0, "delta": {"role": "assistant", "content": ""}}
                yield event(
                    {**head, "choices": [{**first, "finish_reason": None, "logprobs": None}]}
                )
            while True:
                out = await queue.get()
                if out.error:
                    finished = True
                    yield event(ApiError(500, out.error, kind="server_error").body())
                    break
                n += len(out.tokens)
                if out.finish_reason:
                    finished = True
                    if out.text or out.logprobs:
                        yield event(chunk(out.text, None, [out]))
                    yield event(chunk(None if chat else "", out.finish_reason, None))
                    break
                if out.text or (out.logprobs and params.logprobs is not None):
                    yield event(chunk(out.text, None, [out]))
            if usage_wanted:
                usage = {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": n,
                    "total_tokens": prompt_tokens + n,
                }
                yield event({**head, "choices": [], "usage": usage})
            yield "data: [DONE]\n\n"
        finally:
            if not finished:  # the client went away: free its lane now
                self.engine.cancel(req)

    # -- the app --------------------------------------------------------------------------
    def _build(self) -> FastAPI:
        app = FastAPI(title="einplan", docs_url=None, redoc_url=None, openapi_url=None)
        metrics = self.engine.metrics
        counter = getattr(metrics, "requests", None)

        @app.middleware("http")
        async def guard(request: Request, call_next):
            path = request.url.path
            if self.api_key and path.startswith("/v1"):
                auth = request.headers.get("authorization", "")
                given = auth[7:] if auth.lower().startswith("bearer ") else ""
                if not hmac.compare_digest(given.encode(), self.api_key.encode()):
                    response = error_response(
                        ApiError(
                            401,
                            "invalid or missing API key (Authorization: Bearer KEY)",
                            code="invalid_api_key",
                        )
                    )
                    if counter is not None:
                        counter.labels(path, "401").inc()
                    return response
            try:
                response = await call_next(request)
            except ApiError as e:
                response = error_response(e)
            if counter is not None and path.startswith("/v1"):
                counter.labels(path, str(response.status_code)).inc()
            return response

        @app.exception_handler(ApiError)
        async def api_error(request: Request, e: ApiError):
            return error_response(e)

        @app.exception_handler(StarletteHTTPException)
        async def http_error(request: Request, e: StarletteHTTPException):
            return error_response(ApiError(e.status_code, str(e.detail)))

        @app.get("/health")
        async def health():
            return {"status": "ok"}

        @app.get("/metrics")
        async def prometheus():
            registry = getattr(metrics, "registry", None)
            if registry is None:
                return PlainTextResponse("")
            return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

        @app.get("/v1/models")
        async def models():
            card = {
                "id": self.model,
                "object": "model",
                "created": self.created,
                "owned_by": "einplan",
                "max_model_len": self.engine.ctx,
            }
            return {"object": "list", "data": [card]}

        app.post("/v1/completions")(self.completions)
        app.post("/v1/chat/completions")(self.chat)
        return app


def create_app(
    session,
    model: str = "einplan",
    *,
    max_batch: int = 8,
    ctx: int | None = None,
    max_queue: int = 64,
    api_key: str | None = None,
    chunk: int = 256,
    draft=None,
    draft_tokens: int = 4,
) -> tuple[FastAPI, ServingEngine]:
    """The app and its engine (started) for a session (and a ``draft`` session for
    speculative decoding); stop the engine when done."""
    ref: list = []
    metrics = PromMetrics(ref)
    engine = ServingEngine(session, max_batch, ctx, max_queue, chunk, metrics, draft, draft_tokens)
    ref.append(engine)
    server = Server(engine.start(), model, api_key)
    return server.app, engine


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the app with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=2)
