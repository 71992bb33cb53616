"""Measuring one engine of the sweep: decode timing and traffic, and quality against a reference.

engine -> warm-up -> per prompt: prefill (time to first token) -> greedy decode (tokens/s,
hit rate, bytes, token latency) -> Measured;  degraded + reference engines -> lock-step
greedy decode -> teacher-forced KL and greedy agreement
"""

from __future__ import annotations

import gc
import statistics
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from edge_prism.engine import Engine
from edge_prism.runtime.device import gpu_info


@dataclass(frozen=True)
class Measured:
    """What :func:`measure` found; None: the engine's store does not count it."""

    tokens_per_s: float
    ttft_s: float
    hit_rate: float | None
    bytes_per_token: float | None
    p50_ms: float | None
    p99_ms: float | None
    tokens: int
    within_budget: float | None = None  # token-latency budget runs only
    dropped_per_token: float | None = None


def measure(engine: Engine, prompts: Sequence[Sequence[int]], warm: Sequence[int], new_tokens: int) -> Measured:
    """Greedy-decode ``new_tokens`` after each prompt; prefill and decode counted apart.

    A short generation on ``warm`` first (allocator, threads, slots in a steady state, as in
    a running chat). Each prompt is prefilled to its first token (time to first token),
    then decoded from the cached prompt with the runtime's counters reset, so hit rate
    and bytes cover decode tokens only.
    """
    engine.generate_ids(list(warm), max_new_tokens=4, temperature=0)
    ttft, dec_s, dec_n, tokens, hits, asked, moved, p50, p99 = [], 0.0, 0, 0, 0, 0, 0, [], []
    within, dropped = [], []
    for ids in prompts:
        engine.reset()
        first = engine.generate_ids(list(ids), max_new_tokens=1, temperature=0)
        ttft.append(engine.stats["time_to_first_token_s"])
        if not first:
            continue  # the prompt ended the text at once: nothing to decode
        engine.generate_ids(list(ids) + first, max_new_tokens=new_tokens, temperature=0)
        st = engine.stats
        n = st["generated_tokens"]
        if st["decode_tokens_per_s"] > 0:
            dec_s += max(n - 1, 0) / st["decode_tokens_per_s"]
            dec_n += max(n - 1, 0)
        tokens += n
        if "hits" in st:
            hits += st["hits"]
            asked += st["hits"] + st["misses"]
            moved += st["bytes_to_device"]
        if "token_latency_p50_ms" in st:
            p50.append(st["token_latency_p50_ms"])
            p99.append(st["token_latency_p99_ms"])
        if st.get("tokens_within_budget") is not None:
            within.append(st["tokens_within_budget"])
            dropped.append(st["dropped_subexperts_per_token"])
    engine.reset()
    resident = "hits" not in engine.stats
    return Measured(
        tokens_per_s=dec_n / dec_s if dec_s > 0 else 0.0,
        ttft_s=statistics.median(ttft),
        hit_rate=1.0 if resident else (hits / asked if asked else None),
        bytes_per_token=0.0 if resident else (moved / tokens if tokens else None),
        p50_ms=statistics.median(p50) if p50 else None,
        p99_ms=max(p99) if p99 else None,
        tokens=tokens,
        within_budget=statistics.mean(within) if within else None,
        dropped_per_token=statistics.mean(dropped) if dropped else None)


@torch.inference_mode()
def lockstep_quality(degraded: Engine, reference: Engine, prompt: Sequence[int],
                     new_tokens: int) -> tuple[float, float]:
    """Mean KL(reference || degraded) of the next-token distribution over a greedy decode
    driven by the degraded engine, and the fraction of steps whose argmax both agree on."""
    # V=vocabulary
    for e in (degraded, reference):
        e.reset()
    ids = torch.tensor(list(prompt))  # [T]
    d, r = degraded.model.forward(ids)[-1], reference.model.forward(ids)[-1]  # [V], [V]
    kl, same = 0.0, 0
    for _ in range(new_tokens):
        kl += float(F.kl_div(F.log_softmax(d, -1), F.log_softmax(r, -1), log_target=True, reduction="sum"))
        tok = int(d.argmax())
        same += int(tok == int(r.argmax()))
        nxt = torch.tensor([tok])  # [1]
        d, r = degraded.model.forward(nxt)[-1], reference.model.forward(nxt)[-1]  # [V], [V]
    for e in (degraded, reference):
        e.reset()
    return kl / new_tokens, same / new_tokens


def release(engine: Engine) -> None:
    """Free an engine before the next is built: its transfer threads stop after the copies in
    flight (a late copy must not land in memory the next engine's allocations reuse), its
    slot pools, pinned memory and KV cache are given back."""
    engine.close()
    gc.collect()


def device_label(device: torch.device) -> str:
    """'cpu (N threads)', or the GPU's name."""
    if device.type != "cuda":
        n = torch.get_num_threads()
        return f"cpu ({n} thread{'s' if n > 1 else ''})"
    gpus = {g["index"]: g["name"] for g in gpu_info()}
    return gpus.get(device.index or 0, str(device))


__all__ = ["Measured", "measure", "lockstep_quality", "release", "device_label"]
