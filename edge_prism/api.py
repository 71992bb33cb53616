"""``load()``: the one entry point that turns a model name and budgets into an Engine."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from edge_prism.build import (ResidentStore, TensorReader, build_weights, check_shapes, pack_layer)
from edge_prism.engine import Engine
from edge_prism.errors import ConfigError
from edge_prism.families import build_spec
from edge_prism.loaders import open_checkpoint, resolve_model
from edge_prism.model import Transformer
from edge_prism.spec import ModelSpec

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class RuntimeConfig:
    """How to run a model: built once by load() or the CLI and passed down whole."""

    device: str = "auto"
    dtype: str | None = None  # None: float32 on CPU, bfloat16/float16 on CUDA
    max_context: int | None = None  # None: the model's max_position_embeddings
    operating_point: int | None = None  # None: the checkpoint's default (full K)
    gate: str | None = None  # None: the prism checkpoint's default gate kind

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        """The compute dtype for ``device``."""
        from edge_prism.runtime.device import default_dtype

        if self.dtype is None:
            return default_dtype(device)
        try:
            return _DTYPES[self.dtype]
        except KeyError:
            raise ConfigError(f"invalid dtype '{self.dtype}': use one of {', '.join(_DTYPES)}") from None


def load(model: str | Path | None = None, *, device: str = "auto", dtype: str | None = None,
         max_context: int | None = None, operating_point: int | None = None,
         gate: str | None = None) -> Engine:
    """Load ``model`` and return an Engine ready to generate.

    ``model``: a Hugging Face directory, a .gguf file, a prism checkpoint directory, or
    None / 'default' for the bundled SmolLM2-135M-Instruct. ``operating_point``: active
    sub-experts per token per MoE layer (prism checkpoints; default full, exact).
    """
    cfg = RuntimeConfig(device=device, dtype=dtype, max_context=max_context,
                        operating_point=operating_point, gate=gate)
    return load_with(model, cfg)


def build_plain(spec: ModelSpec, reader: TensorReader, *, dtype: torch.dtype,
                device: torch.device) -> Transformer:
    """A fully resident model from a plain checkpoint (each expert one sub-expert)."""
    check_shapes(spec, reader)
    weights = build_weights(spec, reader)
    pools = [pack_layer(spec, reader, layer).to(device) for layer in range(spec.num_layers)]
    return Transformer(spec, weights, ResidentStore(pools), parts=[1] * spec.num_layers,
                       dtype=dtype, device=device)


def load_with(model: str | Path | None, cfg: RuntimeConfig) -> Engine:
    """load() with a ready RuntimeConfig."""
    from edge_prism.refactor.prism import is_prism
    from edge_prism.runtime.device import resolve_device

    dev = resolve_device(cfg.device)
    dtype = cfg.torch_dtype(dev)
    path = resolve_model(model)
    if is_prism(path):
        transformer, tokenizer = _build_prism(path, cfg, dtype=dtype, device=dev)
    else:
        if cfg.operating_point is not None or cfg.gate is not None:
            raise ConfigError(f"{path}: operating points need a prism checkpoint; run "
                              f"`edge-prism refactor {path} --out DIR` and load DIR")
        raw = open_checkpoint(path)
        spec = build_spec(raw.config, where=str(path / "config.json" if path.is_dir() else path))
        reader = TensorReader(raw.tensors, path, dtype=dtype, device=dev)
        transformer, tokenizer = build_plain(spec, reader, dtype=dtype, device=dev), raw.tokenizer
    spec = transformer.spec
    max_ctx = cfg.max_context or spec.max_position
    if max_ctx < 2:
        raise ConfigError(f"invalid max_context {max_ctx}: use at least 2 tokens")
    return Engine(transformer, tokenizer, source=path, max_context=min(max_ctx, spec.max_position))


def _build_prism(path: Path, cfg: RuntimeConfig, *, dtype: torch.dtype, device: torch.device):
    from edge_prism.refactor.gates import GATE_KINDS
    from edge_prism.refactor.prism import open_prism
    from edge_prism.select import SubExpertSelector, check_operating_point, max_operating_point
    from edge_prism.tokenizer import Tokenizer

    pc = open_prism(path)
    spec = build_spec(pc.config, where=str(path / "prism.json"))
    reader = TensorReader(pc.dense, path, dtype=dtype, device=device)
    check_shapes(spec, reader, experts=False)
    weights = build_weights(spec, reader)
    parts = pc.parts
    pools = []
    for layer in range(spec.num_layers):
        blocks = pc.blocks(layer)  # [U, 3, n, D] storage order (mmap)
        pool = torch.empty(blocks.shape, dtype=dtype, device=device)
        pool[pc.order(layer).to(device)] = blocks.to(device=device, dtype=dtype)
        pools.append(pool)
    model = Transformer(spec, weights, ResidentStore(pools), parts=parts, dtype=dtype, device=device)
    kind = cfg.gate or pc.manifest["gates"]["default"]
    if kind not in GATE_KINDS:
        raise ConfigError(f"invalid gate '{kind}': use one of {', '.join(GATE_KINDS)}")
    full = max_operating_point(spec, parts)
    k = check_operating_point(cfg.operating_point or pc.manifest.get("default_operating_point") or full,
                              spec, parts)
    if k != full:  # full K needs no gate: the exact path stays untouched
        gates = [_layer_gate(pc, layer, kind, dtype, device) for layer in range(spec.num_layers)]
        model.selector = SubExpertSelector(spec, parts, gates, k)
    model.operating_point = k
    return model, Tokenizer.from_hf_dir(path)


def _layer_gate(pc, layer: int, kind: str, dtype: torch.dtype, device: torch.device):
    from edge_prism.select import LayerGate

    names = ("proxy.rows", "proxy.scale") if kind == "proxy" else ("linear.weight", "linear.bias")
    a, b = (pc.gate_tensor(f"layers.{layer}.{n}").to(device=device, dtype=dtype) for n in names)
    return LayerGate(kind, a, b)
