"""``edge-prism serve``: the OpenAI HTTP API.

A real server runs in a subprocess on a free loopback port, over a tiny random llama
checkpoint (synthetic: replies are gibberish, but greedy replies are exact), and is driven
by the official ``openai`` client and by raw HTTP (httpx). Its replies are compared with
the in-process Engine on the same prompts. The worker's per-request runtime options and
the stop-sequence filter are tested in-process with fakes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

import edge_prism  # noqa: E402
from edge_prism.serve import GenerationRequest, Metrics, RequestError, ServeConfig, StopFilter, Worker  # noqa: E402

CONTEXT = 4096  # room for a long generation that holds the engine while a test acts
QUEUE = 4
LONG = CONTEXT - 96  # max_tokens of a request that runs until its client leaves
READY = re.compile(r"serving (\S+) at (http://\S+)/v1 ")
HELLO = [{"role": "user", "content": "Hello there"}]
CHAT = "/v1/chat/completions"


class Server(SimpleNamespace):
    """A running ``edge-prism serve``: ``url``, ``model`` (its id), ``proc``, ``log`` (stderr file)."""

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30, **kw)

    def post(self, path: str, body, **kw) -> httpx.Response:
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        return httpx.post(self.url + path, content=data, timeout=60,
                          headers={"content-type": "application/json"}, **kw)

    def metrics(self) -> dict[str, float]:
        text = self.get("/metrics").text
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
                for line in text.splitlines() if line and not line.startswith("#")}

    def client(self) -> "openai.OpenAI":
        # No retries: a 503 must show up as one, not as a slow success.
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def start_server(model: Path, log_path: Path, *args: str) -> Server:
    """Start the server on a port the OS picks and wait until /health answers."""
    cmd = [sys.executable, "-m", "edge_prism.cli", "serve", "-m", str(model), "--port", "0", *args]
    log = open(log_path, "w+")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 120
    try:
        while True:
            found = READY.search(log_path.read_text())
            if found:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the server did not start:\n{log_path.read_text()}")
            time.sleep(0.1)
        server = Server(url=found.group(2), model=found.group(1), proc=proc, log=log_path)
        while True:
            try:
                if server.get("/health").status_code == 200:
                    return server
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"/health never answered:\n{log_path.read_text()}")
            time.sleep(0.1)
    except BaseException:
        stop_server(proc)
        raise
    finally:
        log.close()


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint) -> Path:
    return tiny_checkpoint("llama", max_position_embeddings=CONTEXT)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    srv = start_server(model_dir, tmp_path_factory.mktemp("serve") / "server.log", "--queue-size", str(QUEUE))
    try:
        yield srv
    finally:
        stop_server(srv.proc)
    assert "Traceback" not in srv.log.read_text(), srv.log.read_text()


@pytest.fixture(scope="module")
def engine(model_dir):
    """The same checkpoint in-process: what each reply must equal."""
    return edge_prism.load(model_dir)


def chat_ref(engine, messages, n: int) -> str:
    engine.reset()  # a fresh cache, so the reference never depends on test order
    return engine.chat(messages, max_new_tokens=n, temperature=0)


def wait_idle(server: Server, timeout: float = 30) -> dict[str, float]:
    """The metrics once no request runs or waits."""
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        if (m["edge_prism_busy"], m["edge_prism_queue_length"]) == (0, 0) or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


# -- the openai client -------------------------------------------------------------------------
def test_models_and_health(server):
    client = server.client()
    ids = [m.id for m in client.models.list().data]
    assert ids == [server.model] == [client.models.retrieve(server.model).id]
    health = server.get("/health").json()
    assert health["status"] == "ok" and health["model"] == server.model


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_chat_equals_the_engine(server, engine, stream):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a prime."}]
    expected = chat_ref(engine, messages, 20)
    client = server.client()
    if stream:
        chunks = list(client.chat.completions.create(model=server.model, messages=messages, max_tokens=20,
                                                     temperature=0, stream=True,
                                                     stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        usage = chunks[-1].usage
    else:
        reply = client.chat.completions.create(model=server.model, messages=messages, max_tokens=20, temperature=0)
        text, finish, usage = reply.choices[0].message.content, [reply.choices[0].finish_reason], reply.usage
        assert reply.choices[0].message.role == "assistant"
    assert text == expected
    assert finish == ["length"]  # a random model never ends a reply: it ran out of max_tokens
    assert usage.completion_tokens == 20
    assert usage.prompt_tokens == len(engine.tokenizer.encode_chat(messages))


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_completion_equals_the_engine(server, engine, stream):
    engine.reset()
    expected = engine.generate("Once upon a time", max_new_tokens=12, temperature=0)
    client = server.client()
    if stream:
        text = "".join(c.choices[0].text for c in client.completions.create(
            model=server.model, prompt="Once upon a time", max_tokens=12, temperature=0, stream=True))
    else:
        reply = client.completions.create(model=server.model, prompt="Once upon a time", max_tokens=12,
                                          temperature=0)
        text = reply.choices[0].text
        assert reply.usage.completion_tokens == 12 and reply.choices[0].finish_reason == "length"
    assert text == expected


def test_follow_up_turn_reuses_the_cache(server, engine):
    client = server.client()
    first = client.chat.completions.create(model=server.model, messages=HELLO, max_tokens=8, temperature=0)
    history = HELLO + [{"role": "assistant", "content": first.choices[0].message.content},
                       {"role": "user", "content": "And then?"}]
    before = server.metrics()["edge_prism_reused_prompt_tokens_total"]
    second = client.chat.completions.create(model=server.model, messages=history, max_tokens=8, temperature=0)
    reused = server.metrics()["edge_prism_reused_prompt_tokens_total"] - before
    assert reused >= first.usage.prompt_tokens  # the first turn's prompt was not prefilled again
    assert second.choices[0].message.content == chat_ref(engine, history, 8)


def test_stop_sequence_cuts_the_reply(server, engine):
    full = chat_ref(engine, HELLO, 24)
    stop = full[6:8]
    assert stop and full.find(stop) > 0, full
    reply = server.client().chat.completions.create(model=server.model, messages=HELLO, max_tokens=24,
                                                    temperature=0, stop=[stop])
    assert reply.choices[0].message.content == full[:full.find(stop)]
    assert reply.choices[0].finish_reason == "stop"


def test_seeded_sampling_repeats(server):
    client = server.client()
    replies = {client.chat.completions.create(model=server.model, messages=HELLO, max_tokens=10,
                                              temperature=0.9, top_p=0.9, seed=7).choices[0].message.content
               for _ in range(2)}
    assert len(replies) == 1


def test_concurrent_clients_get_their_own_replies(server, engine):
    prompts = [f"Tell me about {w}" for w in ("cats", "rivers", "the moon", "tea")]
    expected = [chat_ref(engine, [{"role": "user", "content": p}], 16) for p in prompts]
    got: list[str | None] = [None] * len(prompts)

    def ask(i: int) -> None:
        messages = [{"role": "user", "content": prompts[i]}]
        client = server.client()
        if i % 2:  # half streamed, half not
            got[i] = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                model=server.model, messages=messages, max_tokens=16, temperature=0, stream=True))
        else:
            got[i] = client.chat.completions.create(model=server.model, messages=messages, max_tokens=16,
                                                    temperature=0).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got == expected


# -- the queue and disconnects ------------------------------------------------------------------
@contextlib.contextmanager
def long_stream(server: Server) -> Iterator[Iterator[str]]:
    """A streamed request that runs while the block runs, its first token already received;
    yields the rest of its lines."""
    body = {"messages": HELLO, "max_tokens": LONG, "temperature": 0, "stream": True}
    with httpx.Client(timeout=60) as client, client.stream("POST", server.url + CHAT, json=body) as response:
        assert response.status_code == 200
        lines = response.iter_lines()  # kept open: dropping it would close the connection
        while '"content":""' in next(line for line in lines if line.startswith("data: ")):
            pass  # the role chunk; the next data line carries a token
        yield lines
    # leaving closes the connection: the client is gone mid-reply


def test_disconnect_stops_the_generation(server, engine):
    before = wait_idle(server)
    with long_stream(server):
        pass
    after = wait_idle(server)
    assert after["edge_prism_requests_cancelled_total"] == before["edge_prism_requests_cancelled_total"] + 1
    assert after["edge_prism_generated_tokens_total"] - before["edge_prism_generated_tokens_total"] < LONG
    reply = server.client().chat.completions.create(model=server.model, messages=HELLO, max_tokens=6, temperature=0)
    assert reply.choices[0].message.content == chat_ref(engine, HELLO, 6)


def test_full_queue_answers_503(server, engine):
    n = QUEUE + 4
    messages = [{"role": "user", "content": "Hi"}]
    expected = chat_ref(engine, messages, 4)
    answers: list[httpx.Response] = []

    def ask() -> None:
        answers.append(server.post(CHAT, {"messages": messages, "max_tokens": 4, "temperature": 0}))

    threads = [threading.Thread(target=ask) for _ in range(n)]
    with long_stream(server):  # holds the engine until the block ends
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while sum(a.status_code == 503 for a in answers) < n - QUEUE and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.metrics()["edge_prism_queue_length"] == QUEUE
    for t in threads:
        t.join(60)
    assert sorted(a.status_code for a in answers) == [200] * QUEUE + [503] * (n - QUEUE)
    for a in answers:
        if a.status_code == 503:
            assert a.json()["error"]["code"] == "queue_full" and a.headers["retry-after"]
        else:
            assert a.json()["choices"][0]["message"]["content"] == expected


# -- bad requests -------------------------------------------------------------------------------
BAD_REQUESTS = {
    "malformed-json": (CHAT, b'{"messages": [', 400, None, "invalid_json"),
    "not-an-object": (CHAT, [1, 2], 400, None, "invalid_type"),
    "missing-messages": (CHAT, {"max_tokens": 4}, 400, "messages", "missing_required_parameter"),
    "messages-not-a-list": (CHAT, {"messages": "hi"}, 400, "messages", "invalid_type"),
    "message-without-role": (CHAT, {"messages": [{"content": "hi"}]}, 400, "messages[0].role", "invalid_type"),
    "image-part": (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
                   "messages[0].content", "unsupported_parameter"),
    "max-tokens-string": (CHAT, {"messages": HELLO, "max_tokens": "ten"}, 400, "max_tokens", "invalid_type"),
    "max-tokens-zero": (CHAT, {"messages": HELLO, "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    "max-tokens-beyond-context": (CHAT, {"messages": HELLO, "max_tokens": CONTEXT}, 400, "max_tokens",
                                  "context_length_exceeded"),
    "prompt-plus-max-tokens-beyond-context": (CHAT, {"messages": HELLO, "max_tokens": CONTEXT - 5}, 400,
                                              "max_tokens", "context_length_exceeded"),
    "temperature-too-high": (CHAT, {"messages": HELLO, "temperature": 5}, 400, "temperature", "invalid_value"),
    "stream-not-bool": (CHAT, {"messages": HELLO, "stream": "yes"}, 400, "stream", "invalid_type"),
    "two-choices": (CHAT, {"messages": HELLO, "n": 2}, 400, "n", "unsupported_parameter"),
    "unknown-model": (CHAT, {"model": "gpt-9", "messages": HELLO}, 404, "model", "model_not_found"),
    "operating-point-on-a-plain-model": (CHAT, {"messages": HELLO, "operating_point": 4}, 400, "operating_point",
                                         "invalid_value"),
    "completion-without-prompt": ("/v1/completions", {"max_tokens": 4}, 400, "prompt", "missing_required_parameter"),
    "completion-prompt-of-ids": ("/v1/completions", {"prompt": [1, 2, 3]}, 400, "prompt", "invalid_type"),
    "unknown-endpoint": ("/v1/embeddings", {"input": "hi"}, 404, None, "not_found"),
}


@pytest.mark.parametrize("path,body,status,param,code", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_request_gets_an_openai_error(server, path, body, status, param, code):
    r = server.post(path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")
    assert error["message"]


def test_errors_leave_the_server_serving(server, engine):
    client = server.client()
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model=server.model, messages=HELLO, max_tokens=-1)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=HELLO)
    assert server.get("/v1/chat/completions").status_code == 405
    reply = client.chat.completions.create(model=server.model, messages=HELLO, max_tokens=5, temperature=0)
    assert reply.choices[0].message.content == chat_ref(engine, HELLO, 5)


def test_metrics_are_prometheus_text(server):
    r = server.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    m = server.metrics()
    for name in ("edge_prism_generated_tokens_total", "edge_prism_decode_tokens_per_second",
                 "edge_prism_time_to_first_token_seconds", 'edge_prism_token_latency_seconds{quantile="0.5"}',
                 'edge_prism_token_latency_seconds{quantile="0.99"}', "edge_prism_queue_length"):
        assert name in m, r.text
    assert m['edge_prism_requests_total{endpoint="/v1/chat/completions",status="200"}'] >= 1
    for line in r.text.splitlines():  # every line a comment or `name{labels} number`
        assert line.startswith("# ") or re.fullmatch(r"[a-z_]+(\{[^}]*\})? -?[\d.e+-]+", line), line


# -- per-request operating points on a prism checkpoint ------------------------------------------
@pytest.fixture(scope="module")
def prism_server(prism_of, tmp_path_factory):
    path = prism_of("llama")
    srv = start_server(path, tmp_path_factory.mktemp("serve-prism") / "server.log")
    try:
        yield srv, path
    finally:
        stop_server(srv.proc)


def test_operating_point_per_request(prism_server):
    srv, path = prism_server
    full = edge_prism.load(path)
    k_full = full.model.operating_point
    k = k_full // 2
    expect_full = full.chat(HELLO, max_new_tokens=8, temperature=0)
    expect_low = edge_prism.load(path, operating_point=k).chat(HELLO, max_new_tokens=8, temperature=0)
    assert expect_low != expect_full  # else this test could not tell the points apart

    def ask(**extra) -> str:
        return srv.client().chat.completions.create(model=srv.model, messages=HELLO, max_tokens=8, temperature=0,
                                                    extra_body=extra).choices[0].message.content

    assert ask(operating_point=k_full) == expect_full  # the loaded point is always accepted
    assert ask(operating_point=k) == expect_low
    assert ask() == expect_full  # the next request is back at the loaded point
    with pytest.raises(openai.BadRequestError, match="operating") as e:
        ask(operating_point=10 * k_full)
    assert e.value.body["param"] == "operating_point"
    assert ask(token_latency_ms=1e6) == expect_full  # a generous budget drops nothing
    tight = srv.client().chat.completions.create(model=srv.model, messages=HELLO, max_tokens=8,
                                                 temperature=0, extra_body={"token_latency_ms": 1e-3})
    assert tight.choices[0].finish_reason in ("stop", "length")  # degraded, not stalled
    assert ask() == expect_full  # the next request is back at the loaded budget (none)


# -- the command line ---------------------------------------------------------------------------
def test_sigterm_stops_the_server_and_tells_a_streaming_client(model_dir, tmp_path):
    srv = start_server(model_dir, tmp_path / "server.log")
    try:
        with long_stream(srv) as lines:
            srv.proc.terminate()
            rest = [line for line in lines if line.startswith("data: ")]
        assert srv.proc.wait(30) == 130  # the orderly stop Ctrl-C gives
    finally:
        stop_server(srv.proc)
    assert json.loads(rest[-2].removeprefix("data: "))["error"]["code"] == "shutting_down"
    assert rest[-1] == "data: [DONE]"
    assert "Traceback" not in srv.log.read_text()


def test_missing_extra_is_one_error_line(tmp_path):
    """Without the ASGI stack, `import edge_prism` works and serve says how to install it."""
    code = ("import sys; sys.modules.update(starlette=None, uvicorn=None); import edge_prism, edge_prism.serve; "
            "from edge_prism import cli; sys.exit(cli.main(['serve', '-m', 'nowhere']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: ") and "pip install 'edge-prism[serve]'" in proc.stderr


# -- the worker's per-request runtime options, with a fake engine ----------------------------------
class FakeEngine:
    """What Worker reads of an Engine, recording the per-request setters' calls."""

    def __init__(self, operating_point: int | None):
        self.model = SimpleNamespace(operating_point=operating_point)
        self.stats = {}
        self.calls: list[tuple[str, object]] = []

    def set_operating_point(self, k: int) -> None:
        self.calls.append(("k", k))

    def set_token_latency_ms(self, ms: float | None) -> None:
        self.calls.append(("ms", ms))


def request(**kw) -> GenerationRequest:
    return GenerationRequest(kind="chat", messages=tuple(HELLO), **kw)


def test_operating_point_per_request_on_a_plain_checkpoint_is_a_clear_400():
    fake = FakeEngine(None)
    worker = Worker(fake, ServeConfig(), Metrics())
    with pytest.raises(RequestError, match="operating_point needs a prism checkpoint") as e:
        worker._apply_runtime(request(operating_point=8))
    assert (e.value.status, e.value.param) == (400, "operating_point")
    assert fake.calls == []


def test_operating_point_per_request_with_a_setter_applies_then_restores():
    fake = FakeEngine(16)
    worker = Worker(fake, ServeConfig(), Metrics())
    worker._apply_runtime(request(operating_point=8, token_latency_ms=40))
    worker._apply_runtime(request(operating_point=8))
    worker._apply_runtime(request())
    assert fake.calls == [("k", 8), ("ms", 40.0), ("ms", None), ("k", 16)]


@pytest.mark.parametrize("pieces,stops,sent,hit", [
    (["Hel", "lo wor", "ld"], (), "Hello world", False),
    (["Hel", "lo wor", "ld"], ("o w",), "Hell", True),
    (["ab", "c", "d"], ("cd", "x"), "ab", True),
    (["ab", "c"], ("cd",), "abc", False),  # a partial match is held back, then sent at the end
    (["a\n", "\nb"], ("\n\n",), "a", True),
], ids=["none", "inside-a-piece", "across-pieces", "partial-at-end", "newlines"])
def test_stop_filter(pieces, stops, sent, hit):
    f = StopFilter(stops)
    out, stopped = "", False
    for p in pieces:
        text, stopped = f.push(p)
        out += text
        if stopped:
            break
    if not stopped:
        out += f.flush()
    assert (out, stopped) == (sent, hit)


def test_metrics_under_a_budget_export_the_runtime_figures():
    m = Metrics()
    stats = {"generated_tokens": 10, "prompt_tokens": 5, "reused_prompt_tokens": 0, "decode_tokens_per_s": 20.0,
             "time_to_first_token_s": 0.2, "token_latency_p50_ms": 40.0, "token_latency_p99_ms": 90.0,
             "memory_budget_bytes": 1 << 20, "resident_bytes": 1 << 19, "hit_rate": 0.75, "bytes_to_device": 4096,
             "transfer_wait_s": 0.5, "prefetch_precision": 0.5, "prefetch_recall": None, "dropped_subexperts": 3,
             "dropped_subexperts_per_token": 0.3}
    m.record(stats, cancelled=False)
    m.record(stats, cancelled=True)
    text = m.render(queue_length=2, busy=True)
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert samples["edge_prism_bytes_to_device_total"] == "8192"
    assert samples["edge_prism_transfer_wait_seconds_total"] == "1"
    assert samples["edge_prism_dropped_subexperts_total"] == "6"
    assert samples["edge_prism_hit_rate"] == "0.75" and samples["edge_prism_prefetch_precision"] == "0.5"
    assert samples['edge_prism_token_latency_seconds{quantile="0.99"}'] == "0.09"
    assert samples["edge_prism_requests_cancelled_total"] == "1" and samples["edge_prism_queue_length"] == "2"
    assert "edge_prism_prefetch_recall" not in samples  # no predictions scored: left out, not 0


@pytest.mark.parametrize("host,loopback", [("127.0.0.1", True), ("localhost", True), ("::1", True),
                                           ("0.0.0.0", False), ("192.168.1.10", False)])
def test_is_loopback(host, loopback):
    from edge_prism.serve import is_loopback

    assert is_loopback(host) is loopback


def test_busy_port_is_one_error_line_before_loading(capsys):
    import socket

    from edge_prism import cli

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code = cli.main(["serve", "-m", "no/such/model", "--port", str(port)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: cannot listen on 127.0.0.1:") and "--port" in err
    assert len(err.strip().splitlines()) == 1
