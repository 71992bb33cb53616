"""``load()``: the one entry point that turns a model name and budgets into an Engine."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from edge_prism.build import ResidentStore, TensorReader, WholeBudgetStore, build_weights, check_shapes
from edge_prism.engine import Engine
from edge_prism.errors import BudgetError, ConfigError, EdgePrismError
from edge_prism.families import build_spec
from edge_prism.loaders import open_checkpoint, resolve_model
from edge_prism.model import Transformer
from edge_prism.paths import cache_root
from edge_prism.plain import build_plain, plain_parts
from edge_prism.spec import ModelSpec

log = logging.getLogger(__name__)

# cache_root (edge_prism.paths) and build_plain / plain_parts (edge_prism.plain) live below this
# module and stay importable from it: the refactoring, which cached_prism() calls, reaches them
# without importing this module.

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class RuntimeConfig:
    """How to run a model: built once by load() or the CLI and passed down whole."""

    device: str = "auto"
    dtype: str | None = None  # None: float32 on CPU, bfloat16/float16 on CUDA
    max_context: int | None = None  # None: the model's max_position_embeddings
    operating_point: int | None = None  # None: the checkpoint's default (full K)
    gate: str | None = None  # None: the prism checkpoint's default gate kind
    memory_budget: str | int | None = None  # None: every sub-expert resident
    policy: str = "lru"  # replacement policy of the dynamic slot region
    # Predict and load later layers' sub-experts ahead of use under a budget. None: where it
    # pays, a CUDA device (its copy engine runs beside the kernels); not on a CPU, where the
    # copies take the same cores as the compute (measured: prefetch costs tokens/s there).
    prefetch: bool | None = None
    token_latency_ms: float | None = None  # None: never drop sub-experts (exact)
    dequantize: bool = False  # expand quantized weights to the compute dtype at load (reference path)
    host_tier: str = "auto"  # under a budget, sub-experts outside it: 'ram' (pinned), 'disk' or 'auto'
    # Spread the operating point's sub-experts across layers by the checkpoint's measured layer
    # sensitivity (allocation.LayerAllocation), where it has one; False: every layer at K.
    layer_allocation: bool = True
    # Below full K, add back each dropped sub-expert's mean output (refactor.gates.compensation),
    # where the checkpoint has the tables; False: dropped sub-experts contribute nothing.
    compensation: bool = True

    def __post_init__(self) -> None:
        from numbers import Integral

        from edge_prism.runtime.planner import check_budget_ms
        from edge_prism.runtime.policy import POLICIES

        k, ms, budget = self.operating_point, self.token_latency_ms, self.memory_budget
        if k is not None and (isinstance(k, bool) or not isinstance(k, Integral) or k < 1):
            raise ConfigError(f"invalid operating point {k!r}: use a whole number of active sub-experts "
                              "per token per layer, 1 or more")
        check_budget_ms(ms)
        if self.policy not in POLICIES:
            raise ConfigError(f"invalid residency policy {self.policy!r}: use one of {', '.join(POLICIES)}")
        if self.host_tier not in ("auto", "ram", "disk"):
            raise ConfigError(f"invalid host tier {self.host_tier!r}: use auto, ram (sub-experts in pinned "
                              "host RAM) or disk (read from the checkpoint file)")
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (str, Integral))
                                   or (isinstance(budget, Integral) and budget < 0)):
            raise ConfigError(f"invalid memory budget {budget!r}: use a byte count, '512MiB', '1.5GiB', "
                              "'25%' or 'auto'")

    def torch_dtype(self, device: torch.device) -> torch.dtype:
        """The compute dtype for ``device`` (bfloat16 is refused where it is not native)."""
        from edge_prism.runtime.device import check_compute_dtype, default_dtype

        if self.dtype is None:
            return default_dtype(device)
        try:
            dtype = _DTYPES[self.dtype]
        except KeyError:
            raise ConfigError(f"invalid dtype '{self.dtype}': use one of {', '.join(_DTYPES)}") from None
        check_compute_dtype(device, dtype)
        return dtype


def load(model: str | Path | None = None, **options) -> Engine:
    """Load ``model`` and return an Engine ready to generate.

    ``model``: a Hugging Face directory, a .gguf file, a prism checkpoint directory, or
    None / 'default' for the bundled SmolLM2-135M-Instruct. ``options`` are the fields of
    :class:`RuntimeConfig`: ``device``, ``dtype``, ``max_context``, ``operating_point``
    (active sub-experts per token per MoE layer; default full, exact), ``gate``,
    ``memory_budget`` (bytes of sub-expert weights resident on the device: '512MiB',
    '1.5GiB', a byte count, '25%' of all sub-experts, or 'auto'; the rest stream in,
    predicted and loaded ahead of use when ``prefetch``), ``policy``, ``prefetch``,
    ``token_latency_ms`` (a decode token runs with fewer sub-experts rather than miss this
    budget), ``dequantize`` (expand quantized weights to floats at load) and ``host_tier``
    (where sub-experts outside the budget wait: 'ram', 'disk' or 'auto').

    Every byte the engine will hold is counted first (:func:`memory_report`); a BudgetError
    naming what to lower comes before anything is allocated. The engine holds threads and
    memory until ``engine.close()``: ``with edge_prism.load(...) as engine:`` releases them.
    """
    known = {f.name for f in dataclasses.fields(RuntimeConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"unknown load() option '{unknown[0]}': use {', '.join(sorted(known))}")
    return load_with(model, RuntimeConfig(**options))


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
        if (cfg.operating_point is not None or cfg.gate is not None or cfg.memory_budget is not None
                or cfg.token_latency_ms is not None):
            # Sub-experts are needed: build (first use) or reuse this model's prism in the cache.
            return load_with(cached_prism(path), cfg)
        raw = open_checkpoint(path)
        spec = build_spec(raw.config, where=str(path / "config.json" if path.is_dir() else path))
        _checked(_plain_memory(path, raw, spec, cfg, dtype=dtype, device=dev))
        reader = TensorReader(raw.tensors, path, dtype=dtype, device=dev, backend=_backend(cfg, dev))
        transformer, tokenizer = build_plain(spec, reader, dtype=dtype, device=dev), raw.tokenizer
    spec = transformer.spec
    max_ctx = spec.max_position if cfg.max_context is None else cfg.max_context
    if max_ctx < 2:
        raise ConfigError(f"invalid max_context {max_ctx}: use at least 2 tokens")
    engine = Engine(transformer, tokenizer, source=path, max_context=min(max_ctx, spec.max_position))
    engine.config = cfg  # what memory_report(engine) and reloads need
    return engine


def _backend(cfg: RuntimeConfig, device: torch.device):
    """The int4 backend of ``device``, or None when quantized weights are to be expanded."""
    from edge_prism.quant import backend_for

    return None if cfg.dequantize else backend_for(device)


def _build_prism(path: Path, cfg: RuntimeConfig, *, dtype: torch.dtype, device: torch.device):
    from edge_prism.refactor.gates import GATE_KINDS
    from edge_prism.refactor.prism import open_prism
    from edge_prism.select import check_operating_point, max_operating_point
    from edge_prism.tokenizer import Tokenizer

    pc = open_prism(path)
    spec = build_spec(pc.config, where=str(path / "prism.json"))
    backend = _backend(cfg, device)
    reader = TensorReader(pc.dense_source, path, dtype=dtype, device=device, backend=backend)
    check_shapes(spec, reader, experts=False)
    parts = pc.parts
    kind = cfg.gate or pc.manifest["gates"]["default"]
    if kind not in GATE_KINDS + ("oracle",):
        raise ConfigError(f"invalid gate '{kind}': use one of {', '.join(GATE_KINDS)}")
    if kind == "oracle" and cfg.memory_budget is not None:
        raise ConfigError("the oracle gate is for quality measurements and needs every sub-expert "
                          "resident: drop --memory-budget")
    full = max_operating_point(spec, parts)
    k = cfg.operating_point
    if k is None:
        k = pc.manifest.get("default_operating_point") or full
    k = check_operating_point(k, spec, parts)
    allocation = prism_allocation(pc, spec) if cfg.layer_allocation else None
    points = k if allocation is None else allocation.points(k)
    plan = _checked(_prism_memory(pc, spec, points, cfg, dtype=dtype, device=device))
    if cfg.memory_budget is None:
        store, kernels = _resident_store(pc, spec, backend, dtype=dtype, device=device)
    else:
        store, kernels = _budgeted_store(pc, spec, points, cfg, backend, dtype=dtype, device=device,
                                         budget_bytes=plan.memory_budget_bytes)
    weights = build_weights(spec, reader)
    # Gates are loaded at every K (they are small), so Engine.set_operating_point can move to
    # any K later; at full K nothing reads them (the model builds no selector: the exact path).
    if kind == "oracle":
        from edge_prism.select import LayerGate

        gates = [LayerGate("oracle", float_pool(pc, layer, dtype=dtype, device=device),
                           spec.ffn[layer].num_experts) for layer in range(spec.num_layers)]
    else:
        gates = [_layer_gate(pc, layer, kind, dtype, device) for layer in range(spec.num_layers)]
    model = Transformer(spec, weights, store, parts=parts, kernels=kernels, dtype=dtype, device=device,
                        gates=gates)
    model.set_allocation(allocation)
    model.set_compensation(_compensation_tables(pc, spec) if cfg.compensation else None)
    model.set_operating_point(k)
    if prefetch_applies(cfg, device) and store.streams:  # only a store that streams can prefetch
        model.set_prefetcher(_prefetcher(pc, model))
    if cfg.token_latency_ms is not None:
        model.set_planner(_planner(model, cfg, device=device, dtype=dtype))
    return model, Tokenizer.from_hf_dir(path)


def prism_allocation(pc, spec: ModelSpec):
    """The checkpoint's per-layer allocation (allocation.LayerAllocation), None where it
    stores no measured layer sensitivity (every layer at K)."""
    from edge_prism.allocation import LayerAllocation

    record = pc.manifest.get("layer_sensitivity")
    if not record:
        return None
    grid = record.get("grid") or [1]
    return LayerAllocation(spec, pc.parts, record.get("values"), lowest=min(grid),
                           where=str(pc.path / "prism.json"))


def float_pool(pc, layer: int, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``layer``'s sub-experts as float blocks [U, 3, n, D] in unit order (quantized ones expanded)."""
    if pc.unit_format(layer) is None:
        blocks = pc.blocks(layer)  # [U, 3, n, D] storage order (mmap)
        pool = torch.empty(blocks.shape, dtype=dtype, device=device)
        pool[pc.order(layer).to(device)] = blocks.to(device=device, dtype=dtype)
        return pool
    wg, wu, wd = pc.unit_matrices(layer)  # [U, n, D], [U, n, D], [U, D, n]
    U, n, D = wg.shape
    return torch.stack((wg, wu, wd.reshape(U, n, D)), dim=1).to(device=device, dtype=dtype)


def _resident_store(pc, spec: ModelSpec, backend, *, dtype: torch.dtype, device: torch.device,
                    budget_bytes: int | None = None) -> tuple[ResidentStore, list]:
    """Every sub-expert resident (``budget_bytes``: a budget that holds all), and each layer's
    kernel: float blocks in unit order (a full layer is one run: no gather), or per expert the
    quantized parts joined into one matrix pair."""
    from edge_prism.kernels import FloatUnits, QuantExperts, expert_matrices

    pools, kernels, units = [], [], []
    for layer in range(spec.num_layers):
        fmt, S = pc.unit_format(layer), pc.parts[layer]
        units.append(spec.ffn[layer].num_experts * S)
        if fmt is None or backend is None:
            pools.append(float_pool(pc, layer, dtype=dtype, device=device))
            kernels.append(FloatUnits())
            continue
        blocks = pc.blocks(layer)  # [U, nbytes] storage order
        pos = torch.empty(units[-1], dtype=torch.long)
        pos[pc.order(layer).long()] = torch.arange(units[-1])
        pools.append([expert_matrices([blocks[int(p)] for p in pos[e * S:(e + 1) * S]], fmt, backend)
                      for e in range(spec.ffn[layer].num_experts)])
        kernels.append(QuantExperts(fmt, S, backend))
    if budget_bytes is None:
        return ResidentStore(pools, units), kernels
    return WholeBudgetStore(pools, units, budget_bytes=budget_bytes), kernels


def layer_blocks(pc, spec: ModelSpec, k: int | list[int], *, dtype: torch.dtype | None = None) -> list:
    """Where each layer's blocks live and how many one token selects at operating point ``k``
    (a list: each layer's own, see allocation.LayerAllocation).

    ``dtype``: the compute dtype float blocks are held in (slots, host tiers), converted once
    on their way in; None keeps the stored dtype. Quantized blocks stay bytes.
    """
    from edge_prism.runtime.store import LayerBlocks
    from edge_prism.select import quotas

    points = [k] * spec.num_layers if isinstance(k, int) else list(k)
    out = []
    for layer, (f, S, kl) in enumerate(zip(spec.ffn, pc.parts, points)):
        if f.routed:
            most = sum(quotas(kl, f.top_k, S))
        else:
            most = S if spec.is_moe else min(kl, S)
        blocks = pc.blocks(layer)
        held = blocks.dtype if dtype is None or pc.unit_format(layer) is not None else dtype
        out.append(LayerBlocks(
            layer=layer, parts=S, units=blocks.shape[0], block_shape=tuple(blocks.shape[1:]),
            dtype=held, offset=pc.block_range(layer)[0], order=pc.order(layer).tolist(),
            frequency=pc.gate_tensor(f"layers.{layer}.frequency").tolist(), max_selection=most,
            storage_dtype=None if held == blocks.dtype else blocks.dtype))
    return out


def resolve_budget(budget: str | int, layers: list, *, device: torch.device, resident_bytes: int) -> int:
    """Budget bytes from '512MiB', '25%', a count or 'auto' (free device memory less the rest)."""
    from edge_prism.runtime.device import free_memory_bytes
    from edge_prism.runtime.sizes import parse_size
    from edge_prism.runtime.store import _block_bytes

    from edge_prism.runtime.accounting import auto_budget

    total = sum(lb.units * _block_bytes(lb) for lb in layers)
    if str(budget).strip().lower() == "auto":
        # ``resident_bytes``: everything else the engine holds (load() counts every item:
        # see memory_report; sweeps pass the dense weights).
        return auto_budget(free=free_memory_bytes(device), fixed=resident_bytes, experts=total)
    return min(total, parse_size(budget, total=total, what="memory budget"))


def _budgeted_store(pc, spec: ModelSpec, k: int | list[int], cfg: RuntimeConfig, backend, *, dtype: torch.dtype,
                    device: torch.device, budget_bytes: int):
    from edge_prism.runtime.sizes import format_size
    from edge_prism.runtime.store import BudgetedStore, _block_bytes, minimum_budget, prism_tiers

    layers = layer_blocks(pc, spec, k, dtype=dtype)
    nbytes = budget_bytes
    total = sum(lb.units * _block_bytes(lb) for lb in layers)
    if nbytes >= total:
        # Everything fits: no streaming, and blocks stay in unit order (no gather copies).
        return _resident_store(pc, spec, backend, dtype=dtype, device=device, budget_bytes=nbytes)
    m = minimum_budget(layers)
    if nbytes < m:
        raise BudgetError(f"memory budget '{cfg.memory_budget}' is {format_size(nbytes)}, below what one "
                          f"layer's largest selection needs: minimum is {format_size(m)} ({m} bytes); "
                          "raise --memory-budget or lower --operating-point")
    from edge_prism.kernels import FloatUnits, QuantUnits

    formats = {layer: pc.unit_format(layer) for layer in range(spec.num_layers)}
    if backend is None and any(formats.values()):
        raise ConfigError(f"{pc.path}: its sub-experts are quantized and stream as they are stored; "
                          "drop dequantize=True to run it under a memory budget")
    tiers = prism_tiers(pc.path / "experts.safetensors", device, host=cfg.host_tier, formats=formats,
                        backend=backend)
    kernels = [FloatUnits() if formats[layer] is None else QuantUnits(formats[layer], backend)
               for layer in range(spec.num_layers)]
    return BudgetedStore(tiers, layers, budget_bytes=nbytes, device=device, policy=cfg.policy,
                         in_place=reads_in_place(cfg, device, formats, backend)), kernels


def reads_in_place(cfg: RuntimeConfig, device: torch.device, formats: dict, backend) -> bool:
    """Whether a budgeted store reads its misses where they lie in the mapped experts file
    instead of copying them into slots: on the CPU, whose RAM the file's page cache already
    is, when every block is stored as the kernel reads it (quantized blocks on AVX-512
    CPUs); ``host_tier='disk'`` copies them (the offloading managers' way, for comparison)."""
    return (device.type == "cpu" and cfg.host_tier != "disk" and all(formats.values())
            and backend is not None and backend.native_blocks)


def memory_report(model, cfg: RuntimeConfig | None = None) -> dict:
    """Every byte an engine of ``model`` holds, per item and per memory, and whether it fits.

    ``model``: what load() takes (a path, or None for the default model), or a loaded Engine
    (its source and config). ``cfg``: the runtime options (default: the engine's, or
    RuntimeConfig()). Nothing is allocated: sizes come from the checkpoint's headers.

    Keys: ``dense_bytes`` (always-resident weights), ``kv_cache_bytes`` (at ``max_context``)
    and ``kv_growth_bytes`` (more while it grows by doubling, worst case), ``workspace_bytes``
    (activations of a max_context prefill, estimated), ``slot_pool_bytes`` (the budget's
    slots, or every sub-expert when none), ``host_tier_bytes`` (sub-experts in page-locked
    RAM), ``staging_bytes``; ``device_total_bytes`` and ``host_total_bytes`` against
    ``device_free_bytes`` and ``host_available_bytes`` (for an engine, free memory is what is
    left beside it); ``unified`` (one memory: CPU, integrated GPU), ``memory_budget_bytes``
    (what 'auto' or '25%' stand for), ``fits`` and ``problem`` (the BudgetError load() gives).
    """
    from edge_prism.refactor.prism import is_prism, open_prism
    from edge_prism.runtime.device import resolve_device

    if isinstance(model, Engine):
        cfg = cfg or getattr(model, "config", None) or RuntimeConfig()
        path = model.source
    else:
        cfg = cfg or RuntimeConfig()
        path = resolve_model(model)
    device = resolve_device(cfg.device)
    dtype = cfg.torch_dtype(device)
    if is_prism(path):
        from edge_prism.select import check_operating_point, max_operating_point

        pc = open_prism(path)
        spec = build_spec(pc.config, where=str(path / "prism.json"))
        k = cfg.operating_point or pc.manifest.get("default_operating_point") or max_operating_point(spec, pc.parts)
        k = check_operating_point(k, spec, pc.parts)
        allocation = prism_allocation(pc, spec) if cfg.layer_allocation else None
        try:
            plan = _prism_memory(pc, spec, k if allocation is None else allocation.points(k), cfg, dtype=dtype,
                                 device=device)
        except BudgetError as e:  # a budget below the minimum: reported, not raised
            return {"device": str(device), "memory_budget_bytes": None, "fits": False, "problem": str(e)}
    else:
        raw = open_checkpoint(path)
        spec = build_spec(raw.config, where=str(path / "config.json" if path.is_dir() else path))
        plan = _plain_memory(path, raw, spec, cfg, dtype=dtype, device=device)
    return plan.as_dict()


def _checked(plan):
    """Log the plan (``-v``) and raise its BudgetError when it does not fit."""
    for line in plan.lines():
        log.info("%s", line)
    plan.check()
    return plan


def _max_context(spec: ModelSpec, cfg: RuntimeConfig) -> int:
    return min(spec.max_position if cfg.max_context is None else max(cfg.max_context, 2), spec.max_position)


def _kv_bytes_per_position(spec: ModelSpec, dtype: torch.dtype) -> int:
    """Bytes of one cached position, from the model's own cache class on the meta device."""
    from edge_prism import model as modellib

    cls = getattr(modellib, "MLACache", None) if getattr(spec, "mla", None) is not None else modellib.KVCache
    cache = cls(spec, dtype=dtype, device=torch.device("meta"), capacity=64)
    return cache.nbytes() // max(cache.capacity, 1)


def _workspace_bytes(spec: ModelSpec, parts: list[int], dtype: torch.dtype, tokens: int) -> int:
    """Activations of the largest step, a prefill of ``tokens``: hidden states, q/k/v (and
    grouped-query copies), the causal mask, one FFN kernel call (capped, see
    model.FFN_WORKSPACE_BYTES) with its routing tensors, and the last token's logits. An
    estimate: ``Engine.logits`` over T tokens holds T x vocab float32 logits more."""
    from edge_prism.model import FFN_WORKSPACE_BYTES

    b = dtype.itemsize
    T, D, H, Hk, hd = tokens, spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim
    hidden = 4 * T * D * max(b, 4 if dtype == torch.float16 else b)
    attention = 2 * T * (H + 2 * Hk) * hd * b + 2 * T * H * hd * b + T * T
    if H != Hk:
        attention += 2 * H * T * hd * b
    ffn = 0
    for f, S in zip(spec.ffn, parts):
        units, n = f.num_experts * S, f.width // S
        ffn = max(ffn, min(FFN_WORKSPACE_BYTES, units * T * (3 * n + D) * b) + units * T * b + T * f.num_experts * 4)
    return hidden + attention + ffn + 2 * spec.vocab_size * 4


def _safetensors_bytes(source, dtype: torch.dtype, *, dequantize: bool) -> int:
    """Bytes of a safetensors source's tensors held as the model holds them: float tensors
    in ``dtype``, quantized ones as stored (expanded when ``dequantize``)."""
    total = 0
    for name in source.names():
        t = source.get(name)  # a view on the mapping: nothing is read
        if name.endswith((".qcodes", ".qsz", ".qmeta")):
            if dequantize and name.endswith(".qcodes"):
                total += t.numel() * 2 * dtype.itemsize  # two 4-bit codes per byte
            elif not dequantize:
                total += t.numel() * t.element_size()
        elif t.is_floating_point():
            total += t.numel() * dtype.itemsize
        else:
            total += t.numel() * t.element_size()
    return total


def _memory_base(spec: ModelSpec, parts: list[int], cfg: RuntimeConfig, *, dtype: torch.dtype,
                 device: torch.device) -> dict:
    """The items every engine holds besides its weights, and the free memory now."""
    from edge_prism.runtime.accounting import kv_positions
    from edge_prism.runtime.device import free_memory_bytes, host_available_bytes, shares_host_memory

    ctx = _max_context(spec, cfg)
    per = _kv_bytes_per_position(spec, dtype)
    rest, peak = kv_positions(ctx)
    return dict(device=str(device), unified=shares_host_memory(device), max_context=ctx, kv_cache_bytes=ctx * per,
                kv_growth_bytes=(peak - ctx) * per, workspace_bytes=_workspace_bytes(spec, parts, dtype, ctx),
                device_free_bytes=free_memory_bytes(device), host_available_bytes=host_available_bytes())


def _plain_memory(path: Path, raw, spec: ModelSpec, cfg: RuntimeConfig, *, dtype: torch.dtype,
                  device: torch.device):
    """The memory plan of a plain checkpoint: every weight resident."""
    from edge_prism.runtime.accounting import MemoryReport

    tensors = raw.tensors
    if hasattr(tensors, "names") and type(tensors).__name__.startswith("Safetensors"):
        weights = _safetensors_bytes(tensors, dtype, dequantize=cfg.dequantize)
    else:  # GGUF: quantized weights stay quantized; the file's size is the estimate
        files = [path] if path.is_file() else list(path.glob("*.gguf"))
        weights = sum(f.stat().st_size for f in files)
    parts = [plain_parts(f.width) for f in spec.ffn]
    return MemoryReport(**_memory_base(spec, parts, cfg, dtype=dtype, device=device), dense_bytes=weights,
                        slot_pool_bytes=0, host_tier_bytes=0, staging_bytes=0, memory_budget_bytes=None)


def _prism_memory(pc, spec: ModelSpec, k: int | list[int], cfg: RuntimeConfig, *, dtype: torch.dtype,
                  device: torch.device):
    """The memory plan of a prism checkpoint at operating point ``k`` (budget resolved)."""
    from edge_prism.runtime.accounting import MemoryReport, auto_budget
    from edge_prism.runtime.device import default_workers, is_async
    from edge_prism.runtime.sizes import format_size, parse_size
    from edge_prism.runtime.store import _block_bytes, _stored_bytes, host_tier_kind, minimum_budget, plan_slots

    base = _memory_base(spec, pc.parts, cfg, dtype=dtype, device=device)
    dense = _safetensors_bytes(pc.dense_source.source, dtype, dequantize=cfg.dequantize)
    gates = pc.path / "gates.safetensors"
    dense += int(gates.stat().st_size * dtype.itemsize / 4) if gates.exists() else 0  # float32 on disk
    layers = layer_blocks(pc, spec, k, dtype=dtype)
    expanded = cfg.dequantize or _backend(cfg, device) is None
    resident = sum(lb.units * (_block_bytes(lb) if pc.unit_format(lb.layer) is None or not expanded else
                               3 * (spec.ffn[lb.layer].width // lb.parts) * spec.hidden_size * dtype.itemsize)
                   for lb in layers)
    experts = sum(lb.units * _block_bytes(lb) for lb in layers)
    common = dict(base, dense_bytes=dense)
    if cfg.memory_budget is None:
        return MemoryReport(**common, slot_pool_bytes=resident, host_tier_bytes=0, staging_bytes=0,
                            memory_budget_bytes=None)
    workers = default_workers(device)
    shapes = {}
    for lb in layers:
        shapes[(lb.block_shape, lb.dtype)] = max(_block_bytes(lb), _stored_bytes(lb))
    converting = sum(workers * n for n in shapes.values())  # per-thread conversion buffers
    text = str(cfg.memory_budget).strip().lower()
    if text == "auto":
        fixed = dense + base["kv_cache_bytes"] + base["kv_growth_bytes"] + base["workspace_bytes"]
        if base["unified"]:  # the transfers' buffers share the memory the slots live in
            fixed += converting + (sum((workers + 2) * n for n in shapes.values()) if is_async(device) else 0)
        budget = auto_budget(free=base["device_free_bytes"], fixed=fixed, experts=experts)
    else:
        budget = min(experts, parse_size(cfg.memory_budget, total=experts, what="memory budget"))
    if budget >= experts:  # every sub-expert fits: resident, nothing streams
        return MemoryReport(**common, slot_pool_bytes=resident, host_tier_bytes=0, staging_bytes=0,
                            memory_budget_bytes=budget)
    m = minimum_budget(layers)
    if budget < m:
        why = (f"'auto' leaves {format_size(budget)} for sub-experts beside "
               f"{MemoryReport(**common, slot_pool_bytes=0, host_tier_bytes=0, staging_bytes=0, memory_budget_bytes=0).items()}"
               if text == "auto" else f"'{cfg.memory_budget}' is {format_size(budget)}")
        fix = ("lower --max-context or --operating-point, or free device memory" if text == "auto" else
               "raise --memory-budget or lower --operating-point")
        raise BudgetError(f"memory budget {why}, below what one layer's largest selection needs: minimum is "
                          f"{format_size(m)} ({m} bytes); {fix}")
    slots = plan_slots(layers, budget)
    pool = sum(slots[key] * _block_bytes(next(lb for lb in layers if (lb.block_shape, lb.dtype) == key))
               for key in slots)
    ram = host_tier_kind(device, cfg.host_tier, experts) == "ram"
    staging = converting
    if is_async(device) and not ram:
        staging += sum((workers + 2) * n for n in shapes.values())
    return MemoryReport(**common, slot_pool_bytes=pool, host_tier_bytes=experts if ram else 0,
                        staging_bytes=staging, memory_budget_bytes=budget)


def prefetch_applies(cfg: RuntimeConfig, device: torch.device) -> bool:
    """Whether a budgeted engine on ``device`` prefetches: ``cfg.prefetch``, or by default on
    CUDA devices only."""
    return cfg.prefetch if cfg.prefetch is not None else torch.device(device).type == "cuda"


def _prefetcher(pc, model: Transformer):
    from edge_prism.prefetch import Predictor, Prefetcher

    corrections = {}
    names = set(pc.gates.names())
    for layer in range(model.spec.num_layers):
        for d in (1, 2):
            key = f"layers.{layer}.predict.{d}"
            if f"{key}.scale" in names:
                corrections[(layer, d)] = (pc.gate_tensor(f"{key}.scale").to(model.device),
                                           pc.gate_tensor(f"{key}.bias").to(model.device))
    return Prefetcher(Predictor(model, corrections), model.store)


def _planner(model: Transformer, cfg: RuntimeConfig, *, device: torch.device, dtype: torch.dtype):
    from edge_prism.runtime.planner import planner_for

    if cfg.token_latency_ms <= 0:
        raise ConfigError(f"invalid token latency budget {cfg.token_latency_ms} ms: use a positive number")
    return planner_for(model, budget_s=cfg.token_latency_ms / 1000, device=device, dtype=dtype)


def _compensation_tables(pc, spec: ModelSpec) -> list[torch.Tensor | None] | None:
    """Each layer's compensation table [U, D] (float32, CPU), or None for a checkpoint
    refactored before they were stored."""
    names = set(pc.gates.names())
    wanted = [f"layers.{layer}.compensation" for layer in range(spec.num_layers)]
    if not any(n in names for n in wanted):
        return None
    return [pc.gate_tensor(n) if n in names else None for n in wanted]


def _layer_gate(pc, layer: int, kind: str, dtype: torch.dtype, device: torch.device):
    from edge_prism.select import LayerGate

    def get(name: str) -> torch.Tensor:
        return pc.gate_tensor(f"layers.{layer}.{name}").to(device=device, dtype=dtype)

    if kind == "proxy":
        return LayerGate(kind, get("proxy.rows"))
    return LayerGate(kind, get("linear.weight"), get("linear.bias"))


def default_prism(*, progress: bool = True) -> Path:
    """The default model's prism checkpoint in the user cache, built on first use."""
    from edge_prism.loaders.default import default_model_path

    return cached_prism(default_model_path(), progress=progress)


def cached_prism(source: Path, *, progress: bool = True) -> Path:
    """The prism checkpoint of ``source`` (an HF directory or GGUF file) in the user cache,
    built with the default refactoring on first use, reused afterwards, and rebuilt when it
    is damaged, when ``source`` changed, or when the refactoring defaults changed.

    The default model's cache entry is ``<stem>.prism``; any other source's carries a hash of
    its resolved path, so two models of one name do not share an entry.
    """
    import hashlib

    from edge_prism.errors import PrismCheckpointError
    from edge_prism.loaders.default import default_model_path
    from edge_prism.refactor.prism import (check_out_dir, estimate_prism_bytes, is_prism, open_prism,
                                         output_lock)
    from edge_prism.refactor.refactor import RefactorConfig, config_record, refactor

    source = Path(source).resolve()
    try:
        default = source == default_model_path().resolve()
    except EdgePrismError:
        default = False
    tag = "" if default else "-" + hashlib.sha256(str(source).encode()).hexdigest()[:10]
    out = cache_root() / f"{source.stem}{tag}.prism"
    what = "the default model's" if default else f"{source.name}'s"

    def usable(*, say_why: bool) -> bool:
        if not is_prism(out):
            return False
        try:
            if open_prism(out).manifest.get("refactor_config") == config_record(RefactorConfig()):
                return True
            why = "refactoring defaults changed"
        except PrismCheckpointError as e:
            why = str(e)
        if say_why:
            log.warning("rebuilding %s prism checkpoint: %s", what, why)
        return False

    if usable(say_why=False):
        return out
    fix = "set EDGE_PRISM_CACHE to a writable directory with enough space"
    with output_lock(out, wait=True, fix=fix):  # a concurrent first use builds it once; this one waits
        if usable(say_why=True):  # built by the process we waited for
            return out
        check_out_dir(out, force=True, need_bytes=estimate_prism_bytes(source), fix=fix)
        log.warning("building %s prism checkpoint in %s (first use only; %s on this machine)", what, out,
                    _build_estimate(source))
        refactor(source, out, RefactorConfig(), force=True, progress=progress)
    return out


def _build_estimate(source: Path) -> str:
    """A rough time for the default refactoring of ``source``, from its shapes: calibration
    FLOPs at ~25 GFLOP/s (2 CPU cores) plus ~2 s of partitioning per 1536-neuron expert
    (measured on the default model: 135M parameters, 30 experts, about 70 s)."""
    from edge_prism.refactor.refactor import RefactorConfig

    try:
        raw = open_checkpoint(source)
        spec = build_spec(raw.config, where=str(source))
    except EdgePrismError:
        return "time unknown"
    D = spec.hidden_size
    active = spec.vocab_size * D + sum(
        (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim * D + spec.num_heads * spec.head_dim * D
        + 3 * D * f.width * f.top_k + 3 * D * f.shared_width for f in spec.ffn)
    seconds = 2 * active * RefactorConfig().calib_tokens / 25e9
    seconds += sum(2.0 * f.num_experts * f.width / 1536 for f in spec.ffn)
    return f"about {max(1, round(seconds / 60))} min" if seconds >= 90 else f"about {max(10, round(seconds, -1)):.0f} s"
