"""Engine: a loaded model with its tokenizer, generation loop and statistics."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from numbers import Integral
from pathlib import Path
from typing import Iterator, Sequence

import torch

from edge_prism.errors import ConfigError, ContextLengthError, EngineBusyError, TokenizerError
from edge_prism.model import Transformer
from edge_prism.sampling import Sampler, SamplingConfig
from edge_prism.spec import ModelSpec
from edge_prism.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class GenerationStats:
    """Figures of the last generation."""

    prompt_tokens: int = 0
    reused_prompt_tokens: int = 0
    generated_tokens: int = 0
    time_to_first_token_s: float = 0.0
    decode_s: float = 0.0
    token_latencies_s: list[float] = field(default_factory=list)

    def as_dict(self) -> dict:
        """The public stats keys."""
        decode_tokens = len(self.token_latencies_s)
        return {
            "prompt_tokens": self.prompt_tokens,
            "reused_prompt_tokens": self.reused_prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "time_to_first_token_s": self.time_to_first_token_s,
            "decode_tokens_per_s": decode_tokens / self.decode_s if self.decode_s > 0 else 0.0,
        }


class Engine:
    """A model ready to generate. Build it with :func:`edge_prism.load`.

    One generation at a time: callers from several threads are served in turn (a streamed
    generation holds the engine until its generator is exhausted or closed); a second
    generation started by the thread whose stream is still open is refused with
    EngineBusyError rather than mixed into it. ``close()`` (or ``with``) releases threads,
    pinned memory and slot pools at once.
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer | None, *, source: Path,
                 max_context: int, synthetic: bool = False):
        self.model = model
        self._tokenizer = tokenizer
        self.source = source
        self.max_context = max_context
        self.synthetic = synthetic  # random weights at real shapes: every figure is labelled
        self._cached: list[int] = []  # token ids whose keys/values are in the KV cache
        self._last = GenerationStats()
        self._lock = threading.Lock()  # held for a whole generation (a plain Lock: a stream may be
        self._owner: int | None = None  # closed from another thread than the one that opened it)
        self._closed = False

    # -- public API ----------------------------------------------------------------------
    @property
    def spec(self) -> ModelSpec:
        """The model's architecture."""
        return self.model.spec

    @property
    def tokenizer(self) -> Tokenizer:
        """The model's tokenizer (error if the checkpoint has none)."""
        if self._tokenizer is None:
            raise TokenizerError(f"{self.source}: the checkpoint has no tokenizer.json; "
                                 "use logits() with token ids, or add the model's tokenizer files")
        return self._tokenizer

    @property
    def stats(self) -> dict:
        """Figures of the last generation, plus the runtime's when it keeps any."""
        out = self._last.as_dict()
        if self.synthetic:
            out["synthetic"] = True
        lat = sorted(self._last.token_latencies_s)
        if lat:
            out["token_latency_p50_ms"] = 1000 * lat[len(lat) // 2]
            out["token_latency_p99_ms"] = 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))]
        for part in self._reporters():
            if part is self.model.planner:
                out.update(part.report(self._last.token_latencies_s))
            else:
                out.update(part.report())
        if "memory_budget_bytes" in out and self.model.prefetcher is None:
            # Prefetch is off (the CPU default): the keys stay, with no figure.
            out.setdefault("prefetch_precision", None)
            out.setdefault("prefetch_recall", None)
        return out

    def _reporters(self) -> list:
        """The runtime parts this model has: each keeps counters (report(), reset_stats())."""
        m = self.model
        return [p for p in (m.store, m.prefetcher, m.planner) if p is not None]

    def generate(self, prompt: str, **sampling) -> str:
        """The continuation of raw text ``prompt`` (no chat template)."""
        return "".join(self.stream(prompt, **sampling))

    def stream(self, prompt: str, **sampling) -> Iterator[str]:
        """Like generate(), yielding text pieces as tokens are produced."""
        if not isinstance(prompt, str) or not prompt:
            raise ConfigError(f"the prompt is {prompt!r:.40}: give non-empty text to continue "
                              "(or generate_ids() with at least one token id)")
        ids = self.tokenizer.encode(prompt)
        self._check_ids(ids)  # bad input fails here, not at the first next()
        return self._stream_text(ids, _sampling(sampling))

    def chat(self, messages: Sequence[dict], **sampling) -> str:
        """The assistant's reply to ``messages`` ([{'role': ..., 'content': ...}, ...])."""
        return "".join(self.stream_chat(messages, **sampling))

    def stream_chat(self, messages: Sequence[dict], **sampling) -> Iterator[str]:
        """Like chat(), yielding text pieces as tokens are produced."""
        ids = self.tokenizer.encode_chat(list(messages))
        self._check_ids(ids)
        return self._stream_text(ids, _sampling(sampling))

    def generate_ids(self, ids: Sequence[int], **sampling) -> list[int]:
        """Generated token ids after prompt ``ids`` (stop tokens excluded)."""
        ids = list(ids)
        if not ids:
            raise ConfigError("generate_ids() got no token ids: give at least one prompt token "
                              "(the BOS id, to start from nothing)")
        return list(self._generate_ids(ids, _sampling(sampling)))

    def logits(self, token_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Logits [T, vocab] (float32, CPU) for a 1-D sequence of token ids, from an empty cache."""
        ids = torch.as_tensor(token_ids)
        if ids.dim() != 1 or ids.numel() == 0 or ids.dtype.is_floating_point:
            raise ConfigError(f"logits() takes a non-empty 1-D sequence of token ids, got shape "
                              f"{list(ids.shape)} of {ids.dtype}")
        self._check_ids(ids.tolist(), scoring=True)
        with self._exclusive():
            self.model.reset(0)
            self._cached = []
            out = self.model.forward(ids.long(), all_logits=True)
            self._cached = ids.tolist()
            return out.cpu()

    def reset(self) -> None:
        """Forget the KV cache (the next prompt is prefilled from scratch) and release what an
        interrupted generation left held in the runtime."""
        with self._exclusive():
            self.model.reset(0)
            self._cached = []

    def close(self) -> None:
        """Release the runtime now: stop transfer threads (after the copies in flight), give
        back slot pools, pinned host memory and the KV cache. Waits for a generation running
        in another thread. Idempotent; the engine cannot generate afterwards (stats stay)."""
        if self._closed:
            return
        with self._exclusive():
            self._closed = True
            m = self.model
            m.set_prefetcher(None)  # the model <-> prefetcher cycle goes with them
            m.set_planner(None)
            m.store.close()
            m.cache = None  # the KV cache's device memory

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Hold the engine for one generation (or reset, logits, close)."""
        me = threading.get_ident()
        if not self._lock.acquire(blocking=False):
            if self._owner == me:
                raise EngineBusyError("this thread's previous generation on this engine is still open (a "
                                      "stream neither exhausted nor closed): close it first, e.g. "
                                      "`for piece in stream: ...` to the end or `stream.close()`")
            self._lock.acquire()  # another thread's generation: wait for it
        try:
            if self._closed:
                raise EngineBusyError(f"the engine of {self.source} is closed: load the model again")
            self._owner = me
            yield
        finally:
            try:
                self._owner = None
            finally:  # a second Ctrl-C here must not leave the engine held
                self._lock.release()

    def set_operating_point(self, k: int) -> None:
        """Compute ``k`` active sub-experts per token per MoE layer from now on, without
        reloading: only the selector is rebuilt (weights, gates, memory budget and prefetcher
        stay). The KV cache is forgotten, so what follows equals ``load(..., operating_point=k)``.

        Under a memory budget planned at a smaller K, a larger ``k`` still computes exactly;
        a selection larger than the dynamic slots then passes through them in rounds (slower).
        """
        m = self.model
        if isinstance(k, bool) or not isinstance(k, Integral) or k < 1:
            raise ConfigError(f"invalid operating point {k!r}: use a whole number of active sub-experts "
                              "per token per layer, 1 or more")
        if m.operating_point is None:
            raise ConfigError(f"{self.source}: operating points need a prism checkpoint; run `edge-prism "
                              f"refactor {self.source} --out DIR` and load DIR")
        m.set_operating_point(int(k))
        self.reset()

    def set_token_latency_ms(self, ms: float | None) -> None:
        """Decode under a token-latency budget of ``ms`` milliseconds from now on (None: no
        budget, nothing dropped: exact), without reloading. The first budget of an engine
        loaded without one measures the device's cost model (cached per device and model
        shape); a change of budget keeps what the planner has learnt of the costs.
        """
        from edge_prism.runtime.planner import check_budget_ms, planner_for

        check_budget_ms(ms)
        m = self.model
        if ms is not None and m.operating_point is None:
            raise ConfigError(f"{self.source}: a token-latency budget needs a prism checkpoint; run `edge-prism "
                              f"refactor {self.source} --out DIR` and load DIR")
        if ms is None:
            m.set_planner(None)
        elif m.planner is not None:
            m.planner.set_budget(ms / 1000)
        else:
            m.set_planner(planner_for(m, budget_s=ms / 1000, device=m.device, dtype=m.dtype))
        config = getattr(self, "config", None)
        if config is not None:
            self.config = dataclasses.replace(config, token_latency_ms=None if ms is None else float(ms))

    # -- generation ----------------------------------------------------------------------
    def _check_ids(self, ids: list[int], *, scoring: bool = False) -> None:
        # Generation needs one free position after the prompt; scoring does not.
        if len(ids) > self.max_context or (not scoring and len(ids) == self.max_context):
            raise ContextLengthError(
                f"the prompt is {len(ids)} tokens but the context holds {self.max_context}; "
                "shorten the prompt (or start a new chat with /reset)")
        vocab = self.spec.vocab_size
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise ConfigError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")

    def _stop_ids(self) -> frozenset[int]:
        stops = set(self.spec.eos_token_ids)
        if self._tokenizer is not None:
            stops |= set(self._tokenizer.stop_ids)
        return frozenset(stops)

    def _stream_text(self, ids: list[int], cfg: SamplingConfig) -> Iterator[str]:
        decoder = self.tokenizer.stream_decoder()
        tokens = self._generate_ids(ids, cfg)
        try:
            for tok in tokens:
                piece = decoder.push(tok)
                if piece:
                    yield piece
        finally:
            tokens.close()  # releases the engine now, not when the generator is collected
        tail = decoder.flush()
        if tail:
            yield tail

    def _generate_ids(self, ids: list[int], cfg: SamplingConfig) -> Iterator[int]:
        with self._exclusive():
            yield from self._generate_locked(ids, cfg)

    def _generate_locked(self, ids: list[int], cfg: SamplingConfig) -> Iterator[int]:
        from edge_prism.runtime.device import compute_sync

        self._check_ids(ids)
        stops = self._stop_ids()
        # Reuse the cached prefix (multi-turn chat); always recompute at least one token.
        keep = 0
        for a, b in zip(self._cached, ids[:-1]):
            if a != b:
                break
            keep += 1
        # An interrupted forward (Ctrl-C) may have left fewer positions cached than ids known.
        keep = min(keep, self.model.cache.length)
        self.model.reset(keep)
        self._cached = self._cached[:keep]
        stats = self._last = GenerationStats(prompt_tokens=len(ids), reused_prompt_tokens=keep)
        for part in self._reporters():
            part.reset_stats()  # runtime counters are reported per generation, like the rest
        budget = min(cfg.max_new_tokens, self.max_context - len(ids))
        if budget <= 0:
            return
        sampler = Sampler(cfg)
        start = time.perf_counter()
        logits = self.model.forward(torch.tensor(ids[keep:]))  # [1, V]
        self._cached = list(ids)
        compute_sync(self.model.device)  # device time, not enqueue time
        tick = time.perf_counter()
        stats.time_to_first_token_s = tick - start
        for step in range(budget):
            tok = sampler(logits[-1])
            if tok in stops:
                break
            stats.generated_tokens += 1
            yield tok
            if step == budget - 1:
                break
            t0 = time.perf_counter()
            logits = self.model.forward(torch.tensor([tok]))
            self._cached.append(tok)  # only once its keys and values are in the cache
            compute_sync(self.model.device)
            now = time.perf_counter()
            stats.token_latencies_s.append(now - t0)
            stats.decode_s += now - t0


def _sampling(kw: dict) -> SamplingConfig:
    try:
        return SamplingConfig(**{k: v for k, v in kw.items() if v is not None})
    except TypeError as e:
        raise ConfigError(f"unknown generation option: {e}") from None
