"""The OpenAI-compatible server: the openai client against a live uvicorn on a free local port
(tiny config, random weights, byte tokenizer), and the continuous-batching engine under it."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

import einplan  # noqa: E402
from einplan.runtime.batching import BatchEngine, Sequence  # noqa: E402
from einplan.runtime.sampling import SamplingConfig  # noqa: E402

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
KEY = "sekret"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, polls: int = 1000) -> bool:
    """Poll ``condition`` (every 20 ms, a bounded number of times) until it holds: waiting on
    another thread's state, not a claim about speed."""
    for _ in range(polls):
        if condition():
            return True
        time.sleep(0.02)
    return condition()


class LiveServer:
    """uvicorn serving an app in a thread."""

    def __init__(self, app) -> None:
        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        assert wait_for(lambda: self.server.started), "server did not start"
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def session():
    plan = einplan.compile_model("tiny")
    s = einplan.Session(plan, random_seed=0, tokenizer="bytes")
    s.tokenizer_config = {"chat_template": TEMPLATE}
    return s


@pytest.fixture(scope="module")
def live(session):
    app, engine = einplan.api.create_server(session, "tiny", max_batch=4, ctx=256, chunk=32)
    server = LiveServer(app)
    yield server, engine
    server.close()
    engine.stop()


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live[0].url + "/v1", api_key="x", max_retries=0)


def reference(session, prompt, n, **kw):
    g = session.generate(prompt, n, ctx=256, **kw)
    return g.texts[0], g.stop_reasons[0]


def test_models_and_health(live, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(live[0].url + "/health").json() == {"status": "ok"}


def test_greedy_completion_equals_session_generate(session, client):
    r = client.completions.create(model="tiny", prompt="Hello there", max_tokens=12, temperature=0)
    text, _ = reference(session, "Hello there", 12)
    assert r.choices[0].text == text
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len("Hello there") and r.usage.completion_tokens == 12


def test_seeded_sampling_equals_session_generate(session, client):
    kw = dict(temperature=0.9, top_p=0.8, seed=7)
    r = client.completions.create(model="tiny", prompt="abc", max_tokens=10, **kw)
    assert r.choices[0].text == reference(session, "abc", 10, **kw)[0]


def test_negative_seed_and_defaults(client):
    r = client.completions.create(model="tiny", prompt="s", max_tokens=3, seed=-5)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


def test_streaming_completion(session, client):
    chunks = list(
        client.completions.create(
            model="tiny", prompt="Stream me", max_tokens=10, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == reference(session, "Stream me", 10)[0]
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_and_chat_stream(session, client):
    messages = [{"role": "user", "content": "Hi"}]
    prompt = einplan.api.render_chat(session.tokenizer_config, messages)
    text, _ = reference(session, session.tokenizer.encode(prompt).ids, 9)
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=9, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text
    stream = client.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=9,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.completion_tokens == 9


def test_stop_string(session, client):
    full, _ = reference(session, "Stop here", 20)
    stop = full[5:7]
    cut = full[: full.index(stop)]
    r = client.completions.create(
        model="tiny", prompt="Stop here", max_tokens=20, temperature=0, stop=[stop]
    )
    assert (r.choices[0].text, r.choices[0].finish_reason) == (cut, "stop")
    assert reference(session, "Stop here", 20, stop=[stop]) == (cut, "stop")
    chunks = client.completions.create(
        model="tiny", prompt="Stop here", max_tokens=20, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in chunks) == cut


def test_logprobs(client):
    r = client.completions.create(
        model="tiny", prompt="log", max_tokens=4, temperature=0, logprobs=3
    )
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == 4 and all(len(t) == 3 for t in lp.top_logprobs)
    for value, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert value == pytest.approx(max(top.values())) and value <= 0
    c = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "x"}],
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    assert len(c.choices[0].logprobs.content) == 3
    assert len(c.choices[0].logprobs.content[0].top_logprobs) == 2


def test_concurrent_requests_equal_one_at_a_time(session, live):
    url = live[0].url + "/v1/completions"
    prompts = [f"prompt {i} " * (1 + 3 * i) for i in range(6)]
    results: dict[int, str] = {}

    def ask(i):
        body = {"model": "tiny", "prompt": prompts[i], "max_tokens": 8 + 5 * i, "temperature": 0}
        results[i] = httpx.post(url, json=body, timeout=60).json()["choices"][0]["text"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, p in enumerate(prompts):
        assert results[i] == reference(session, p, 8 + 5 * i)[0]


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        ({"prompt": "x", "temperature": 9}, 400, "temperature"),
        ({"prompt": "x", "n": 2}, 400, "n=1"),
        ({"prompt": ""}, 400, "empty"),
        ({"prompt": [1, 999]}, 400, "token ids"),
        ({"prompt": "x" * 300}, 400, "context"),
        ({"prompt": "x", "model": "other"}, 404, "does not exist"),
        ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ({"prompt": "x", "stop": 5}, 400, "stop"),
    ],
)
def test_errors_are_openai_json(live, body, status, fragment):
    url = live[0].url + "/v1/completions"
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(url, content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert fragment in err["message"] and {"type", "param", "code"} <= set(err)


def test_body_over_the_limit_is_413(live):
    r = httpx.post(live[0].url + "/v1/completions", content=b" " * (9 * 2**20), timeout=60)
    assert r.status_code == 413 and "over" in r.json()["error"]["message"]


def test_context_error_through_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt="y" * 400, max_tokens=2)
    assert e.value.code == "context_length_exceeded"


def test_chat_errors(live):
    url = live[0].url + "/v1/chat/completions"
    assert httpx.post(url, json={"messages": []}).status_code == 400
    assert httpx.post(url, json={"messages": [{"content": "x"}]}).status_code == 400
    assert httpx.get(live[0].url + "/v1/nothing").json()["error"]["message"]


def test_api_key_and_full_queue(session):
    app, engine = einplan.api.create_server(session, "tiny", api_key=KEY, max_queue=0, ctx=64)
    server = LiveServer(app)
    try:
        good = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)
        bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        assert httpx.post(server.url + "/v1/completions", json={}).status_code == 401
        assert httpx.get(server.url + "/health").status_code == 200
        assert good.models.list().data[0].id == "tiny"
        with pytest.raises(openai.InternalServerError) as e:  # 503: nothing may wait
            good.completions.create(model="tiny", prompt="x", max_tokens=2)
        assert e.value.status_code == 503
    finally:
        server.close()
        engine.stop()


def test_disconnect_frees_the_lane(live):
    server, engine = live
    body = {"model": "tiny", "prompt": "long", "max_tokens": 200, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    wait_for(lambda: not engine.running)
    assert engine.running == 0 and engine.queue_length == 0
    # and the server keeps serving
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "ok", "max_tokens": 2})
    assert r.status_code == 200


def test_metrics(live, client):
    client.completions.create(model="tiny", prompt="m", max_tokens=3)
    text = httpx.get(live[0].url + "/metrics").text
    for name in (
        "einplan_time_to_first_token_seconds_bucket",
        "einplan_time_per_output_token_seconds_count",
        "einplan_generation_tokens_total",
        "einplan_queue_length",
        "einplan_requests_total",
    ):
        assert name in text


def test_batch_engine_lanes_match_generate_with_compaction(session):
    """Rows that join and leave, prefilled in chunks, the cache compacted when full: each row
    gets exactly the tokens a lone Session.generate gives (seeded sampling included)."""
    engine = BatchEngine(session.plan, session.weights, max_batch=3, ctx=80, chunk=16)
    prompts = ["Hello world, a longer prompt here.", "Hi", "abc def", "x" * 40, "fox"]
    seqs = []
    for i, p in enumerate(prompts):
        sampling = SamplingConfig(0.8 if i % 2 else 0.0, 0, 0.9, 1.0, i)
        seqs.append(Sequence(session.tokenizer.encode(p).ids, 20 + 9 * i, sampling))
        engine.add(seqs[-1])
    while not engine.idle:
        engine.step()
    for i, (p, s) in enumerate(zip(prompts, seqs, strict=True)):
        g = session.generate(
            p, 20 + 9 * i, temperature=0.8 if i % 2 else 0.0, top_p=0.9, seed=i, ctx=80
        )
        assert (s.new, s.finish_reason) == (g.tokens[0], g.stop_reasons[0])


def test_speculative_server_greedy_equals_plain(session):
    """--draft: lanes draft and verify together; greedy text is plain decoding's."""
    from einplan.api import ENTRIES

    target = einplan.Session(
        einplan.compile_model("tiny", entries=(*ENTRIES, "verify")),
        random_seed=0,
        tokenizer="bytes",
    )
    draft = einplan.Session(einplan.compile_model("tiny"), random_seed=1, tokenizer="bytes")
    app, engine = einplan.api.create_server(
        target, "tiny", max_batch=2, ctx=96, chunk=16, draft=draft, draft_tokens=3
    )
    server = LiveServer(app)
    try:
        url = server.url + "/v1/completions"
        prompts = ["one two three", "four", "a much longer prompt than the others, surely", "z"]
        results: dict[int, str] = {}

        def ask(i):
            body = {"prompt": prompts[i], "max_tokens": 10 + 7 * i, "temperature": 0}
            results[i] = httpx.post(url, json=body, timeout=120).json()["choices"][0]["text"]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, p in enumerate(prompts):
            assert results[i] == session.generate(p, 10 + 7 * i, ctx=96).texts[0]
        text = httpx.get(server.url + "/metrics").text
        assert "einplan_spec_acceptance_rate" in text and engine.batch.drafted > 0
    finally:
        server.close()
        engine.stop()


def test_long_prompt_does_not_block_short_ones(session):
    """A long prompt is prefilled a chunk a step; a short one that comes after it gets its
    first token in its first step, and rows decode meanwhile. Cancelling frees everything."""
    engine = BatchEngine(session.plan, session.weights, max_batch=4, ctx=256, chunk=16)
    long = Sequence(list(range(1, 150)), 5)
    short = Sequence([5, 6, 7], 5)
    engine.add(long)
    engine.step()  # the long prompt's first chunk
    engine.add(short)
    events, stats = engine.step()
    assert [e.seq for e in events] == [short] and long.new == []
    events, stats = engine.step()
    assert stats.decode_rows == 1 and len(short.new) == 2
    engine.cancel(long)
    assert engine.long_job is None
    while not engine.idle:
        engine.step()
    assert short.finish_reason == "length" and long.finish_reason == "cancelled"
    assert engine.running == 0 and engine.cursor == 0
