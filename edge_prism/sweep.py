"""The memory-budget sweep: decode speed and memory traffic of each system at each budget.

budgets x operating points -> per system: [the same model, that system's expert store] ->
warm-up -> greedy decode of the same prompts -> SweepRow -> table with ratios, CSV, PNG

Systems, all over the same prism checkpoint (or synthetic model) and budget:

- ``edge-prism``: our BudgetedStore (pinned hot region + LRU region), no prefetch;
  ``edge-prism+prefetch`` as well when ``load()`` takes ``prefetch``.
- ``subexpert-lru``: sub-expert LRU over every slot, no pinned region, no prefetch (the
  MoE-Prism paper's offloading manager). Ratios are printed against it.
- ``expert-lru``: whole experts are the unit of residency, LRU, no prefetch (the policy of
  mixtral-offloading): a miss on any part of an expert loads all of its parts.
- ``all-resident``: every sub-expert on the device (no budget).
- ``transformers+accelerate``: transformers with accelerate offloading under the same
  budget; CUDA only (skipped, with a note, on the CPU).
- ``bound``: max(compute, missed bytes / bandwidth) per token, where compute is the
  all-resident token latency and the missed bytes are edge-prism's; the bandwidth is
  measured host-to-device (on the CPU: memcpy, what moving a block into a slot costs there).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import gc
import inspect
import logging
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from edge_prism.errors import BudgetError, ConfigError, EdgePrismError
from edge_prism.runtime.store import BudgetedStore, LayerBlocks
from edge_prism.synthetic import SyntheticConfig

log = logging.getLogger(__name__)

SYSTEMS = ("edge-prism", "edge-prism+prefetch", "subexpert-lru", "expert-lru", "all-resident",
           "transformers+accelerate", "bound")
REFERENCE = "subexpert-lru"  # ratios are against the paper's offloading manager
ALL = "all"  # the memory_budget label of rows with every sub-expert resident


@dataclass(frozen=True)
class SweepConfig:
    """What one sweep measures: budgets x operating points x systems, and how."""

    memory_budgets: tuple[str, ...] = ("10%", "25%", "50%", "100%")
    operating_points: tuple[int, ...] | None = None  # None: full K only
    new_tokens: int = 32  # greedy decode length per prompt
    prompt_tokens: int = 64
    device: str = "auto"
    dtype: str | None = None
    repeats: int = 1  # prompts per measurement (different text windows, the same for every system)
    baselines: bool = True
    policy: str = "lru"  # edge-prism's dynamic region
    synthetic: SyntheticConfig | None = None  # set: sweep this synthetic model instead of a checkpoint
    threads: int | None = None  # CPU threads for compute during the sweep (None: torch's default)
    progress: bool = False
    # Token-latency budgets as multiples of edge-prism's unconstrained p50 at the same budget
    # (prism checkpoints only: the synthetic builder has no latency planner).
    latency_factors: tuple[float, ...] = (0.7, 3.0)

    def __post_init__(self) -> None:
        if not self.memory_budgets:
            raise ConfigError("no memory budgets: give at least one, like --memory-budgets 10%,25%,50%")
        if self.new_tokens < 2:
            raise ConfigError(f"invalid -n {self.new_tokens}: decode at least 2 tokens")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"invalid --threads {self.threads}: use 1 or more")
        if self.prompt_tokens < 1 or self.repeats < 1:
            raise ConfigError(f"invalid --prompt-tokens {self.prompt_tokens} / --repeats {self.repeats}: "
                              "use 1 or more")


@dataclass(frozen=True)
class SweepRow:
    """One system at one memory budget and operating point. None: not measured / not defined."""

    system: str
    memory_budget: str  # as given ('25%', '512MiB'), or 'all'
    operating_point: int
    tokens_per_s: float | None  # decode tokens per second
    ttft_s: float | None  # prefill of the prompt, to the first token
    hit_rate: float | None  # sub-expert blocks found resident / asked for, during decode
    bytes_per_token: float | None  # bytes moved to the device per decoded token
    p50_ms: float | None  # decode token latency percentiles
    p99_ms: float | None
    perplexity: float | None  # measured quality at this operating point (prism quality.json)
    synthetic: bool  # random weights: speed and traffic only, no quality
    device: str
    model: str = ""
    budget_bytes: int | None = None
    tokens: int = 0  # decoded tokens measured
    note: str = ""
    latency_budget_ms: float | None = None  # token-latency budget rows only
    within_budget: float | None = None  # fraction of decode tokens within it
    dropped_per_token: float | None = None  # sub-experts dropped per decode token (all layers)
    kl_vs_full: float | None = None  # mean KL(undegraded || degraded) of next-token distributions
    same_tokens: float | None = None  # fraction of greedy tokens equal to the undegraded engine's

    def as_dict(self) -> dict:
        """CSV-ready dict (None as an empty cell)."""
        return {k: ("" if v is None else v) for k, v in dataclasses.asdict(self).items()}


COLUMNS = tuple(f.name for f in dataclasses.fields(SweepRow))


# -- stores of the baselines -------------------------------------------------------------------
class SubExpertLRUStore(BudgetedStore):
    """Sub-expert LRU with no pinned region: every slot is replaceable (the paper's manager).

    Warmed with the hottest sub-experts like edge-prism's store, so the two differ only in
    what may be evicted.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs, pin_hot=False)


class ExpertLRUStore(SubExpertLRUStore):
    """Whole experts are the unit of residency (mixtral-offloading's LRU, no prefetch).

    Each request is widened to every part of each expert it touches before the LRU sees it,
    so bytes moved count whole experts. Build it with :func:`whole_expert_blocks` layers.
    """

    def slots(self, layer: int, units: torch.Tensor) -> torch.Tensor:
        """Slots of ``units`` [P], after making their experts wholly resident."""
        S = self.layers[layer].parts
        experts = torch.unique(units // S)  # sorted
        whole = (experts[:, None] * S + torch.arange(S)).reshape(-1)  # [E'*S], sorted
        if whole.numel() > self.capacity(layer):
            # Only a long prefill chunk gets here (a decode token fits by construction):
            # run it at sub-expert granularity rather than fail.
            return super().slots(layer, units)
        slots = super().slots(layer, whole)
        return slots[torch.searchsorted(whole, units)]


def whole_expert_blocks(layers: Sequence[LayerBlocks], spec, k: int) -> list[LayerBlocks]:
    """``layers`` with max_selection counted in whole experts (what ExpertLRUStore loads per token)."""
    from edge_prism.select import quotas

    out = []
    for lb, f in zip(layers, spec.ffn):
        experts = sum(1 for q in quotas(k, f.top_k, lb.parts) if q) if f.routed else 1
        out.append(dataclasses.replace(lb, max_selection=experts * lb.parts))
    return out


# -- what is swept: a prism checkpoint or a synthetic model --------------------------------------
class _PrismSubject:
    """A prism checkpoint: engines through load(), baseline stores swapped in after."""

    synthetic = False

    def __init__(self, path: Path, cfg: SweepConfig):
        from edge_prism.families import build_spec
        from edge_prism.refactor.prism import open_prism
        from edge_prism.runtime.device import resolve_device
        from edge_prism.select import max_operating_point

        self.path, self.cfg = path, cfg
        self.pc = open_prism(path)
        self.spec = build_spec(self.pc.config, where=str(path / "prism.json"))
        self.parts = self.pc.parts
        self.device = resolve_device(cfg.device)
        self.full = max_operating_point(self.spec, self.parts)
        self.name = path.name
        self._quality = {int(r["operating_point"]): float(r["perplexity"]) for r in self.pc.quality()
                         if r.get("curve") == "prism"}

    def _load(self, k: int, memory_budget, **extra):
        from edge_prism.api import load

        return load(self.path, device=self.cfg.device, dtype=self.cfg.dtype, operating_point=k,
                    memory_budget=memory_budget, policy=self.cfg.policy, **extra)

    def perplexity(self, k: int) -> float | None:
        return self._quality.get(k)

    def prompts(self, count: int, tokens: int) -> list[list[int]]:
        from edge_prism.evaluate import eval_ids
        from edge_prism.tokenizer import Tokenizer

        ids = eval_ids(Tokenizer.from_hf_dir(self.path), None, count * tokens).tolist()
        if len(ids) < count * tokens:
            raise ConfigError(f"the evaluation text has {len(ids)} tokens, fewer than {count} prompts of "
                              f"{tokens}; lower --prompt-tokens or --repeats")
        return [ids[i * tokens:(i + 1) * tokens] for i in range(count)]

    def layer_blocks(self, k: int) -> list[LayerBlocks]:
        from edge_prism.api import RuntimeConfig, layer_blocks

        dtype = RuntimeConfig(device=self.cfg.device, dtype=self.cfg.dtype).torch_dtype(self.device)
        return layer_blocks(self.pc, self.spec, k, dtype=dtype)  # held in the compute dtype, as load() does

    def budget_bytes(self, budget: str, k: int) -> int:
        from edge_prism.api import resolve_budget

        return resolve_budget(budget, self.layer_blocks(k), device=self.device,
                              resident_bytes=(self.path / "dense.safetensors").stat().st_size)

    def resident(self, k: int):
        return self._load(k, None)

    def ours(self, budget: str, k: int, prefetch: bool, token_latency_ms: float | None = None):
        extra: dict = {"prefetch": prefetch}
        if token_latency_ms is not None:
            extra["token_latency_ms"] = token_latency_ms
        return self._load(k, budget, **extra)

    def with_store(self, store_class, layers: list[LayerBlocks], budget: str, k: int):
        from edge_prism.runtime.store import minimum_budget, prism_tiers

        nbytes = self.budget_bytes(budget, k)
        from edge_prism.quant import backend_for

        formats = {layer: self.pc.unit_format(layer) for layer in range(self.spec.num_layers)}
        tiers = prism_tiers(self.path / "experts.safetensors", self.device, formats=formats,
                            backend=backend_for(self.device))
        store = store_class(tiers, layers, budget_bytes=nbytes, device=self.device, policy="lru")
        # load() builds edge-prism's store; the smallest one, replaced before any token runs.
        engine = self._load(k, minimum_budget(self.layer_blocks(k)), prefetch=False)
        _close_store(engine.model.store)
        engine.model.store = store
        return engine


class _SyntheticSubject:
    """A synthetic model: weights made once, every engine built over them."""

    synthetic = True

    def __init__(self, cfg: SweepConfig):
        from edge_prism.runtime.device import resolve_device
        from edge_prism.synthetic import SyntheticModel

        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        syn = dataclasses.replace(cfg.synthetic, dtype=cfg.synthetic.dtype or cfg.dtype)
        self.model = SyntheticModel(syn, device=self.device)
        self.spec, self.parts, self.name = self.model.spec, self.model.parts, self.model.name
        self.full = self.model.full_operating_point()

    def perplexity(self, k: int) -> float | None:
        return None  # random weights: perplexity says nothing

    def prompts(self, count: int, tokens: int) -> list[list[int]]:
        from edge_prism.synthetic import random_prompt

        return [random_prompt(self.spec, tokens, seed=self.model.cfg.seed + 1 + i) for i in range(count)]

    def layer_blocks(self, k: int) -> list[LayerBlocks]:
        return self.model.layer_blocks(k)

    def budget_bytes(self, budget: str, k: int) -> int:
        return self.model.budget_bytes(budget, k)

    def resident(self, k: int):
        return self.model.engine(self.model.resident_store(), operating_point=k)

    def ours(self, budget: str, k: int, prefetch: bool):
        store = self.model.budgeted_store(budget, k, policy=self.cfg.policy)
        return self.model.engine(store, operating_point=k, prefetch=prefetch)

    def with_store(self, store_class, layers: list[LayerBlocks], budget: str, k: int):
        store = store_class(self.model.tiers(), layers, budget_bytes=self.budget_bytes(budget, k),
                            device=self.device, policy="lru")
        return self.model.engine(store, operating_point=k)


# -- measuring ---------------------------------------------------------------------------------
@dataclass
class _Measured:
    tokens_per_s: float
    ttft_s: float
    hit_rate: float | None
    bytes_per_token: float | None
    p50_ms: float | None
    p99_ms: float | None
    tokens: int
    within_budget: float | None = None  # token-latency budget runs only
    dropped_per_token: float | None = None


def measure(engine, prompts: Sequence[Sequence[int]], warm: Sequence[int], new_tokens: int) -> _Measured:
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
    return _Measured(
        tokens_per_s=dec_n / dec_s if dec_s > 0 else 0.0,
        ttft_s=statistics.median(ttft),
        hit_rate=1.0 if resident else (hits / asked if asked else None),
        bytes_per_token=0.0 if resident else (moved / tokens if tokens else None),
        p50_ms=statistics.median(p50) if p50 else None,
        p99_ms=max(p99) if p99 else None,
        tokens=tokens,
        within_budget=statistics.mean(within) if within else None,
        dropped_per_token=statistics.mean(dropped) if dropped else None)


def _close_store(store) -> None:
    close = getattr(store, "close", None)
    if close is not None:
        close()


def _release(engine) -> None:
    """Free an engine before the next is built: its transfer threads stop after the copies in
    flight (a late copy must not land in memory the next engine's allocations reuse), its
    slot pools, pinned memory and KV cache are given back."""
    engine.close()
    gc.collect()


def device_label(device: torch.device) -> str:
    """'cpu (N threads)', or the GPU's name."""
    from edge_prism.runtime.device import gpu_info

    if device.type != "cuda":
        n = torch.get_num_threads()
        return f"cpu ({n} thread{'s' if n > 1 else ''})"
    gpus = {g["index"]: g["name"] for g in gpu_info()}
    return gpus.get(device.index or 0, str(device))


# -- the sweep ---------------------------------------------------------------------------------
def run_sweep(model: str | Path | None = None, *, memory_budgets: Sequence[str],
              operating_points: Sequence[int] | None = None, new_tokens: int = 32, prompt_tokens: int = 64,
              device: str = "auto", dtype: str | None = None, repeats: int = 1, baselines: bool = True,
              policy: str = "lru", synthetic: SyntheticConfig | None = None, threads: int | None = None,
              progress: bool = False) -> list[SweepRow]:
    """Measure every system at every memory budget and operating point; the rows.

    ``model``: a prism checkpoint (or 'default' / None: the default model's, built on first
    use). ``synthetic``: sweep that synthetic model instead (``model`` must then be None).
    """
    cfg = SweepConfig(memory_budgets=tuple(memory_budgets),
                      operating_points=None if operating_points is None else tuple(operating_points),
                      new_tokens=new_tokens, prompt_tokens=prompt_tokens, device=device, dtype=dtype,
                      repeats=repeats, baselines=baselines, policy=policy, synthetic=synthetic,
                      threads=threads, progress=progress)
    return sweep_with(model, cfg)


def _subject(model, cfg: SweepConfig):
    from edge_prism.api import default_prism
    from edge_prism.loaders import resolve_model
    from edge_prism.refactor.prism import is_prism

    if cfg.synthetic is not None:
        if model not in (None, "default"):
            raise ConfigError(f"give either a model ('{model}') or --synthetic, not both")
        return _SyntheticSubject(cfg)
    path = default_prism(progress=cfg.progress) if model in (None, "default") else resolve_model(model)
    if not is_prism(path):
        raise ConfigError(f"{path}: memory budgets need a prism checkpoint; run "
                          f"`edge-prism refactor {path} --out DIR` and sweep DIR")
    return _PrismSubject(path, cfg)


def sweep_with(model: str | Path | None, cfg: SweepConfig) -> list[SweepRow]:
    """run_sweep() with a ready SweepConfig."""
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        # On a CPU shared with other work, fewer compute threads than cores avoids stalls
        # of a whole token on a descheduled thread.
        torch.set_num_threads(cfg.threads)
    try:
        return _sweep(model, cfg)
    finally:
        torch.set_num_threads(threads)


def _sweep(model: str | Path | None, cfg: SweepConfig) -> list[SweepRow]:
    from edge_prism.select import check_operating_point

    subject = _subject(model, cfg)
    points = list(cfg.operating_points or [subject.full])
    for k in points:
        check_operating_point(k, subject.spec, subject.parts)
    prompts = subject.prompts(cfg.repeats + 1, cfg.prompt_tokens)
    warm, prompts = prompts[-1], prompts[:-1]
    dev = device_label(subject.device)
    common = dict(synthetic=subject.synthetic, device=dev, model=subject.name)
    systems = ["edge-prism", "edge-prism+prefetch"]
    if cfg.baselines:
        systems += ["subexpert-lru", "expert-lru"]
    jobs = [(k, ALL, "all-resident") for k in points if cfg.baselines]
    jobs += [(k, b, s) for k in points for b in cfg.memory_budgets for s in systems]
    rows: list[SweepRow] = []
    bar = tqdm(jobs, desc="sweep", unit="run", disable=not cfg.progress)
    for k, budget, system in bar:
        bar.set_postfix_str(f"K={k} {budget} {system}")
        rows.append(_run_one(subject, cfg, system, budget, k, prompts, warm, common))
    if not subject.synthetic:
        rows += _latency_rows(subject, cfg, rows, prompts, warm, common)
    if cfg.baselines:
        rows += _transformers_rows(subject, cfg, points, prompts, common)
        rows += _bound_rows(subject, rows, common)
    order = {s: i for i, s in enumerate(SYSTEMS)}
    budgets = {b: i for i, b in enumerate([ALL, *cfg.memory_budgets])}
    rows.sort(key=lambda r: (-r.operating_point, budgets.get(r.memory_budget, len(budgets)),
                             order.get(r.system, len(order))))
    return rows


def _run_one(subject, cfg: SweepConfig, system: str, budget: str, k: int, prompts, warm, common) -> SweepRow:
    nbytes = None
    try:
        if system == "all-resident":
            engine = subject.resident(k)
        else:
            nbytes = subject.budget_bytes(budget, k)
            if system in ("edge-prism", "edge-prism+prefetch"):
                engine = subject.ours(budget, k, prefetch=system.endswith("prefetch"))
            elif system == "subexpert-lru":
                engine = subject.with_store(SubExpertLRUStore, subject.layer_blocks(k), budget, k)
            else:
                layers = whole_expert_blocks(subject.layer_blocks(k), subject.spec, k)
                engine = subject.with_store(ExpertLRUStore, layers, budget, k)
    except (BudgetError, torch.OutOfMemoryError) as e:
        log.warning("%s at %s, K=%d: %s", system, budget, k, e)
        return SweepRow(system, budget, k, None, None, None, None, None, None, subject.perplexity(k),
                        budget_bytes=nbytes, note=f"not run: {e}", **common)
    try:
        m = measure(engine, prompts, warm, cfg.new_tokens)
    finally:
        _release(engine)
    return SweepRow(system, budget, k, m.tokens_per_s, m.ttft_s, m.hit_rate, m.bytes_per_token, m.p50_ms,
                    m.p99_ms, subject.perplexity(k), budget_bytes=nbytes, tokens=m.tokens, **common)


@torch.inference_mode()
def lockstep_quality(degraded, reference, prompt: Sequence[int], new_tokens: int) -> tuple[float, float]:
    """Mean KL(reference || degraded) of the next-token distribution over a greedy decode
    driven by the degraded engine, and the fraction of steps whose argmax both agree on."""
    import torch.nn.functional as F

    for e in (degraded, reference):
        e.reset()
    ids = torch.tensor(list(prompt))
    d, r = degraded.model.forward(ids)[-1], reference.model.forward(ids)[-1]
    kl, same = 0.0, 0
    for _ in range(new_tokens):
        kl += float(F.kl_div(F.log_softmax(d, -1), F.log_softmax(r, -1), log_target=True, reduction="sum"))
        tok = int(d.argmax())
        same += int(tok == int(r.argmax()))
        nxt = torch.tensor([tok])
        d, r = degraded.model.forward(nxt)[-1], reference.model.forward(nxt)[-1]
    for e in (degraded, reference):
        e.reset()
    return kl / new_tokens, same / new_tokens


def _latency_rows(subject, cfg: SweepConfig, rows: list[SweepRow], prompts, warm, common) -> list[SweepRow]:
    """edge-prism under token-latency budgets of ``cfg.latency_factors`` x its unconstrained p50."""
    out = []
    base_system = "edge-prism+prefetch"
    for base in [r for r in rows if r.system == base_system and r.p50_ms]:
        reference = subject.resident(base.operating_point)
        for factor in cfg.latency_factors:
            budget_ms = factor * base.p50_ms
            engine = subject.ours(base.memory_budget, base.operating_point, prefetch=True,
                                  token_latency_ms=budget_ms)
            try:
                m = measure(engine, prompts, warm, cfg.new_tokens)
                kl, same = lockstep_quality(engine, reference, prompts[0], cfg.new_tokens)
            finally:
                _release(engine)
            out.append(SweepRow(
                f"edge-prism+latency x{factor:g}", base.memory_budget, base.operating_point, m.tokens_per_s,
                m.ttft_s, m.hit_rate, m.bytes_per_token, m.p50_ms, m.p99_ms,
                subject.perplexity(base.operating_point), budget_bytes=base.budget_bytes, tokens=m.tokens,
                latency_budget_ms=budget_ms, within_budget=m.within_budget, dropped_per_token=m.dropped_per_token,
                kl_vs_full=kl,
                same_tokens=same, note=f"token-latency budget {factor:g} x unconstrained p50", **common))
        _release(reference)
    return out


def _bound_rows(subject, rows: list[SweepRow], common) -> list[SweepRow]:
    from edge_prism.runtime.device import measure_h2d_bandwidth

    bw = measure_h2d_bandwidth(subject.device)
    where = "memcpy bandwidth (CPU)" if subject.device.type != "cuda" else "pinned host-to-device bandwidth"
    compute = {r.operating_point: 1.0 / r.tokens_per_s for r in rows
               if r.system == "all-resident" and r.tokens_per_s}
    out = []
    for r in rows:
        if r.system != "edge-prism" or r.bytes_per_token is None or r.operating_point not in compute:
            continue
        latency = max(compute[r.operating_point], r.bytes_per_token / bw)
        out.append(SweepRow("bound", r.memory_budget, r.operating_point, 1.0 / latency, None, r.hit_rate,
                            r.bytes_per_token, None, None, r.perplexity, budget_bytes=r.budget_bytes,
                            note=f"max(all-resident compute, edge-prism's missed bytes / {bw / 1e9:.1f} GB/s "
                                 f"{where})", **common))
    return out


def _transformers_rows(subject, cfg: SweepConfig, points, prompts, common) -> list[SweepRow]:
    """transformers + accelerate offloading at full K under each budget (CUDA only)."""
    full = subject.full
    if subject.device.type != "cuda":
        log.warning("transformers+accelerate baseline skipped: accelerate offloading needs a CUDA device")
        return [SweepRow("transformers+accelerate", "-", full, None, None, None, None, None, None, None,
                         note="skipped: accelerate offloading needs a CUDA device", **common)]
    if full not in points:
        return []
    out = []
    for budget in cfg.memory_budgets:
        nbytes = subject.budget_bytes(budget, full)
        try:
            tps, ttft, n = _transformers_measure(subject, cfg, nbytes, prompts)
        except (ImportError, EdgePrismError, RuntimeError, ValueError, OSError) as e:
            log.warning("transformers+accelerate at %s: %s", budget, e)
            out.append(SweepRow("transformers+accelerate", budget, full, None, None, None, None, None, None,
                                subject.perplexity(full), budget_bytes=nbytes,
                                note=f"failed: {type(e).__name__}: {e}"[:300], **common))
            continue
        out.append(SweepRow("transformers+accelerate", budget, full, tps, ttft, None, None, None, None,
                            subject.perplexity(full), budget_bytes=nbytes, tokens=n,
                            note="device_map with max_memory = budget + non-expert weights", **common))
    return out


def _transformers_measure(subject, cfg: SweepConfig, budget_bytes: int, prompts) -> tuple[float, float, int]:
    from edge_prism.runtime.device import synchronize

    hf = _hf_offloaded(subject, cfg, budget_bytes)
    try:
        ttft, dec_s, dec_n = [], 0.0, 0
        for ids in prompts:
            x = torch.tensor([list(ids)], device=subject.device)
            t0 = time.perf_counter()
            hf.generate(x, max_new_tokens=1, do_sample=False)
            synchronize(subject.device)
            t1 = time.perf_counter()
            hf.generate(x, max_new_tokens=cfg.new_tokens, min_new_tokens=cfg.new_tokens, do_sample=False)
            synchronize(subject.device)
            t2 = time.perf_counter()
            ttft.append(t1 - t0)
            dec_s += max((t2 - t1) - (t1 - t0), 1e-9)
            dec_n += cfg.new_tokens - 1
        return dec_n / dec_s, statistics.median(ttft), dec_n + len(prompts)
    finally:
        del hf
        gc.collect()


def _hf_offloaded(subject, cfg: SweepConfig, budget_bytes: int):
    """The model in transformers, dispatched by accelerate with the budget as GPU memory."""
    import accelerate
    from transformers import AutoConfig, AutoModelForCausalLM

    from edge_prism.api import RuntimeConfig
    from edge_prism.runtime.device import host_available_bytes

    dtype = RuntimeConfig(dtype=cfg.dtype).torch_dtype(subject.device)
    index = subject.device.index or 0
    if subject.synthetic:
        from edge_prism.synthetic import synthetic_config_dict

        raw = synthetic_config_dict(subject.model.cfg.model, layers=subject.model.cfg.layers)
        hf_cfg = AutoConfig.for_model(raw.pop("model_type"), **raw)
        model = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype).eval()
    else:
        src = Path(subject.pc.manifest.get("source", {}).get("path", ""))
        kw = {"gguf_file": src.name} if src.suffix == ".gguf" else {}
        root = src.parent if src.suffix == ".gguf" else src
        if not root.exists():
            raise ConfigError(f"the source model {src} of {subject.path} is gone")
        model = AutoModelForCausalLM.from_pretrained(root, dtype=dtype, device_map="cpu", **kw).eval()
    expert = subject.spec.expert_param_bytes(dtype.itemsize)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    max_memory = {index: params - expert + budget_bytes, "cpu": host_available_bytes()}
    device_map = accelerate.infer_auto_device_map(model, max_memory=max_memory,
                                                  no_split_module_classes=model._no_split_modules)
    return accelerate.dispatch_model(model, device_map=device_map)


# -- reporting ---------------------------------------------------------------------------------
def _cell(v, width: int, spec: str, scale: float = 1.0) -> str:
    return f"{'-' if v is None else format(v * scale, spec):>{width}}"


def _reference(rows: Sequence[SweepRow]) -> dict:
    return {(r.memory_budget, r.operating_point): r for r in rows if r.system == REFERENCE}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def format_table(rows: Sequence[SweepRow]) -> str:
    """The rows as a fixed-width table, with tokens/s and bytes ratios against sub-expert LRU."""
    if not rows:
        return "(no rows)"
    ref = _reference(rows)
    syn = any(r.synthetic for r in rows)
    name_w = max(len(r.system) for r in rows) + (12 if syn else 0)
    head = (f"{'system':{name_w}} {'budget':>7} {'K':>4} {'tok/s':>8} {'ttft s':>7} {'hit %':>6} "
            f"{'MiB/tok':>8} {'p50 ms':>7} {'p99 ms':>7} {'ppl':>7} {'x tok/s':>8} {'x bytes':>8}")
    label = " [SYNTHETIC random weights: speed and traffic only]" if syn else ""
    lines = [f"memory-budget sweep: {rows[0].model} on {rows[0].device}{label}", head, "-" * len(head)]
    for r in rows:
        base = ref.get((r.memory_budget, r.operating_point))
        x_tps = _ratio(r.tokens_per_s, base.tokens_per_s) if base else None
        x_bytes = _ratio(r.bytes_per_token, base.bytes_per_token) if base else None
        name = r.system + (" (synthetic)" if r.synthetic else "")
        lines.append(
            f"{name:{name_w}} {r.memory_budget:>7} {r.operating_point:>4} {_cell(r.tokens_per_s, 8, '.2f')} "
            f"{_cell(r.ttft_s, 7, '.3f')} {_cell(r.hit_rate, 6, '.1f', 100)} "
            f"{_cell(r.bytes_per_token, 8, '.3f', 1 / 2**20)} {_cell(r.p50_ms, 7, '.1f')} "
            f"{_cell(r.p99_ms, 7, '.1f')} {_cell(r.perplexity, 7, '.2f')} {_cell(x_tps, 8, '.2f')} "
            f"{_cell(x_bytes, 8, '.2f')}")
    lat = [r for r in rows if r.latency_budget_ms is not None]
    if lat:
        lines += ["", f"{'token-latency budget':{name_w}} {'budget':>7} {'K':>4} {'limit ms':>8} "
                      f"{'within %':>8} {'drop/tok':>8} {'KL':>8} {'same %':>7}"]
        for r in lat:
            lines.append(f"{r.system:{name_w}} {r.memory_budget:>7} {r.operating_point:>4} "
                         f"{_cell(r.latency_budget_ms, 8, '.1f')} {_cell(r.within_budget, 8, '.1f', 100)} "
                         f"{_cell(r.dropped_per_token, 8, '.1f')} {_cell(r.kl_vs_full, 8, '.4f')} "
                         f"{_cell(r.same_tokens, 7, '.1f', 100)}")
    notes = sorted({f"{r.system}: {r.note}" for r in rows if r.note})
    lines += ["", f"x tok/s, x bytes: ratio to {REFERENCE} at the same budget and K",
              *[f"note: {n}" for n in notes]]
    return "\n".join(lines)


def write_csv(rows: Sequence[SweepRow], path: str | Path) -> None:
    """Write the rows to ``path`` atomically (a temporary file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            for r in rows:
                w.writerow(r.as_dict())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_csv(path: str | Path) -> list[SweepRow]:
    """Rows written by :func:`write_csv`."""
    types = {f.name: f.type for f in dataclasses.fields(SweepRow)}
    out = []
    with open(path, newline="") as f:
        for raw in csv.DictReader(f):
            kw = {}
            for name, text in raw.items():
                t = str(types[name])
                if text == "":
                    kw[name] = None if "None" in t else ("" if t == "str" else 0)
                elif t.startswith("float"):
                    kw[name] = float(text)
                elif t.startswith("int"):
                    kw[name] = int(text)
                elif t == "bool":
                    kw[name] = text == "True"
                else:
                    kw[name] = text
            out.append(SweepRow(**kw))
    return out


_COLORS = {"edge-prism": "tab:blue", "edge-prism+prefetch": "tab:cyan", "subexpert-lru": "tab:orange",
           "expert-lru": "tab:red", "all-resident": "tab:green", "transformers+accelerate": "tab:purple",
           "bound": "black"}


def plot(rows: Sequence[SweepRow], path: str | Path) -> None:
    """A PNG: tokens/s, MiB moved per token and hit rate against the memory budget, one line
    per system and operating point; all-resident and the bound only where they mean something."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = list(dict.fromkeys(r.memory_budget for r in rows if r.memory_budget not in (ALL, "-")))
    points = sorted({r.operating_point for r in rows}, reverse=True)
    styles = dict(zip(points, ["-", "--", ":", "-."] * 4))
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.2))
    panels = [("tokens_per_s", "decode tokens/s", 1.0),
              ("bytes_per_token", "MiB moved to the device per token", 1 / 2**20),
              ("hit_rate", "hit rate (%)", 100.0)]
    for i, (ax, (field, label, scale)) in enumerate(zip(axes, panels)):
        for system in SYSTEMS:
            if i and system in ("all-resident", "bound"):
                continue  # their traffic is nil or edge-prism's: only their speed says something
            for k in points:
                sel = [r for r in rows if r.system == system and r.operating_point == k
                       and getattr(r, field) is not None]
                if not sel:
                    continue
                name = system + (f" K={k}" if len(points) > 1 else "")
                if system == "bound":
                    name += " (upper bound)"
                color = _COLORS.get(system)
                if system == "all-resident":
                    ax.axhline(getattr(sel[0], field) * scale, color=color, ls=styles[k], lw=1.2, label=name)
                    continue
                sel = [r for r in sel if r.memory_budget in budgets]
                xs = [budgets.index(r.memory_budget) for r in sel]
                ys = [getattr(r, field) * scale for r in sel]
                ax.plot(xs, ys, color=color, ls=styles[k], marker="x" if system == "bound" else "o",
                        lw=1.8 if system.startswith("edge-prism") else 1.1, label=name)
        ax.set_xticks(range(len(budgets)), budgets)
        ax.set_xlabel("memory budget (resident sub-expert bytes)")
        ax.set_ylabel(label)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8, frameon=False)
    r0 = rows[0]
    syn = "  [SYNTHETIC random weights: speed and traffic only]" if r0.synthetic else ""
    fig.suptitle(f"memory-budget sweep: {r0.model} on {r0.device}{syn}", fontsize=12)
    fig.tight_layout(rect=(0, 0.05 * (1 + (len(labels) - 1) // 6), 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


# -- command line ------------------------------------------------------------------------------
def _budgets(text: str) -> tuple[str, ...]:
    from edge_prism.runtime.sizes import parse_size

    out = tuple(b.strip() for b in text.split(",") if b.strip())
    for b in out:
        parse_size(b, total=100, what="memory budget")  # fail before any slow work
    if not out:
        raise ConfigError(f"invalid --memory-budgets '{text}': use a list like 10%,25%,50%,100%")
    return out


def _points(text: str | None) -> tuple[int, ...] | None:
    if text is None or text.strip().lower() == "full":
        return None
    try:
        return tuple(dict.fromkeys(int(p) for p in text.split(",") if p.strip()))
    except ValueError:
        raise ConfigError(f"invalid --operating-points '{text}': use integers like 16,12 or 'full'") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The sweep's options (shared by `edge-prism sweep` and scripts/sweep.py)."""
    from edge_prism.cliargs import add_model_args

    add_model_args(p, positional=True)
    p.add_argument("--memory-budgets", default="10%,25%,50%,100%",
                   help="comma-separated budgets of resident sub-expert bytes (25%%, 512MiB, ...)")
    p.add_argument("--operating-points", default=None,
                   help="comma-separated K values (default: full K only)")
    p.add_argument("-n", "--max-new-tokens", type=int, default=32, help="greedy tokens decoded per prompt")
    p.add_argument("--prompt-tokens", type=int, default=64, help="prompt length in tokens")
    p.add_argument("--repeats", type=int, default=1, help="prompts per measurement (different text windows)")
    p.add_argument("--policy", default="lru", choices=("lru", "lfu"), help="edge-prism's dynamic region")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU compute threads during the sweep (default: torch's, one per core)")
    p.add_argument("--no-baselines", action="store_true", help="measure edge-prism only")
    p.add_argument("-o", "--out", default=None, help="write the rows to this CSV file")
    p.add_argument("--plot", default=None, help="write a PNG plot to this file")
    syn = p.add_argument_group("synthetic model (random weights at real shapes; no download)")
    syn.add_argument("--synthetic", default=None, metavar="PRESET|CONFIG.json",
                     help="olmoe-1b-7b, qwen3-30b-a3b, or a Hugging Face config.json (instead of MODEL)")
    syn.add_argument("--layers", type=int, default=None, help="run only this many layers of the shape")
    syn.add_argument("--sub-experts", type=int, default=None, help="sub-experts per expert (default 8)")
    syn.add_argument("--skew", type=float, default=0.0, help="routing skew: 0 uniform, larger = Zipf-like")
    syn.add_argument("--seed", type=int, default=0, help="weight seed")


def cmd_sweep(args: argparse.Namespace) -> int:
    """Run the sweep the options describe; print the table, write the CSV and plot."""
    syn = None
    if args.synthetic is not None:
        syn = SyntheticConfig(model=args.synthetic, layers=args.layers, sub_experts=args.sub_experts,
                              skew=args.skew, seed=args.seed)
    elif args.layers is not None or args.sub_experts is not None:
        raise ConfigError("--layers and --sub-experts apply to --synthetic models only")
    model = None if syn is not None and args.model == "default" else args.model
    rows = run_sweep(model, memory_budgets=_budgets(args.memory_budgets),
                     operating_points=_points(args.operating_points), new_tokens=args.max_new_tokens,
                     prompt_tokens=args.prompt_tokens, device=args.device, dtype=args.dtype,
                     repeats=args.repeats, baselines=not args.no_baselines, policy=args.policy,
                     synthetic=syn, threads=args.threads, progress=True)
    print(format_table(rows))
    if args.out:
        write_csv(rows, args.out)
        print(f"wrote {args.out}", file=sys.stderr)
    if args.plot:
        plot(rows, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def add_sweep_parser(subparsers) -> Callable[[argparse.Namespace], int]:
    """Add the ``sweep`` subcommand to ``subparsers``; returns its handler."""
    p = subparsers.add_parser(
        "sweep", help="decode speed and memory traffic per memory budget, against baselines",
        description="Measure tokens/s, time to first token, hit rate, bytes moved per token and "
                    "token latency at each memory budget and operating point, for edge-prism and the "
                    "baselines (sub-expert LRU, expert LRU, all-resident, the bandwidth bound) on the "
                    "same model and prompts; print ratios, write a CSV and a plot.")
    add_arguments(p)
    return cmd_sweep


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point (scripts/sweep.py): the same options as `edge-prism sweep`."""
    p = argparse.ArgumentParser(prog="sweep.py", description="The memory-budget sweep of edge-prism.")
    p.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    add_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return cmd_sweep(args)
    except EdgePrismError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


__all__ = ["SweepConfig", "SweepRow", "COLUMNS", "SYSTEMS", "run_sweep", "sweep_with", "measure",
           "format_table", "write_csv", "read_csv", "plot", "add_sweep_parser", "main",
           "SubExpertLRUStore", "ExpertLRUStore", "whole_expert_blocks"]
