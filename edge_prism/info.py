"""Will it fit? What a model needs, before anything is built: `edge-prism info MODEL`.

checkpoint headers (no weights read but expert shapes and types) -> sizes per layer and
per precision -> minimum budget, hot-set budget (from a prism's activation profile) ->
decode tokens/s expected at a few budgets on this machine (a bytes-over-bandwidth estimate
from three quick measurements: int4 and float matmul throughput, and the copy bandwidth).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from edge_prism.errors import EdgePrismError
from edge_prism.runtime.sizes import format_size, parse_size
from edge_prism.select import max_operating_point, quotas
from edge_prism.spec import ModelSpec

log = logging.getLogger(__name__)

# Python and kernel-launch time per decode layer besides reading weights (measured on the
# default model: ~60 us on a 2-core Xeon with torch 2.13).
LAYER_OVERHEAD_S = 60e-6
HOT_SHARE = 0.01  # a sub-expert selected for at least 1% of tokens is "hot"


@dataclass
class LayerSize:
    """One decoder layer's sub-experts."""

    layer: int
    experts: int
    parts: int  # S
    block_bytes: int  # one sub-expert
    selected: int  # sub-experts one decode token selects at the operating point
    kind: str  # "float32" / "bfloat16" / "int4" / "int8" / "int4+int8"

    @property
    def nbytes(self) -> int:
        """Bytes of all the layer's sub-experts."""
        return self.experts * self.parts * self.block_bytes


@dataclass
class ModelInfo:
    """Sizes and budgets of one model at one operating point."""

    path: Path
    spec: ModelSpec
    prism: bool
    operating_point: int
    dense_bytes: int  # always-resident weights, as stored
    dense_read_bytes: int  # of which one decode token reads (all but the embedding table)
    layers: list[LayerSize]
    hot_bytes: int | None  # bytes of the sub-experts the profile selects for >= HOT_SHARE of tokens
    hit_rate_of: Callable[[int], float] | None = None  # budget bytes -> expected hit rate (from the profile)

    @property
    def expert_bytes(self) -> int:
        """Bytes of every sub-expert."""
        return sum(lb.nbytes for lb in self.layers)

    @property
    def minimum_budget(self) -> int:
        """The smallest budget that runs one layer's largest selection."""
        return max((lb.selected * lb.block_bytes for lb in self.layers), default=0)

    def selected_bytes(self) -> int:
        """Sub-expert bytes one decode token computes."""
        return sum(lb.selected * lb.block_bytes for lb in self.layers)


def model_info(path: Path, *, operating_point: int | None = None) -> ModelInfo:
    """Sizes of ``path`` (a prism checkpoint, an HF directory or a GGUF file); for a plain
    checkpoint, as its prism would store them with the default refactoring."""
    from edge_prism.refactor.prism import is_prism

    return _prism_info(path, operating_point) if is_prism(path) else _plain_info(path, operating_point)


def _kind(fmt) -> str:
    if fmt is None:
        return "float"
    gu, dn = ("int4", "int8")[fmt.gu_planes - 1], ("int4", "int8")[fmt.dn_planes - 1]
    return gu if gu == dn else f"{gu}+{dn}"


def _selected(spec: ModelSpec, layer: int, S: int, k: int) -> int:
    f = spec.ffn[layer]
    if f.routed:
        return sum(quotas(k, f.top_k, S))
    return S if spec.is_moe else min(k, S)


def _prism_info(path: Path, k: int | None) -> ModelInfo:
    from edge_prism.families import build_spec
    from edge_prism.refactor.prism import open_prism

    pc = open_prism(path)
    spec = build_spec(pc.config, where=str(path / "prism.json"))
    k = k or max_operating_point(spec, pc.parts)
    layers, heat = [], []
    for layer, S in enumerate(pc.parts):
        blocks = pc.blocks(layer)
        block_bytes = blocks[0].numel() * blocks.element_size()
        kind = _kind(pc.unit_format(layer))
        if kind == "float":
            kind = str(blocks.dtype).removeprefix("torch.")
        layers.append(LayerSize(layer, spec.ffn[layer].num_experts, S, block_bytes, _selected(spec, layer, S, k), kind))
        freq = pc.gate_tensor(f"layers.{layer}.frequency").tolist()  # share of tokens selecting each unit
        heat += [(fr, block_bytes) for fr in freq]
    dense_bytes = (path / "dense.safetensors").stat().st_size
    embed = _embedding_bytes(pc.dense_source, spec)
    heat.sort(reverse=True)
    hot = sum(b for fr, b in heat if fr >= HOT_SHARE)
    info = ModelInfo(path, spec, True, k, dense_bytes, dense_bytes - embed, layers, hot)
    info.hit_rate_of = _hit_rates(heat)
    return info


def _hit_rates(heat: list[tuple[float, int]]):
    """Budget bytes -> share of selected sub-experts found resident when the hottest fill it."""
    total = sum(fr for fr, _ in heat) or 1.0

    def rate(budget: int) -> float:
        held, hit = 0, 0.0
        for fr, b in heat:
            if held + b > budget:
                break
            held += b
            hit += fr
        return hit / total

    return rate


def _embedding_bytes(source, spec: ModelSpec) -> int:
    """Bytes of the embedding table (a token reads one row of it), 0 when tied (it is the lm_head)."""
    if spec.tie_word_embeddings:
        return 0
    name = "model.embed_tokens.weight"
    q = source.quantized(name) if hasattr(source, "quantized") else None
    if q is not None:
        return q.nbytes()
    shape = source.shape(name)
    return math.prod(shape) * 4


def _plain_info(path: Path, k: int | None) -> ModelInfo:
    from edge_prism.build import TensorReader, expected_shapes, expert_names_shapes
    from edge_prism.families import build_spec
    from edge_prism.loaders import open_checkpoint
    from edge_prism.quant import Int4Backend, QMatrix
    from edge_prism.refactor.refactor import RefactorConfig, _unit_format, parts_for

    raw = open_checkpoint(path)
    spec = build_spec(raw.config, where=str(path / "config.json" if path.is_dir() else path))
    cfg = RefactorConfig()
    parts = parts_for(spec, cfg.sub_experts)
    reader = TensorReader(raw.tensors, path, dtype=torch.float32, device=torch.device("cpu"),
                          backend=Int4Backend(torch.device("cpu")))
    k = k or max_operating_point(spec, parts)
    layers = []
    for layer, S in enumerate(parts):
        f = spec.ffn[layer]
        fmt = _unit_format(spec, reader, layer, S, cfg)
        block = fmt.nbytes if fmt is not None else 3 * (f.width // S) * spec.hidden_size * 4
        kind = _kind(fmt) if fmt is not None else "float32"
        layers.append(LayerSize(layer, f.num_experts, S, block, _selected(spec, layer, S, k), kind))
    experts = {n for layer in range(spec.num_layers) for n in expert_names_shapes(spec, layer)}
    dense = embed = 0
    for name, shape in expected_shapes(spec).items():
        if name in experts:
            continue
        q = reader.quantized(name, shape) if len(shape) == 2 else None
        nbytes = q.nbytes() if isinstance(q, QMatrix) else math.prod(shape) * 4
        dense += nbytes
        if name == "model.embed_tokens.weight" and not spec.tie_word_embeddings:
            embed = nbytes
    return ModelInfo(path, spec, False, k, dense, dense - embed, layers, None)


@dataclass(frozen=True)
class Rates:
    """What this machine does per second: int4 and float weight bytes computed, bytes copied."""

    int4_bytes_per_s: float
    float_bytes_per_s: float
    copy_bytes_per_s: float


def measure_rates(device: torch.device) -> Rates:
    """Three quick timings (~0.3 s): a 2048 x 2048 int4 and float32 matvec, a 64 MiB copy."""
    from edge_prism.quant import QMatrix, backend_for
    from edge_prism.runtime.device import measure_h2d_bandwidth, synchronize

    b = backend_for(device)
    w = torch.randn(2048, 2048)
    km = b.pack(QMatrix.quantize(w, "int4"))
    x = torch.randn(1, 2048, device=device)
    wf = w.t().contiguous().to(device)

    def timed(fn, n: int = 20) -> float:
        fn()
        synchronize(device)
        t = time.perf_counter()
        for _ in range(n):
            fn()
        synchronize(device)
        return (time.perf_counter() - t) / n

    t4 = timed(lambda: b.mm(x, km))
    tf = timed(lambda: x @ wf)
    copy = measure_h2d_bandwidth(device, nbytes=64 * 2**20, repeats=3)
    if device.type == "cpu":
        copy /= 2  # a streamed block is read from the file and converted on its way into a slot
    return Rates(km.nbytes() / t4, wf.numel() * 4 / tf, copy)


def expected_tokens_per_s(info: ModelInfo, budget: int | None, rates: Rates) -> float:
    """Decode tokens/s this machine should reach at ``budget`` (None: all resident): weight
    bytes read over the measured compute rate, misses over the copy rate, a fixed cost per
    layer. An estimate, not a measurement."""
    quant = all(lb.kind.startswith("int") for lb in info.layers)
    rate = rates.int4_bytes_per_s if quant else rates.float_bytes_per_s
    dense_rate = rates.int4_bytes_per_s if info.dense_bytes < info.expert_bytes else rates.float_bytes_per_s
    step = info.dense_read_bytes / dense_rate + info.selected_bytes() / rate
    step += LAYER_OVERHEAD_S * info.spec.num_layers
    if budget is not None and budget < info.expert_bytes:
        hit = info.hit_rate_of(budget) if info.hit_rate_of else budget / max(info.expert_bytes, 1)
        step += info.selected_bytes() * (1 - hit) / rates.copy_bytes_per_s
    return 1.0 / step


def describe(path: Path, *, memory_budget: str | None = None, operating_point: int | None = None,
             device: torch.device | None = None, measure: bool = True) -> list[str]:
    """The lines `edge-prism info MODEL` prints."""
    info = model_info(path, operating_point=operating_point)
    s = info.spec
    kinds = sorted({lb.kind for lb in info.layers})
    routed = [f for f in s.ffn if f.routed]
    shape = (f"{s.family}, {s.num_layers} layers, hidden {s.hidden_size}, "
             + (f"{routed[0].num_experts} experts (top {routed[0].top_k}) in {len(routed)} layers, "
                if routed else "dense, ") + f"{info.layers[0].parts} sub-experts per expert")
    lines = [f"model: {path} ({'prism checkpoint' if info.prism else 'as its prism would store it'})",
             f"  {shape}; operating point K={info.operating_point} of {max_operating_point(s, [lb.parts for lb in info.layers])}",
             f"  weights: {format_size(info.dense_bytes + info.expert_bytes)} = always resident "
             f"{format_size(info.dense_bytes)} + sub-experts {format_size(info.expert_bytes)} ({', '.join(kinds)})"]
    per_layer = sorted({(lb.block_bytes, lb.experts * lb.parts, lb.kind) for lb in info.layers})
    for block, units, kind in per_layer:
        count = sum(1 for lb in info.layers if (lb.block_bytes, lb.experts * lb.parts, lb.kind) == (block, units, kind))
        lines.append(f"  {count} layer(s) of {units} sub-experts x {format_size(block)} ({kind}) = "
                     f"{format_size(units * block)} per layer")
    lines.append(f"  per decode token: {format_size(info.dense_read_bytes + info.selected_bytes())} of weights read "
                 f"({format_size(info.selected_bytes())} of sub-experts)")
    lines.append(f"minimum memory budget: {format_size(info.minimum_budget)} ({info.minimum_budget} bytes)")
    if info.hot_bytes is not None:
        lines.append(f"hot set (sub-experts chosen for >= {HOT_SHARE:.0%} of calibration tokens): "
                     f"{format_size(info.hot_bytes)}: a budget of that holds "
                     f"{info.hit_rate_of(info.hot_bytes):.0%} of selections")
    else:
        lines.append("hot set: known once the prism is built (first run with a budget, or edge-prism refactor)")
    budgets: list[tuple[str, int | None]] = [("all resident", None)]
    total = info.expert_bytes
    for text in dict.fromkeys(([memory_budget] if memory_budget else []) + ["50%", "25%"]):
        try:
            budgets.append((text, max(info.minimum_budget, parse_size(text, total=total, what="memory budget"))))
        except EdgePrismError:
            if text == memory_budget:
                raise
    if measure:
        rates = measure_rates(device or torch.device("cpu"))
        est = ", ".join(f"{name}: {expected_tokens_per_s(info, b, rates):.0f}" for name, b in budgets)
        lines.append(f"expected decode tokens/s on {device or 'cpu'} (estimate from measured bandwidths; "
                     f"int4 {rates.int4_bytes_per_s / 1e9:.1f} GB/s, copies {rates.copy_bytes_per_s / 1e9:.1f} GB/s): "
                     f"{est}")
    return lines
