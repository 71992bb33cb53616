"""The sweep's baselines: the stores other offloading systems use, transformers + accelerate,
and the bandwidth bound.

- sub-expert LRU (the MoE-Prism paper's manager): BudgetedStore with no pinned region.
- expert LRU (mixtral-offloading): whole experts are the unit of residency.
- transformers + accelerate: the source model dispatched under the same budget (CUDA only).
- bound: max(all-resident compute, edge-prism's missed bytes / measured bandwidth) per token.

transformers and accelerate are benchmark-only dependencies: imported by the one function
that builds that baseline, never when this module is imported.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import statistics
import time
from pathlib import Path
from typing import Sequence

import torch

from edge_prism.api import RuntimeConfig
from edge_prism.errors import ConfigError, EdgePrismError
from edge_prism.runtime.device import host_available_bytes, measure_h2d_bandwidth, synchronize
from edge_prism.runtime.store import BudgetedStore, LayerBlocks
from edge_prism.select import quotas
from edge_prism.spec import ModelSpec
from edge_prism.sweep_config import SweepConfig, SweepRow
from edge_prism.sweep_subjects import Subject
from edge_prism.synthetic import synthetic_config_dict

log = logging.getLogger(__name__)


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


def whole_expert_blocks(layers: Sequence[LayerBlocks], spec: ModelSpec, k: int) -> list[LayerBlocks]:
    """``layers`` with max_selection counted in whole experts (what ExpertLRUStore loads per token)."""
    out = []
    for lb, f in zip(layers, spec.ffn):
        experts = sum(1 for q in quotas(k, f.top_k, lb.parts) if q) if f.routed else 1
        out.append(dataclasses.replace(lb, max_selection=experts * lb.parts))
    return out


# -- the bandwidth bound -----------------------------------------------------------------------
def bound_rows(subject: Subject, rows: list[SweepRow], common: dict) -> list[SweepRow]:
    """A 'bound' row per edge-prism row: the token rate if only compute and its misses cost time."""
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


# -- transformers + accelerate -----------------------------------------------------------------
def transformers_rows(subject: Subject, cfg: SweepConfig, points: Sequence[int], prompts,
                      common: dict) -> list[SweepRow]:
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


def _transformers_measure(subject: Subject, cfg: SweepConfig, budget_bytes: int,
                          prompts) -> tuple[float, float, int]:
    hf = _hf_offloaded(subject, cfg, budget_bytes)
    try:
        ttft, dec_s, dec_n = [], 0.0, 0
        for ids in prompts:
            x = torch.tensor([list(ids)], device=subject.device)  # [1, T]
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


def _hf_offloaded(subject: Subject, cfg: SweepConfig, budget_bytes: int):
    """The model in transformers, dispatched by accelerate with the budget as GPU memory."""
    # Benchmark-only dependencies (the 'test' extra), imported here so that importing the
    # sweep, and the CLI that offers it, never needs them.
    import accelerate
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = RuntimeConfig(dtype=cfg.dtype).torch_dtype(subject.device)
    index = subject.device.index or 0
    if subject.synthetic:
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


__all__ = ["SubExpertLRUStore", "ExpertLRUStore", "whole_expert_blocks", "bound_rows", "transformers_rows"]
