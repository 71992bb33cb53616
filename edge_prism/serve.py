"""``edge-prism serve``: the OpenAI HTTP API over one Engine.

HTTP request -> [validate: GenerationRequest] -> [bounded FIFO] -> [engine thread: the Engine's
stream_chat / stream] -> text pieces -> [event loop: server-sent events or one JSON body]

One thread (the main one) owns the engine and runs one request at a time, in arrival order,
so consecutive turns of a conversation reuse the engine's KV cache for their shared prefix
(the engine is never reset between requests). The event loop, in its own thread, only
parses, queues and writes: /health and /metrics answer while a request decodes. A full queue
answers 503 at once; a client that goes away stops its generation at the next token.

The ASGI stack (Starlette, uvicorn) is the optional ``serve`` extra and is imported only when
a server starts, so ``import edge_prism`` never needs it.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import ipaddress
import json
import logging
import math
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

from edge_prism.errors import ConfigError, EdgePrismError

if TYPE_CHECKING:
    from edge_prism.engine import Engine

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'edge-prism[serve]'"
MAX_BODY_BYTES = 4 << 20  # far above any prompt that fits a small model's context
MAX_STOP_SEQUENCES = 4  # as the OpenAI API
CLIENT_GONE = 499  # nginx's "client closed request": a status for the metrics, never sent


@dataclass(frozen=True)
class ServeConfig:
    """How the server listens and queues: built once by the CLI and passed down whole."""

    host: str = "127.0.0.1"
    port: int = 8000
    queue_size: int = 16  # requests waiting behind the one running; more answer 503
    model_id: str = "default"  # the name /v1/models lists
    model_aliases: tuple[str, ...] = ()  # other names requests may use (the -m value as given)
    max_body_bytes: int = MAX_BODY_BYTES
    access_log: bool = False  # one log line per request (-v)

    def __post_init__(self) -> None:
        if self.queue_size < 0:
            raise ConfigError(f"invalid --queue-size {self.queue_size}: use 0 (no waiting) or more")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"invalid --port {self.port}: use 1-65535 (0: any free port)")

    def serves(self, name: str) -> bool:
        """Whether a request naming model ``name`` is for this server."""
        return name == self.model_id or name in self.model_aliases


# -- errors -----------------------------------------------------------------------------------
class RequestError(Exception):
    """A request the server answers with an OpenAI-shaped JSON error (never a traceback)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        """``{"error": {"message", "type", "param", "code"}}``, as the OpenAI API answers."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _invalid(param: str, message: str, code: str = "invalid_value") -> RequestError:
    return RequestError(400, message, param=param, code=code)


# -- request validation -----------------------------------------------------------------------
@dataclass(frozen=True)
class GenerationRequest:
    """One validated request: a chat (``messages``) or a raw-text completion (``prompt``)."""

    kind: str  # "chat" or "completion"
    messages: tuple[dict, ...] = ()
    prompt: str = ""
    max_tokens: int | None = None  # None: up to the end of the context
    temperature: float = 1.0  # the OpenAI default; 0 is greedy
    top_p: float = 1.0
    top_k: int = 0  # not in the OpenAI API; llama.cpp and vLLM accept it too
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with usage
    operating_point: int | None = None  # None: the loaded one
    token_latency_ms: float | None = None  # None: the loaded one

    def sampling(self, max_new_tokens: int) -> dict:
        """Keyword arguments of Engine.stream / stream_chat."""
        return {"max_new_tokens": max_new_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": self.top_k, "seed": self.seed}


_MISSING = object()


def _field(body: dict, name: str, kind: type | tuple[type, ...], what: str, default: Any = None) -> Any:
    """``body[name]`` checked against ``kind`` (None and absent give ``default``)."""
    value = body.get(name, _MISSING)
    if value is _MISSING or value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # JSON true/false are not numbers here, though Python's bool is an int.
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise _invalid(name, f"invalid type for '{name}': expected {what}, got {_json_type(value)}",
                       code="invalid_type")
    return value


def _json_type(value: Any) -> str:
    for kind, name in ((bool, "a boolean"), (str, "a string"), (int, "an integer"), (float, "a number"),
                       (list, "an array"), (dict, "an object")):
        if isinstance(value, kind):
            return name
    return "null"


# Fields that would change the answer in ways this server does not do: refused, not ignored.
_UNSUPPORTED: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("n", lambda v: v in (None, 1), "one choice per request: leave out n or set it to 1"),
    ("best_of", lambda v: v in (None, 1), "one choice per request: leave out best_of"),
    ("logprobs", lambda v: v in (None, False, 0), "log probabilities are not returned: leave out logprobs"),
    ("top_logprobs", lambda v: v in (None, 0), "log probabilities are not returned: leave out top_logprobs"),
    ("echo", lambda v: v in (None, False), "echo is not supported: prepend the prompt yourself"),
    ("suffix", lambda v: v in (None, ""), "insertion (suffix) is not supported: leave out suffix"),
    ("presence_penalty", lambda v: v in (None, 0), "penalties are not supported: leave out presence_penalty"),
    ("frequency_penalty", lambda v: v in (None, 0), "penalties are not supported: leave out frequency_penalty"),
    ("logit_bias", lambda v: not v, "logit_bias is not supported: leave it out"),
    ("tools", lambda v: not v, "tool calls are not supported: leave out tools"),
    ("functions", lambda v: not v, "function calls are not supported: leave out functions"),
    ("response_format", lambda v: not v or (isinstance(v, dict) and v.get("type") == "text"),
     "structured output is not supported: leave out response_format"),
)


def parse_request(body: Any, kind: str, cfg: ServeConfig, *, max_context: int) -> GenerationRequest:
    """Validate a /v1/chat/completions (``kind`` "chat") or /v1/completions body."""
    if not isinstance(body, dict):
        raise RequestError(400, f"the request body must be a JSON object, got {_json_type(body)}",
                           code="invalid_type")
    model = _field(body, "model", str, "a string")
    if model is not None and not cfg.serves(model):
        raise RequestError(404, f"the model '{model}' does not exist on this server: use '{cfg.model_id}' "
                                "(GET /v1/models lists it)", param="model", code="model_not_found")
    for name, ok, hint in _UNSUPPORTED:
        if not ok(body.get(name)):
            raise _invalid(name, f"unsupported value for '{name}': {hint}", code="unsupported_parameter")
    if kind == "chat":
        fields: dict[str, Any] = {"messages": _messages(body)}
    else:
        fields = {"prompt": _prompt(body)}
    max_tokens = _field(body, "max_tokens", int, "an integer")
    if max_tokens is None:  # the newer name the OpenAI API gives it
        max_tokens = _field(body, "max_completion_tokens", int, "an integer")
    if max_tokens is not None and max_tokens <= 0:
        raise _invalid("max_tokens", f"invalid max_tokens {max_tokens}: use 1 or more (or leave it out: "
                                     "up to the end of the context)")
    if max_tokens is not None and max_tokens >= max_context:
        raise RequestError(400, f"max_tokens {max_tokens} is beyond the model's context of {max_context} "
                                f"tokens (prompt included): use at most {max_context - 1}",
                           param="max_tokens", code="context_length_exceeded")
    temperature = float(_field(body, "temperature", (int, float), "a number", 1.0))
    if not 0.0 <= temperature <= 2.0:
        raise _invalid("temperature", f"invalid temperature {temperature}: use a value in [0, 2] (0: greedy)")
    top_p = float(_field(body, "top_p", (int, float), "a number", 1.0))
    if not 0.0 < top_p <= 1.0:
        raise _invalid("top_p", f"invalid top_p {top_p}: use a value in (0, 1]")
    top_k = _field(body, "top_k", int, "an integer", 0)
    if top_k < 0:
        raise _invalid("top_k", f"invalid top_k {top_k}: use 0 (off) or a positive count")
    stream = _field(body, "stream", bool, "a boolean", False)
    options = _field(body, "stream_options", dict, "an object", {})
    include_usage = options.get("include_usage") is True
    point = _field(body, "operating_point", int, "an integer")
    if point is not None and point < 1:
        raise _invalid("operating_point", f"invalid operating_point {point}: use 1 or more")
    latency = _field(body, "token_latency_ms", (int, float), "a number")
    if latency is not None and not (latency > 0 and math.isfinite(latency)):
        raise _invalid("token_latency_ms", f"invalid token_latency_ms {latency}: use a positive number")
    return GenerationRequest(
        kind=kind, max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        seed=_seed(body), stop=_stop(body), stream=stream,
        include_usage=include_usage, operating_point=point,
        token_latency_ms=None if latency is None else float(latency), **fields)


def _messages(body: dict) -> tuple[dict, ...]:
    messages = body.get("messages")
    if messages is None:
        raise RequestError(400, "missing required parameter 'messages': send a list like "
                                '[{"role": "user", "content": "Hello"}]', param="messages",
                           code="missing_required_parameter")
    if not isinstance(messages, list):
        raise _invalid("messages", f"invalid type for 'messages': expected an array, got {_json_type(messages)}",
                       code="invalid_type")
    if not messages:
        raise _invalid("messages", "'messages' is empty: send at least one message")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _invalid(where, f"invalid type for '{where}': expected an object, got {_json_type(m)}",
                           code="invalid_type")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise _invalid(f"{where}.role", f"'{where}.role' must be a non-empty string such as 'user'",
                           code="invalid_type")
        # Templates of small models know system/user/assistant; newer clients say "developer".
        out.append({"role": "system" if role == "developer" else role,
                    "content": _content(m.get("content"), f"{where}.content")})
    return tuple(out)


def _content(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only text ones
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _invalid(where, f"'{where}' has a part that is not text; this server takes text "
                                      'only: {"type": "text", "text": "..."}', code="unsupported_parameter")
            texts.append(part["text"])
        return "\n".join(texts)
    raise _invalid(where, f"invalid type for '{where}': expected a string or an array of text parts, "
                          f"got {_json_type(content)}", code="invalid_type")


def _prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if prompt is None:
        raise RequestError(400, "missing required parameter 'prompt': send the text to continue",
                           param="prompt", code="missing_required_parameter")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise _invalid("prompt", f"invalid type for 'prompt': expected a string (one prompt per request), got "
                                 f"{_json_type(prompt)}", code="invalid_type")
    if not prompt:
        raise _invalid("prompt", "'prompt' is empty: send the text to continue")
    return prompt


def _seed(body: dict) -> int | None:
    seed = _field(body, "seed", int, "an integer")
    if seed is not None and not -(2**63) <= seed < 2**64:
        raise _invalid("seed", f"invalid seed {seed}: use a whole number from 0 to 2**64-1")
    return seed


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise _invalid("stop", "invalid 'stop': use a non-empty string or an array of them", code="invalid_type")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise _invalid("stop", f"{len(stops)} stop sequences: use at most {MAX_STOP_SEQUENCES}")
    return tuple(stops)


class StopFilter:
    """Cuts streamed text at the first stop sequence, holding back a possible partial match."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.held = ""

    def push(self, piece: str) -> tuple[str, bool]:
        """(text safe to send now, whether a stop sequence was reached)."""
        if not self.stops:
            return piece, False
        text = self.held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return text[:min(hits)], True
        keep = max((n for s in self.stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def flush(self) -> str:
        """What is still held back at the end of the reply."""
        text, self.held = self.held, ""
        return text


# -- jobs and the engine's worker -------------------------------------------------------------
@dataclass(frozen=True)
class Usage:
    """Token counts of one request, as the OpenAI ``usage`` object."""

    prompt_tokens: int
    completion_tokens: int

    def as_dict(self) -> dict:
        """The ``usage`` object."""
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


# What the worker sends a job's response, in order: ("start", prompt_tokens), then
# ("text", piece)..., then ("end", finish_reason, Usage) or ("error", RequestError).
Event = tuple


class Job:
    """One admitted request: its output channel to the event loop and its cancel flag."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop):
        self.request = request
        self.id = f"{'chatcmpl' if request.kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.cancelled = threading.Event()
        self._loop = loop
        self._events: asyncio.Queue = asyncio.Queue()
        self._on_cancel: Callable[[Job], bool] | None = None

    def emit(self, event: Event) -> None:
        """Hand ``event`` to the response (any thread)."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass

    async def next(self) -> Event:
        """The next event from the worker."""
        return await self._events.get()

    def ready(self) -> list[Event]:
        """The events already waiting, without waiting for more."""
        out = []
        while not self._events.empty():
            out.append(self._events.get_nowait())
        return out

    def cancel(self) -> None:
        """Stop this job: dropped from the queue if still waiting, stopped at the next token if running."""
        if self.cancelled.is_set():
            return
        self.cancelled.set()
        if self._on_cancel is not None and self._on_cancel(self):
            self.emit(("end", "cancelled", Usage(0, 0)))


class Worker:
    """Owns the engine: runs admitted jobs one at a time, first come first served, on the
    thread that calls run() (serve() gives it the main thread)."""

    def __init__(self, engine: "Engine", cfg: ServeConfig, metrics: "Metrics"):
        self.engine = engine
        self.cfg = cfg
        self.metrics = metrics
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._busy = False
        self._stopping = False
        self._running: Job | None = None
        self._loaded_point = engine.model.operating_point
        self._loaded_latency = engine.stats.get("token_latency_budget_ms")
        self._point, self._latency = self._loaded_point, self._loaded_latency

    def stop(self) -> None:
        """Cancel what runs and waits; run() returns (any thread)."""
        with self._cond:
            self._stopping = True
            waiting, self._waiting = list(self._waiting), collections.deque()
            running = self._running
            self._cond.notify_all()
        for job in waiting:
            job.cancelled.set()
            job.emit(("end", "cancelled", Usage(0, 0)))
        if running is not None:
            running.cancel()

    @property
    def queue_length(self) -> int:
        """Requests admitted and not yet started."""
        return len(self._waiting)

    @property
    def busy(self) -> bool:
        """Whether a request is generating now."""
        return self._busy

    def submit(self, job: Job) -> None:
        """Admit ``job`` or raise RequestError 503 when the queue is full."""
        with self._cond:
            if self._stopping:
                raise RequestError(503, "the server is shutting down", code="shutting_down")
            if len(self._waiting) + self._busy > self.cfg.queue_size:
                raise RequestError(503, f"the server is busy: {len(self._waiting)} requests are waiting "
                                        f"(--queue-size {self.cfg.queue_size}); retry shortly",
                                   code="queue_full")
            job._on_cancel = self._discard
            self._waiting.append(job)
            self._cond.notify()

    def _discard(self, job: Job) -> bool:
        with self._cond:
            try:
                self._waiting.remove(job)
            except ValueError:
                return False
            return True

    def run(self, *, until: Callable[[], bool] = lambda: False) -> None:
        """Run jobs on the calling thread until stop(), or until ``until()`` (polled while idle)."""
        while True:
            with self._cond:
                while not self._waiting and not self._stopping:
                    if until():
                        return
                    self._cond.wait(0.5)
                if self._stopping:
                    return
                job = self._waiting.popleft()
                self._busy, self._running = True, job
            try:
                self._run(job)
            except RequestError as e:
                job.emit(("error", e))
            except EdgePrismError as e:
                job.emit(("error", RequestError(400, str(e), code="invalid_request")))
            except Exception as e:  # a bug: keep serving, and say where to look
                log.exception("request %s failed", job.id)
                job.emit(("error", RequestError(500, f"internal error ({type(e).__name__}: {e}); "
                                                     "see the server log", code="internal_error")))
            except BaseException:  # Ctrl-C or SIGTERM mid-reply: the client still gets an answer
                job.emit(("error", RequestError(503, "the server is shutting down", code="shutting_down")))
                raise
            finally:
                with self._cond:
                    self._busy, self._running = False, None

    def _run(self, job: Job) -> None:
        req, engine = job.request, self.engine
        if job.cancelled.is_set():
            job.emit(("end", "cancelled", Usage(0, 0)))
            return
        self._apply_runtime(req)
        tok = engine.tokenizer
        ids = tok.encode_chat(list(req.messages)) if req.kind == "chat" else tok.encode(req.prompt)
        room = engine.max_context - len(ids)
        param = "messages" if req.kind == "chat" else "prompt"
        if not ids:
            raise _invalid(param, "the prompt encodes to no tokens: send some text")
        if room <= 0:
            raise RequestError(400, f"the prompt is {len(ids)} tokens but the context holds {engine.max_context} "
                                    "(one more is needed for the reply): shorten the prompt",
                               param=param, code="context_length_exceeded")
        if req.max_tokens is not None and req.max_tokens > room:
            raise RequestError(400, f"the prompt is {len(ids)} tokens and max_tokens is {req.max_tokens}, over "
                                    f"the context of {engine.max_context}: lower max_tokens to at most {room} "
                                    "or shorten the prompt", param="max_tokens", code="context_length_exceeded")
        budget = req.max_tokens or room
        if req.kind == "chat":
            pieces = engine.stream_chat(list(req.messages), **req.sampling(budget))
        else:
            pieces = engine.stream(req.prompt, **req.sampling(budget))
        job.emit(("start", len(ids)))
        reason = self._drain(job, pieces)
        stats = engine.stats
        self.metrics.record(stats, cancelled=reason == "cancelled")
        generated = stats["generated_tokens"]
        if reason == "done":
            reason = "length" if generated >= budget else "stop"
        job.emit(("end", reason, Usage(stats["prompt_tokens"], generated)))

    def _drain(self, job: Job, pieces: Iterator[str]) -> str:
        """Send ``pieces`` to the job until the end, a stop sequence or a cancel; returns which."""
        stop = StopFilter(job.request.stop)
        try:
            for piece in pieces:
                text, hit = stop.push(piece)
                if text:
                    job.emit(("text", text))
                if hit:
                    return "stop"
                if job.cancelled.is_set():  # checked before the next token is computed
                    return "cancelled"
            tail = stop.flush()
            if tail:
                job.emit(("text", tail))
            return "done"
        finally:
            pieces.close()  # frees the engine: the generator stops where it is

    def _apply_runtime(self, req: GenerationRequest) -> None:
        """Per-request operating point and token-latency budget, set on the engine before the job runs."""
        engine = self.engine
        point = self._loaded_point if req.operating_point is None else req.operating_point
        if point != self._point:
            if self._loaded_point is None:
                raise _invalid("operating_point", "operating_point needs a prism checkpoint; this server runs "
                                                  "a plain one (serve the output of `edge-prism refactor`)")
            try:
                engine.set_operating_point(point)  # forgets the KV cache: the next prompt is prefilled whole
            except EdgePrismError as e:
                raise _invalid("operating_point", str(e)) from None
            self._point = point
        latency = self._loaded_latency if req.token_latency_ms is None else req.token_latency_ms
        if not _same(latency, self._latency):
            try:
                engine.set_token_latency_ms(latency)
            except EdgePrismError as e:
                raise _invalid("token_latency_ms", str(e)) from None
            self._latency = latency


def _same(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=1e-9)


# -- metrics ----------------------------------------------------------------------------------
# (engine.stats key, metric name, help) for the last request's figures, exported when present.
_LAST_GAUGES = (
    ("decode_tokens_per_s", "decode_tokens_per_second", "decode tokens per second of the last request"),
    ("time_to_first_token_s", "time_to_first_token_seconds", "time to first token of the last request"),
    ("hit_rate", "hit_rate", "sub-expert cache hit rate of the last request"),
    ("prefetch_precision", "prefetch_precision", "share of prefetched sub-experts used (last request)"),
    ("prefetch_recall", "prefetch_recall", "share of used sub-experts that were prefetched (last request)"),
    ("dropped_subexperts_per_token", "dropped_subexperts_per_token",
     "sub-experts dropped per token to meet the latency budget (last request)"),
    ("tokens_within_budget", "tokens_within_budget_ratio", "share of tokens within the latency budget (last request)"),
    ("resident_bytes", "resident_bytes", "sub-expert bytes resident on the device"),
    ("memory_budget_bytes", "memory_budget_bytes", "memory budget of resident sub-experts"),
    ("token_latency_budget_ms", "token_latency_budget_milliseconds", "decode token latency budget"),
)
# (engine.stats key, metric name, help) summed over requests.
_COUNTERS = (
    ("generated_tokens", "generated_tokens_total", "tokens generated"),
    ("prompt_tokens", "prompt_tokens_total", "prompt tokens"),
    ("reused_prompt_tokens", "reused_prompt_tokens_total", "prompt tokens served from the KV cache"),
    ("bytes_to_device", "bytes_to_device_total", "sub-expert bytes moved to the device"),
    ("bytes_in_place", "bytes_in_place_total", "sub-expert bytes the kernels read in place from the host tier"),
    ("transfer_wait_s", "transfer_wait_seconds_total", "time decoding waited for sub-expert transfers"),
    ("dropped_subexperts", "dropped_subexperts_total", "sub-experts dropped to meet the latency budget"),
)


@dataclass
class Metrics:
    """Server figures for /metrics: counters over requests, the last request's engine.stats."""

    requests: collections.Counter = field(default_factory=collections.Counter)  # (endpoint, status)
    # Token counters are there from the start (at 0); the runtime's once it reports them.
    totals: dict = field(default_factory=lambda: dict.fromkeys(
        ("generated_tokens", "prompt_tokens", "reused_prompt_tokens"), 0))
    last: dict = field(default_factory=dict)
    cancelled: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, stats: dict, *, cancelled: bool) -> None:
        """Add one generation's engine.stats (engine thread)."""
        with self._lock:
            self.last = dict(stats)
            for key, _, _ in _COUNTERS:
                if isinstance(stats.get(key), (int, float)):
                    self.totals[key] = self.totals.get(key, 0) + stats[key]
            self.cancelled += cancelled

    def count(self, endpoint: str, status: int) -> None:
        """One answered request (event loop)."""
        with self._lock:
            self.requests[(endpoint, status)] += 1

    def render(self, *, queue_length: int, busy: bool) -> str:
        """Prometheus text exposition format (version 0.0.4)."""
        lines: list[str] = []

        def metric(name: str, kind: str, help: str, samples: list[tuple[str, float]]) -> None:
            lines.extend((f"# HELP edge_prism_{name} {help}", f"# TYPE edge_prism_{name} {kind}"))
            lines.extend(f"edge_prism_{name}{labels} {_num(v)}" for labels, v in samples)

        with self._lock:
            metric("requests_total", "counter", "requests answered, by endpoint and HTTP status",
                   [(f'{{endpoint="{e}",status="{s}"}}', n) for (e, s), n in sorted(self.requests.items())])
            metric("requests_cancelled_total", "counter", "generations stopped because the client went away",
                   [("", self.cancelled)])
            metric("queue_length", "gauge", "requests waiting for the engine", [("", queue_length)])
            metric("busy", "gauge", "1 while a request is generating", [("", int(busy))])
            for key, name, help in _COUNTERS:
                if key in self.totals:
                    metric(name, "counter", help, [("", self.totals[key])])
            for key, name, help in _LAST_GAUGES:
                if self.last.get(key) is not None:
                    metric(name, "gauge", help, [("", self.last[key])])
            quantiles = [(f'{{quantile="{q}"}}', self.last[k] / 1000)
                         for q, k in (("0.5", "token_latency_p50_ms"), ("0.99", "token_latency_p99_ms"))
                         if self.last.get(k) is not None]
            if quantiles:
                metric("token_latency_seconds", "gauge", "decode token latency quantiles of the last request",
                       quantiles)
        return "\n".join(lines) + "\n"


def _num(v: float) -> str:
    return repr(int(v)) if float(v).is_integer() else repr(float(v))


# -- responses --------------------------------------------------------------------------------
def _chunk(job: Job, model: str, *, delta: dict | None = None, text: str | None = None,
           finish: str | None = None) -> dict:
    if job.request.kind == "chat":
        choice = {"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    return {"id": job.id, "object": obj, "created": job.created, "model": model, "choices": [choice]}


def _completion(job: Job, model: str, text: str, finish: str, usage: Usage) -> dict:
    if job.request.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        obj = "text_completion"
    return {"id": job.id, "object": obj, "created": job.created, "model": model, "choices": [choice],
            "usage": usage.as_dict()}


def _sse(obj: dict | str) -> bytes:
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n".encode()


def _json_bytes(obj: dict) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


class JobResponse:
    """The ASGI response of an admitted job: server-sent events or one JSON body.

    It waits for the worker's first event before sending a status, so an error found by the
    worker (context length, an engine error) is still a plain JSON error. A watcher reads the
    connection: when the client goes away the job is cancelled, queued or running.
    """

    def __init__(self, job: Job, model: str, on_done: Callable[[int], None]):
        self.job, self.model, self.on_done = job, model, on_done

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        job = self.job

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            job.cancel()

        watcher = asyncio.ensure_future(watch())
        status = CLIENT_GONE
        try:
            status = await self._respond(send)
        finally:
            watcher.cancel()
            job.cancel()  # no-op once finished; stops the generation if this task was cancelled
            self.on_done(status)

    async def _respond(self, send: Callable) -> int:
        """Send the answer; returns its status for the metrics (CLIENT_GONE: cut short)."""
        job = self.job
        first = await job.next()
        if first[0] == "error":
            await _send_json(send, first[1].status, first[1].body())
            return first[1].status
        if first[0] == "end":  # cancelled before it started: the client left, or shutdown
            gone = RequestError(503, "the server is shutting down", code="shutting_down")
            await _send_json(send, 503, gone.body())  # ignored by the server when the client left
            return CLIENT_GONE
        if not job.request.stream:
            return await self._collect(send)
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no")]})
        return await self._stream(send)

    async def _stream(self, send: Callable) -> int:
        job, model = self.job, self.model
        out = bytearray()
        if job.request.kind == "chat":
            out += _sse(_chunk(job, model, delta={"role": "assistant", "content": ""}))
        status = None
        while status is None:
            # Everything the worker produced since the last write goes out in one write.
            for event in [await job.next(), *job.ready()]:
                if event[0] == "text":
                    out += _sse(_chunk(job, model, delta={"content": event[1]}, text=event[1]))
                    continue
                if event[0] == "error":  # the 200 already went out: an error event, as vLLM sends
                    out += _sse(event[1].body())
                    status = event[1].status
                elif event[1] == "cancelled":
                    status = CLIENT_GONE
                else:
                    _, finish, usage = event
                    out += _sse(_chunk(job, model, finish=finish))
                    if job.request.include_usage:
                        last = _chunk(job, model)
                        last.update(choices=[], usage=usage.as_dict())
                        out += _sse(last)
                    status = 200
                out += _sse("[DONE]")
                break
            await send({"type": "http.response.body", "body": bytes(out), "more_body": status is None})
            out.clear()
        return status

    async def _collect(self, send: Callable) -> int:
        job = self.job
        pieces: list[str] = []
        while True:
            event = await job.next()
            if event[0] == "text":
                pieces.append(event[1])
            elif event[0] == "error":
                await _send_json(send, event[1].status, event[1].body())
                return event[1].status
            elif event[1] == "cancelled":
                return CLIENT_GONE
            else:
                _, finish, usage = event
                await _send_json(send, 200, _completion(job, self.model, "".join(pieces), finish, usage))
                return 200


async def _send_json(send: Callable, status: int, obj: dict, headers: list | None = None) -> None:
    body = _json_bytes(obj)
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


# -- the application --------------------------------------------------------------------------
def _asgi_stack():
    """(starlette modules, uvicorn), or one clear error line when the extra is missing."""
    try:
        import uvicorn
        from starlette import applications, requests, responses, routing
    except ImportError as e:
        raise EdgePrismError(f"serving needs the 'serve' extra ({e.name or e} is missing): "
                             f"run {INSTALL_HINT}") from None
    return applications, requests, responses, routing, uvicorn


def build_app(worker: Worker):
    """The Starlette application in front of ``worker`` (someone calls worker.run()); its
    shutdown stops the worker."""
    import contextlib

    applications, requests, responses, routing, _ = _asgi_stack()
    engine, cfg, metrics = worker.engine, worker.cfg, worker.metrics
    max_context = engine.max_context

    def error(e: RequestError, endpoint: str):
        metrics.count(endpoint, e.status)
        headers = {"retry-after": "1"} if e.status == 503 else None
        return responses.JSONResponse(e.body(), status_code=e.status, headers=headers)

    async def read_json(request) -> Any:
        size = 0
        chunks = []
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > cfg.max_body_bytes:
                    raise RequestError(413, f"the request body is over {cfg.max_body_bytes} bytes: send a "
                                            "shorter prompt", code="request_too_large")
                chunks.append(chunk)
        except requests.ClientDisconnect:
            raise RequestError(400, "the client closed the connection while sending the request",
                               code="client_disconnected") from None
        try:
            return json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as e:
            raise RequestError(400, f"the request body is not valid JSON ({e}): send a JSON object",
                               code="invalid_json") from None

    def generation(kind: str, endpoint: str):
        async def handle(request):
            try:
                req = parse_request(await read_json(request), kind, cfg, max_context=max_context)
                job = Job(req, asyncio.get_running_loop())
                worker.submit(job)
            except RequestError as e:
                return error(e, endpoint)
            return JobResponse(job, cfg.model_id, lambda status: metrics.count(endpoint, status))
        return handle

    async def models(request):
        metrics.count("/v1/models", 200)
        return responses.JSONResponse({"object": "list", "data": [_model_card(engine, cfg)]})

    async def model(request):
        name = request.path_params["name"]
        if not cfg.serves(name):
            return error(RequestError(404, f"the model '{name}' does not exist on this server: use "
                                           f"'{cfg.model_id}'", param="model", code="model_not_found"),
                         "/v1/models")
        metrics.count("/v1/models", 200)
        return responses.JSONResponse(_model_card(engine, cfg))

    async def health(request):
        return responses.JSONResponse({"status": "ok", "model": cfg.model_id, "busy": worker.busy,
                                       "queue_length": worker.queue_length})

    async def prometheus(request):
        return responses.PlainTextResponse(metrics.render(queue_length=worker.queue_length, busy=worker.busy),
                                           media_type="text/plain; version=0.0.4; charset=utf-8")

    async def not_found(request, exc):
        return error(RequestError(404, f"no such endpoint: {request.method} {request.url.path}; this server "
                                       "has /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics",
                                  code="not_found"), "other")

    async def not_allowed(request, exc):
        return error(RequestError(405, f"{request.method} is not allowed on {request.url.path}",
                                  code="method_not_allowed"), "other")

    async def crashed(request, exc):
        log.error("request to %s failed", request.url.path, exc_info=exc)
        return error(RequestError(500, f"internal error ({type(exc).__name__}); see the server log",
                                  code="internal_error"), "other")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        try:
            yield
        finally:
            worker.stop()

    routes = [
        routing.Route("/v1/chat/completions", generation("chat", "/v1/chat/completions"), methods=["POST"]),
        routing.Route("/v1/completions", generation("completion", "/v1/completions"), methods=["POST"]),
        routing.Route("/v1/models", models, methods=["GET"]),
        routing.Route("/v1/models/{name:path}", model, methods=["GET"]),
        routing.Route("/health", health, methods=["GET"]),
        routing.Route("/metrics", prometheus, methods=["GET"]),
    ]
    return applications.Starlette(routes=routes, lifespan=lifespan,
                                  exception_handlers={404: not_found, 405: not_allowed, Exception: crashed})


def _model_card(engine: "Engine", cfg: ServeConfig) -> dict:
    card = {"id": cfg.model_id, "object": "model", "created": 0, "owned_by": "edge-prism",
            "max_context": engine.max_context}
    point = getattr(engine.model, "operating_point", None)
    if point is not None:
        card["operating_point"] = point
    return card


# -- running it -------------------------------------------------------------------------------
def is_loopback(host: str) -> bool:
    """Whether every address ``host`` names is on this machine only (127.0.0.0/8, ::1)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host``:``port`` (port 0: any free one), or an error saying what to do."""
    host = host.strip("[]")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise ConfigError(f"invalid --host '{host}': {e.strerror}; use an address like 127.0.0.1") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}): pick another --port, or stop "
                          "what uses it") from None
    if not is_loopback(host):  # the user's explicit choice: say what it means
        log.warning("listening on %s, which is not a loopback address: anyone who can reach this machine "
                    "can use the model (there is no authentication)", host)
    return sock


def serve(engine: "Engine", cfg: ServeConfig, *, sock: socket.socket | None = None,
          ready: Callable[[str], None] | None = None) -> None:
    """Serve ``engine`` until interrupted, on ``sock`` (default: bind cfg.host:cfg.port).

    The HTTP event loop runs in a background thread and the engine on the calling thread:
    torch decodes faster on the main thread (measured on 2 CPU cores: 22 vs 15 tokens/s on
    the default model; from another thread its gemvs ran on one core). ``ready`` gets the
    base URL once the server accepts connections.
    """
    *_, uvicorn = _asgi_stack()
    sock = sock or bind(cfg.host, cfg.port)
    worker = Worker(engine, cfg, Metrics())
    config = uvicorn.Config(build_app(worker), log_config=None, access_log=cfg.access_log, lifespan="on",
                            timeout_graceful_shutdown=3)
    server = uvicorn.Server(config)
    http = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="edge-prism-http", daemon=True)
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main else None
    http.start()
    try:
        while not server.started:
            if not http.is_alive():
                raise EdgePrismError("the HTTP server stopped while starting; run with -v to see its log")
            time.sleep(0.02)
        if ready is not None:
            host, port = sock.getsockname()[:2]
            ready(f"http://{f'[{host}]' if ':' in host else host}:{port}")
        worker.run(until=lambda: not http.is_alive())
    finally:
        server.should_exit = True
        worker.stop()
        http.join(10)
        sock.close()
        if main:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM: the same orderly stop as Ctrl-C


# -- the CLI ----------------------------------------------------------------------------------
def add_serve_parser(subparsers) -> Callable[[argparse.Namespace], int]:
    """Add the ``serve`` subcommand to ``subparsers``; returns its handler."""
    from edge_prism.cliargs import add_model_args, add_runtime_args

    p = subparsers.add_parser(
        "serve", help="serve a model over the OpenAI HTTP API (chat/completions, completions, models)",
        description="Serve a model over the OpenAI HTTP API on this machine: POST /v1/chat/completions and "
                    "/v1/completions (streamed as server-sent events or not), GET /v1/models, /health and "
                    "/metrics (Prometheus). One request generates at a time; others wait in a bounded "
                    f"queue. Needs the serve extra: {INSTALL_HINT}.")
    add_model_args(p)
    add_runtime_args(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1, this machine only; another address "
                        "lets anyone who reaches it use the model, with no authentication)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port)")
    p.add_argument("--queue-size", type=int, default=16,
                   help="requests that may wait behind the running one; more are answered 503 (default: 16)")
    p.add_argument("--model-name", default=None,
                   help="the model id clients use (default: the checkpoint's file or folder name)")
    return cmd_serve


def cmd_serve(args: argparse.Namespace) -> int:
    """Load the model (building the default prism on first use) and serve it until Ctrl-C."""
    from edge_prism.cliargs import load_engine

    _asgi_stack()  # a missing extra, a bad flag or a busy port fail before minutes of loading
    cfg = ServeConfig(host=args.host, port=args.port, queue_size=args.queue_size, access_log=args.verbose)
    sock = bind(cfg.host, cfg.port)
    try:
        engine = load_engine(args)
    except BaseException:
        sock.close()
        raise
    name = args.model_name or engine.source.name
    aliases = tuple(sorted(a for a in {args.model, str(engine.source)} if a and a != name))
    cfg = dataclasses.replace(cfg, model_id=name, model_aliases=aliases)

    def ready(url: str) -> None:
        print(f"edge-prism serving {name} at {url}/v1 (OpenAI API; /health, /metrics); Ctrl-C stops",
              file=sys.stderr, flush=True)

    try:
        serve(engine, cfg, sock=sock, ready=ready)
    finally:
        engine.close()  # transfer threads and pinned memory go before the process does
    return 0


__all__ = ["ServeConfig", "GenerationRequest", "RequestError", "StopFilter", "Metrics", "Worker", "Job",
           "parse_request", "build_app", "serve", "bind", "is_loopback", "add_serve_parser", "cmd_serve"]
