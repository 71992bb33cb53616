"""What a sweep measures: a prism checkpoint or a synthetic model, and its engines.

model | --synthetic -> Subject: spec, parts, full K, prompts, budgets in bytes ->
engines per system: all-resident, edge-prism's store (with or without prefetch, token-latency
budget), or a baseline store class over the same blocks
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Protocol

import torch

from edge_prism.api import RuntimeConfig, default_prism, layer_blocks, load, resolve_budget
from edge_prism.engine import Engine
from edge_prism.errors import ConfigError
from edge_prism.evaluate import eval_ids
from edge_prism.families import build_spec
from edge_prism.loaders import resolve_model
from edge_prism.quant import backend_for
from edge_prism.refactor.prism import is_prism, open_prism
from edge_prism.runtime.device import resolve_device
from edge_prism.runtime.store import LayerBlocks, minimum_budget, prism_tiers
from edge_prism.select import max_operating_point
from edge_prism.spec import ModelSpec
from edge_prism.sweep_config import SweepConfig
from edge_prism.synthetic import SyntheticModel, random_prompt
from edge_prism.tokenizer import Tokenizer


class Subject(Protocol):
    """The model a sweep runs every system on, and the engines it builds."""

    synthetic: bool
    name: str
    spec: ModelSpec
    parts: list[int]
    device: torch.device
    full: int  # full operating point

    def perplexity(self, k: int) -> float | None: ...
    def prompts(self, count: int, tokens: int) -> list[list[int]]: ...
    def layer_blocks(self, k: int) -> list[LayerBlocks]: ...
    def budget_bytes(self, budget: str, k: int) -> int: ...
    def resident(self, k: int) -> Engine: ...
    def ours(self, budget: str, k: int, prefetch: bool, token_latency_ms: float | None = None) -> Engine: ...
    def with_store(self, store_class, layers: list[LayerBlocks], budget: str, k: int) -> Engine: ...


def open_subject(model: str | Path | None, cfg: SweepConfig) -> Subject:
    """The subject ``model`` (None / 'default': the default prism) or ``cfg.synthetic`` names."""
    if cfg.synthetic is not None:
        if model not in (None, "default"):
            raise ConfigError(f"give either a model ('{model}') or --synthetic, not both")
        return SyntheticSubject(cfg)
    path = default_prism(progress=cfg.progress) if model in (None, "default") else resolve_model(model)
    if not is_prism(path):
        raise ConfigError(f"{path}: memory budgets need a prism checkpoint; run "
                          f"`edge-prism refactor {path} --out DIR` and sweep DIR")
    return PrismSubject(path, cfg)


class PrismSubject:
    """A prism checkpoint: engines through load(), baseline stores swapped in after."""

    synthetic = False

    def __init__(self, path: Path, cfg: SweepConfig):
        self.path, self.cfg = path, cfg
        self.pc = open_prism(path)
        self.spec = build_spec(self.pc.config, where=str(path / "prism.json"))
        self.parts = self.pc.parts
        self.device = resolve_device(cfg.device)
        self.full = max_operating_point(self.spec, self.parts)
        self.name = path.name
        self._quality = {int(r["operating_point"]): float(r["perplexity"]) for r in self.pc.quality()
                         if r.get("curve") == "prism"}

    def _load(self, k: int, memory_budget, **extra) -> Engine:
        return load(self.path, device=self.cfg.device, dtype=self.cfg.dtype, operating_point=k,
                    memory_budget=memory_budget, policy=self.cfg.policy, **extra)

    def perplexity(self, k: int) -> float | None:
        return self._quality.get(k)

    def prompts(self, count: int, tokens: int) -> list[list[int]]:
        ids = eval_ids(Tokenizer.from_hf_dir(self.path), None, count * tokens).tolist()
        if len(ids) < count * tokens:
            raise ConfigError(f"the evaluation text has {len(ids)} tokens, fewer than {count} prompts of "
                              f"{tokens}; lower --prompt-tokens or --repeats")
        return [ids[i * tokens:(i + 1) * tokens] for i in range(count)]

    def layer_blocks(self, k: int) -> list[LayerBlocks]:
        dtype = RuntimeConfig(device=self.cfg.device, dtype=self.cfg.dtype).torch_dtype(self.device)
        return layer_blocks(self.pc, self.spec, k, dtype=dtype)  # held in the compute dtype, as load() does

    def budget_bytes(self, budget: str, k: int) -> int:
        return resolve_budget(budget, self.layer_blocks(k), device=self.device,
                              resident_bytes=(self.path / "dense.safetensors").stat().st_size)

    def resident(self, k: int) -> Engine:
        return self._load(k, None)

    def ours(self, budget: str, k: int, prefetch: bool, token_latency_ms: float | None = None) -> Engine:
        extra: dict = {"prefetch": prefetch}
        if token_latency_ms is not None:
            extra["token_latency_ms"] = token_latency_ms
        return self._load(k, budget, **extra)

    def with_store(self, store_class, layers: list[LayerBlocks], budget: str, k: int) -> Engine:
        nbytes = self.budget_bytes(budget, k)
        formats = {layer: self.pc.unit_format(layer) for layer in range(self.spec.num_layers)}
        tiers = prism_tiers(self.path / "experts.safetensors", self.device, formats=formats,
                            backend=backend_for(self.device))
        store = store_class(tiers, layers, budget_bytes=nbytes, device=self.device, policy="lru")
        # load() builds edge-prism's store; the smallest one, replaced before any token runs.
        engine = self._load(k, minimum_budget(self.layer_blocks(k)), prefetch=False)
        engine.model.store.close()
        engine.model.store = store
        return engine


class SyntheticSubject:
    """A synthetic model: weights made once, every engine built over them."""

    synthetic = True

    def __init__(self, cfg: SweepConfig):
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        syn = dataclasses.replace(cfg.synthetic, dtype=cfg.synthetic.dtype or cfg.dtype)
        self.model = SyntheticModel(syn, device=self.device)
        self.spec, self.parts, self.name = self.model.spec, self.model.parts, self.model.name
        self.full = self.model.full_operating_point()

    def perplexity(self, k: int) -> float | None:
        return None  # random weights: perplexity says nothing

    def prompts(self, count: int, tokens: int) -> list[list[int]]:
        return [random_prompt(self.spec, tokens, seed=self.model.cfg.seed + 1 + i) for i in range(count)]

    def layer_blocks(self, k: int) -> list[LayerBlocks]:
        return self.model.layer_blocks(k)

    def budget_bytes(self, budget: str, k: int) -> int:
        return self.model.budget_bytes(budget, k)

    def resident(self, k: int) -> Engine:
        return self.model.engine(self.model.resident_store(), operating_point=k)

    def ours(self, budget: str, k: int, prefetch: bool, token_latency_ms: float | None = None) -> Engine:
        if token_latency_ms is not None:
            raise ConfigError("token-latency budgets need a prism checkpoint (a synthetic model has no "
                              "latency planner); sweep a prism checkpoint for them")
        store = self.model.budgeted_store(budget, k, policy=self.cfg.policy)
        return self.model.engine(store, operating_point=k, prefetch=prefetch)

    def with_store(self, store_class, layers: list[LayerBlocks], budget: str, k: int) -> Engine:
        store = store_class(self.model.tiers(), layers, budget_bytes=self.budget_bytes(budget, k),
                            device=self.device, policy="lru")
        return self.model.engine(store, operating_point=k)


__all__ = ["Subject", "open_subject", "PrismSubject", "SyntheticSubject"]
