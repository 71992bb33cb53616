"""The decoder: attention with a KV cache, and FFNs computed as sub-experts over a block pool.

[embed] -> per layer: [norm -> attention (+KV cache)] -> [norm -> router -> sub-expert
selection -> store.slots -> FFN kernel over the pool, in place -> weighted sum] -> [norm -> lm_head]

Legend for shape comments: T=tokens, D=hidden, H=heads, Hk=kv heads, hd=head dim,
E=experts, k=top-k, S=sub-experts per expert, n=neurons per sub-expert, P=selected
sub-experts (units) in a layer, U=E*S units of a layer, L=cached positions, V=vocab;
multi-head latent attention (MLA): C=kv_lora_rank (cached latent), R=qk_rope_head_dim
(cached rotary key), dn=qk_nope_head_dim, dv=v_head_dim, G=expert groups.

Weights are held as they arrive: float, or quantized (edge_prism.quant) and expanded only
inside the kernels (edge_prism.kernels). A float sub-expert block is one contiguous
[3, n, D] tensor (rows of W_gate, rows of W_up, and the matching columns of W_down as a
row-major [D, n] matrix in the last slot); a quantized one is a byte block of two
quantized matrices (quant.UnitFormat). Either way one copy moves it, and an expert's
output is exactly the sum of its sub-experts' outputs.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Protocol

import torch
import torch.nn.functional as F

from edge_prism.errors import ConfigError
from edge_prism.kernels import Embedding, FFNKernel, FloatEmbedding, FloatLinear, Linear, block_ffn
from edge_prism.runtime.device import HostCopy, to_device_async
from edge_prism.select import SubExpertSelector, check_operating_point, full_token_units, max_operating_point
from edge_prism.spec import MLASpec, ModelSpec

__all__ = ["LayerWeights", "MLAWeights", "Weights", "Transformer", "KVCache", "MLACache", "block_ffn",
           "transposed", "tied_head"]

# DeepSeek-V2's q_a_layernorm and kv_a_layernorm keep RMSNorm's default eps, not rms_norm_eps
# (transformers builds them as DeepseekV2RMSNorm(width)).
_MLA_NORM_EPS = 1e-6


@dataclass
class MLAWeights:
    """The parts of one multi-head latent attention layer beyond LayerWeights' wqkv and wo.

    LayerWeights.wqkv joins the two projections of the hidden state: the query's (q_proj, or
    the low-rank q_a_proj) and kv_a_proj_with_mqa (latent [C] and rotary key [R]).
    """

    q_a_norm: torch.Tensor | None  # [q_lora_rank] (None: q_proj, no low-rank query)
    wq_b: Linear | None  # [q_lora_rank] -> [H*(dn+R)]
    kv_a_norm: torch.Tensor  # [C]
    kv_b: Linear  # [C] -> [H*(dn+dv)]: per head, the key's dn rows then the value's dv rows
    bo: torch.Tensor | None = None  # [D] (attention_bias)


@dataclass
class LayerWeights:
    """Always-resident weights of one decoder layer."""

    attn_norm: torch.Tensor  # [D]
    ffn_norm: torch.Tensor  # [D]
    wqkv: Linear  # [D] -> [(H+2Hk)*hd]
    bqkv: torch.Tensor | None  # [(H+2Hk)*hd]
    wo: Linear  # [H*hd] -> [D]
    q_norm: torch.Tensor | None  # [hd] (head) or [H*hd] (full)
    k_norm: torch.Tensor | None
    router: torch.Tensor | None  # [E, D] (float: routing decisions stay exact)
    router_bias: torch.Tensor | None = None  # [E] (synthetic routing skew)
    shared_gu: Linear | None = None  # [D] -> [2*Ws]
    shared_down: Linear | None = None  # [Ws] -> [D]
    shared_gate: torch.Tensor | None = None  # [1, D] (None: ungated shared expert, deepseek_v2)
    mla: MLAWeights | None = None  # multi-head latent attention (wqkv, wo as described there)


@dataclass
class Weights:
    """All always-resident weights (everything but the sub-expert blocks)."""

    embed: Embedding  # ids -> [T, D]
    norm: torch.Tensor  # [D]
    lm_head: Linear  # [D] -> [V]
    layers: list[LayerWeights]

    def nbytes(self) -> int:
        """Bytes held, counting a buffer shared by two holders (a tied lm_head) once."""
        seen: set[int] = set()
        total = 0
        for t in _tensors([self.embed, self.lm_head, self.norm, *self.layers]):
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
        return total


def _tensors(obj, depth: int = 5):
    """Every tensor held by ``obj`` (lists, dataclasses, weight holders), a few levels deep."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth and isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o, depth - 1)
    elif depth and hasattr(obj, "__dict__"):
        for o in vars(obj).values():
            yield from _tensors(o, depth - 1)


def transposed(w: torch.Tensor) -> torch.Tensor:
    """``w`` [out, in] stored as [in, out].

    Decode multiplies one row vector by each weight; with the output dimension contiguous
    that streams at ~16-21 GB/s on a 2-core AVX-512 CPU against ~11 GB/s for x @ W^T on
    rows of a few hundred values (measured with torch 2.13 / MKL).
    """
    return w.t().contiguous()


def tied_head(embed: torch.Tensor) -> tuple[FloatEmbedding, FloatLinear]:
    """Embedding and lm_head sharing one float buffer (tied embeddings), head stored [D, V]."""
    head_t = transposed(embed)
    return FloatEmbedding(head_t.t()), FloatLinear(head_t)


class ExpertStore(Protocol):
    """Where sub-expert blocks live during compute (the runtime implements this)."""

    # True: sub-experts stream into device slots on demand, so a Prefetcher may load them ahead
    # (the store then also takes prefetch() and drop_stale()); False: all resident.
    streams: bool

    def slots(self, layer: int, units: torch.Tensor) -> torch.Tensor:
        """Make ``units`` (sorted flat ids e*S+s, CPU int64 [P]) resident; their slots [P]."""
        ...

    def pool(self, layer: int):
        """What ``slots`` index, as the layer's FFN kernel reads it (a slot buffer, or the
        resident experts' matrices)."""
        ...

    def done(self, layer: int) -> None:
        """The layer's kernels are issued: its slots may be reused once they finish."""
        ...

    def capacity(self, layer: int) -> int:
        """Most units one slots() call may ask for (a prefill may select more: chunks)."""
        ...

    def release_all(self) -> None:
        """Nothing computes now: release what an interrupted step left in use."""
        ...

    def report(self) -> dict:
        """Counters for Engine.stats (a store that keeps none: {})."""
        ...

    def reset_stats(self) -> None:
        """Zero the counters (they are reported per generation)."""
        ...

    def close(self) -> None:
        """Give back threads, slot pools and host memory now (idempotent)."""
        ...


class Selector(Protocol):
    """Chooses sub-experts within the routed experts (the operating point)."""

    def __call__(self, layer: int, x: torch.Tensor, topv: torch.Tensor,
                 topi: torch.Tensor) -> torch.Tensor:
        """Weights [T, k, S] for each token's k experts' S sub-experts; 0 = not computed."""
        ...

    def decode_units(self, layer: int, x: torch.Tensor, topv: torch.Tensor,
                     topi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The same choice for one token as the store takes it: units (sorted, CPU) [P] and
        their weights [P, 1]."""
        ...


class KVCache:
    """Per-layer keys and values, grown by doubling (amortised, not per token)."""

    def __init__(self, spec: ModelSpec, *, dtype: torch.dtype, device: torch.device, capacity: int = 256):
        self.spec, self.dtype, self.device = spec, dtype, device
        self.capacity = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.length = 0
        self.reserve(capacity)

    def reserve(self, tokens: int) -> None:
        """Make room for ``tokens`` positions, keeping what is cached."""
        if tokens <= self.capacity:
            return
        cap = max(tokens, 2 * self.capacity, 64)
        s = self.spec
        shape = (s.num_kv_heads, cap, s.head_dim)
        new_k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(s.num_layers)]
        new_v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(s.num_layers)]
        for old, new in zip(self.k + self.v, new_k + new_v):
            new[:, : self.length].copy_(old[:, : self.length])
        self.k, self.v, self.capacity = new_k, new_v, cap

    def nbytes(self) -> int:
        """Bytes allocated for the cache."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class MLACache:
    """Per-layer compressed cache of multi-head latent attention: one row [C + R] per position,
    the normed latent and the rotated rotary key, shared by all heads (no per-head keys or
    values: DeepSeek-V2-Lite caches 576 values per position per layer instead of 5120).
    Grown by doubling, like KVCache."""

    def __init__(self, spec: ModelSpec, *, dtype: torch.dtype, device: torch.device, capacity: int = 256):
        self.spec, self.dtype, self.device = spec, dtype, device
        self.width = spec.mla.cache_width
        self.capacity = 0
        self.latent: list[torch.Tensor] = []  # per layer [capacity, C+R]
        self.length = 0
        self.reserve(capacity)

    def reserve(self, tokens: int) -> None:
        """Make room for ``tokens`` positions, keeping what is cached."""
        if tokens <= self.capacity:
            return
        cap = max(tokens, 2 * self.capacity, 64)
        new = [torch.zeros(cap, self.width, dtype=self.dtype, device=self.device)
               for _ in range(self.spec.num_layers)]
        for old, n in zip(self.latent, new):
            n[: self.length].copy_(old[: self.length])
        self.latent, self.capacity = new, cap

    def nbytes(self) -> int:
        """Bytes allocated for the cache."""
        return sum(t.numel() * t.element_size() for t in self.latent)


def _inv_freq(spec: ModelSpec, dim: int) -> torch.Tensor:
    """Rotary inverse frequencies [dim/2] for ``dim`` rotated values, with the spec's scaling."""
    inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = dict(spec.rope_scaling)
    if scaling.get("rope_type") == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif scaling.get("rope_type") == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling)
    elif scaling.get("rope_type") == "yarn":
        inv_freq = _yarn_inv_freq(dim, spec.rope_theta, scaling)
    return inv_freq


def rope_tables(spec: ModelSpec, positions: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [positions, hd] in float32, computed as transformers does (rotate-half layout)."""
    inv_freq = _inv_freq(spec, spec.head_dim)
    pos = torch.arange(positions, dtype=torch.float32)
    freqs = pos[:, None] * inv_freq[None, :]  # [positions, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [positions, hd]
    return emb.cos().to(device), emb.sin().to(device)


def mla_rope_tables(spec: ModelSpec, positions: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [positions, R/2] in float32 for MLA's pairwise rotation, times yarn's attention
    factor (transformers multiplies its complex frequencies by it)."""
    inv_freq = _inv_freq(spec, spec.mla.qk_rope_head_dim)
    pos = torch.arange(positions, dtype=torch.float32)
    freqs = pos[:, None] * inv_freq[None, :]  # [positions, R/2]
    scale = float(dict(spec.rope_scaling).get("attention_factor", 1.0))
    return (freqs.cos() * scale).to(device), (freqs.sin() * scale).to(device)


def _yarn_inv_freq(dim: int, theta: float, sc: dict) -> torch.Tensor:
    """YaRN: interpolated low frequencies, extrapolated high ones, a linear ramp between
    (transformers' _compute_yarn_parameters, op for op)."""
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolated, interpolated = 1.0 / pos_freqs, 1.0 / (sc["factor"] * pos_freqs)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(sc["original_max_position_embeddings"] / (rotations * 2 * math.pi))) / (
            2 * math.log(theta))

    low, high = correction_dim(sc["beta_fast"]), correction_dim(sc["beta_slow"])
    if sc["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # [dim/2]
    return interpolated * (1 - extrapolation) + extrapolated * extrapolation


def _llama3_inv_freq(inv_freq: torch.Tensor, sc: dict) -> torch.Tensor:
    factor, low, high = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
    old_ctx = sc["original_max_position_embeddings"]
    low_wl, high_wl = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wl, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
    return torch.where(medium, smoothed, scaled)


def _compensation(comp: tuple[torch.Tensor, torch.Tensor], out: torch.Tensor, topv: torch.Tensor,
                  topi: torch.Tensor, kept: list[tuple[torch.Tensor, torch.Tensor | None]],
                  routed: bool) -> torch.Tensor:
    """``out`` [T, D] plus the dropped sub-experts' mean outputs: each routed expert's whole
    table weighted by its router weight, less the rows of the units that ran, by their
    weights ``kept`` (units [P] and weights [P, T]; weight 0 is a unit that was not computed).
    Few ops, as decode runs it every layer: a dense FFN's router weight is 1, and a list of
    every unit (a kernel that reads whole experts) needs no gather."""
    neg, totals = comp  # minus the table [U, D], per-expert totals [E, D]
    if routed:
        out = out + torch.einsum("tk,tkd->td", topv.to(totals.dtype), totals[topi])  # [T, D]
    else:
        out = out + totals[0]
    for units, wt in kept:
        if units.numel() == 0:
            continue
        rows = neg if units.numel() == neg.shape[0] else neg.index_select(0, units.to(neg.device))  # [P, D]
        w = out.new_ones(units.shape[0], out.shape[0]) if wt is None else wt
        out = torch.addmm(out, w.t().to(out.dtype), rows)  # [T, D]
    return out


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)  # one fused op (decode runs 61 of them per token)
    # Same op order as transformers' RMSNorm: half-precision inputs are normed in float32.
    # The output is in the weight's (compute) dtype: a float32 residual stream under float16
    # compute gives float16 inputs to the layers, as transformers' float16 models do.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(weight.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding: x * cos + cat(-x2, x1) * sin, with the sign folded into
    ``sin_signed`` = cat(-sin, sin) so that cat(-x2, x1) * sin = roll(x, hd/2) * sin_signed."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin_signed)


def _rope_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """MLA's rotary embedding: pairs (x[2i], x[2i+1]) rotated as the complex numbers
    transformers multiplies, in float32; ``cos``, ``sin`` [..., R/2] broadcast over x [..., R]."""
    xf = x.float().unflatten(-1, (-1, 2))  # [..., R/2, 2]
    re, im = xf[..., 0], xf[..., 1]
    return torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1).flatten(-2).to(x.dtype)


FFNObserver = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


class Planner(Protocol):
    """Trims a decode token's selection to meet a token-latency budget (runtime.planner)."""

    def start_token(self) -> None:
        """A decode token begins."""
        ...

    def end_token(self) -> None:
        """The decode token's logits are computed."""
        ...

    # Whether :meth:`plan` trims each layer's selection (True: the selection is listed for it,
    # a host sync); False: the planner only chooses each layer's operating point.
    trims: bool

    def operating_point(self, layer: int) -> int | None:
        """The operating point K this decode layer selects at (None: the model's own)."""
        ...

    def plan(self, layer: int, x: torch.Tensor, units: torch.Tensor, wt: torch.Tensor,
             topi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Units and weights to compute on the device, then on the host CPU (subsets of
        ``units``, together never below the floor); called only where ``trims``."""
        ...

    def set_budget(self, budget_s: float) -> None:
        """Plan for a budget of ``budget_s`` seconds per token from now on (the costs learnt stay)."""
        ...

    def report(self, latencies_s: list[float]) -> dict:
        """Counters for Engine.stats, given the generation's decode token latencies."""
        ...

    def reset_stats(self) -> None:
        """Zero the counters."""
        ...


class Prefetcher(Protocol):
    """Loads the sub-experts later layers will select, ahead of use (edge_prism.prefetch)."""

    def before_kernel(self, layer: int, resid: torch.Tensor, units: torch.Tensor) -> object:
        """Layer ``layer`` selected ``units`` (now resident; its FFN kernel comes next);
        ``resid`` [1, D] after its attention. Returns what :meth:`after_kernel` takes."""
        ...

    def after_kernel(self, pending: object) -> None:
        """The layer's FFN kernel is launched."""
        ...

    def release_all(self) -> None:
        """Forget predictions not yet scored (a step was interrupted, or a generation starts)."""
        ...

    def report(self) -> dict:
        """Counters for Engine.stats."""
        ...

    def reset_stats(self) -> None:
        """Zero the counters."""
        ...


class Transformer:
    """A decoder-only model over always-resident weights and an ExpertStore for sub-experts.

    ``gates``: sub-expert gates per layer (select.LayerGate), needed below full K.
    ``operating_point``: K, active sub-experts per token per MoE layer (None: a plain checkpoint,
    every part of every routed expert, as at full K). ``ffn_observer``: called with (layer,
    resid, x, topv, topi) at every FFN (calibration; see also :meth:`observing`). The decode
    helpers that need the built model come after it: :meth:`set_prefetcher`, :meth:`set_planner`.
    """

    def __init__(self, spec: ModelSpec, weights: Weights, store: ExpertStore, *,
                 parts: list[int], kernels: list[FFNKernel], dtype: torch.dtype, device: torch.device,
                 gates: list | None = None, operating_point: int | None = None,
                 ffn_observer: FFNObserver | None = None):
        self.spec, self.w, self.store = spec, weights, store
        self.parts = parts  # S per layer
        self.kernels = kernels  # the FFN kernel that reads each layer's pool
        self.dtype, self.device = dtype, device
        # float16 overflows past 65504: the residual stream sums every layer's output, so it
        # stays float32 under float16 compute (pre-Ampere GPUs, Jetson Xavier).
        self.residual_dtype = torch.float32 if dtype == torch.float16 else dtype
        self.selector: Selector | None = None  # None: every part of every routed expert
        self.operating_point: int | None = None  # K, for reports (None: plain checkpoint)
        self.allocation = None  # allocation.LayerAllocation: K per layer for the model's K (None: K everywhere)
        self.layer_points: list[int] | None = None  # each layer's K outside a planner (None: plain checkpoint)
        self.route_top_k: int | None = None  # baseline curves: route to fewer experts than top_k
        self.gates = gates
        # Per layer (minus the table [U, D], per-expert totals [E, D]): the mean output of each dropped
        # sub-expert, added back below full K (refactor.gates.compensation); None: not added.
        self.compensation: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None
        self.ffn_observer = ffn_observer
        self.prefetcher: Prefetcher | None = None  # decode only
        self.planner: Planner | None = None  # decode only: token-latency budget
        self.cache = (MLACache if spec.mla is not None else KVCache)(spec, dtype=dtype, device=device)
        # MLA: None picks per call whichever of absorbed / expanded attention costs fewer
        # multiply-adds (absorbed at decode); True / False force one (tests compare both).
        self.mla_absorb: bool | None = None
        self._rope_len = 0
        self._ensure_rope(256)
        self._all_units = [torch.arange(f.num_experts * s) for f, s in zip(spec.ffn, parts)]
        self._part_ids = {s: torch.arange(s, device=device) for s in set(parts)}  # 0..S-1 per S
        self._dense_route: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._selectors: dict[int, SubExpertSelector | None] = {}  # per K (None: full K)
        if operating_point is not None:
            self.set_operating_point(operating_point)

    # -- capabilities ----------------------------------------------------------------
    def set_operating_point(self, k: int) -> None:
        """Compute ``k`` active sub-experts per token per MoE layer from now on: the selector is
        rebuilt (none at full K: the exact path). The KV cache is the caller's to reset."""
        k = check_operating_point(k, self.spec, self.parts)
        full = max_operating_point(self.spec, self.parts)
        if k != full and self.gates is None:
            raise ConfigError(f"operating point {k} is below full K ({full}) and this model has no "
                              "sub-expert gates to choose with: load a prism checkpoint, or build "
                              "the model with gates=")
        self.selector = self.selector_at(k)
        self.operating_point = k
        self.layer_points = [k] * self.spec.num_layers if self.allocation is None else self.allocation.points(k)

    def set_compensation(self, tables: list[torch.Tensor | None] | None) -> None:
        """Add back each dropped sub-expert's mean output (``tables[layer]`` [U, D] by unit id,
        as refactor.gates.compensation fits it; None: nothing) wherever fewer than all of a
        token's routed parts run: below full K, or when a latency planner drops some."""
        if tables is None:
            self.compensation = None
            return
        if len(tables) != self.spec.num_layers:
            raise ConfigError(f"{len(tables)} compensation tables for {self.spec.num_layers} layers")
        out = []
        for layer, t in enumerate(tables):
            if t is None:
                out.append(None)
                continue
            E, S, D = self.spec.ffn[layer].num_experts, self.parts[layer], self.spec.hidden_size
            if tuple(t.shape) != (E * S, D):
                raise ConfigError(f"layer {layer}: compensation table of shape {tuple(t.shape)}, expected "
                                  f"[{E * S}, {D}]; rebuild the prism checkpoint")
            t = t.to(device=self.device, dtype=self.dtype)
            out.append((-t, t.view(E, S, D).sum(dim=1)))  # minus the table [U, D], totals [E, D]
        self.compensation = out

    def set_allocation(self, allocation) -> None:
        """Spread the operating point's sub-experts across layers by ``allocation``
        (allocation.LayerAllocation; None: every layer at K) from now on."""
        self.allocation = allocation
        if self.operating_point is not None:
            self.set_operating_point(self.operating_point)

    def set_layer_points(self, points: list[int]) -> None:
        """Run layer i at operating point ``points[i]`` (a measurement; set_operating_point
        goes back to the allocation's)."""
        if len(points) != self.spec.num_layers:
            raise ConfigError(f"{len(points)} layer operating points for {self.spec.num_layers} layers")
        for k in points:
            check_operating_point(k, self.spec, self.parts)
        self.layer_points = list(points)

    def selector_for(self, layer: int) -> SubExpertSelector | None:
        """The selector ``layer`` runs outside a planner: its operating point's."""
        if self.layer_points is None:
            return self.selector
        return self.selector_at(self.layer_points[layer])

    def selector_at(self, k: int) -> SubExpertSelector | None:
        """The selector of operating point ``k`` (None at full K), made once per K: a planner
        moves between operating points from layer to layer."""
        if k not in self._selectors:
            full = max_operating_point(self.spec, self.parts)
            self._selectors[k] = None if k == full else SubExpertSelector(self.spec, self.parts, self.gates, k)
        return self._selectors[k]

    def set_prefetcher(self, prefetcher: Prefetcher | None) -> None:
        """Load later layers' sub-experts ahead of use during decode (None: stop)."""
        if prefetcher is not None and not self.store.streams:
            raise ConfigError("a prefetcher needs a store that streams sub-experts; this model's "
                              f"{type(self.store).__name__} holds every one resident: load it with a "
                              "memory budget below its experts, or leave prefetch off")
        self.prefetcher = prefetcher

    def set_planner(self, planner: Planner | None) -> None:
        """Trim each decode token's selection to the planner's token-latency budget (None: exact)."""
        self.planner = planner

    @contextlib.contextmanager
    def observing(self, observer: FFNObserver) -> Iterator[None]:
        """Call ``observer`` (layer, resid, x, topv, topi) at every FFN of the forwards run inside
        the block; the previous observer (usually none) is back afterwards, error or not."""
        previous, self.ffn_observer = self.ffn_observer, observer
        try:
            yield
        finally:
            self.ffn_observer = previous

    @contextlib.contextmanager
    def routing_top_k(self, top_k: int) -> Iterator[None]:
        """Route each token to its ``top_k`` best experts (fewer than the model's top_k: the
        baseline curve of quality against experts computed) in the forwards run inside the block."""
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ConfigError(f"invalid top_k {top_k!r}: route to 1 or more experts")
        previous, self.route_top_k = self.route_top_k, top_k
        try:
            yield
        finally:
            self.route_top_k = previous

    # -- positions -------------------------------------------------------------------
    def _ensure_rope(self, positions: int) -> None:
        if positions > self._rope_len:
            n = min(max(positions, 2 * self._rope_len), max(positions, self.spec.max_position))
            if self.spec.mla is not None:
                # float32 tables, kept so: transformers rotates MLA's rotary parts in float32.
                self.cos, self.sin = mla_rope_tables(self.spec, n, self.device)  # [positions, R/2]
                self.sin_signed = self.sin  # the pairwise rotation takes sin as it is
            else:
                self.cos, self.sin = rope_tables(self.spec, n, self.device)
                self.cos, self.sin = self.cos.to(self.dtype), self.sin.to(self.dtype)
                half = self.sin.shape[-1] // 2
                self.sin_signed = torch.cat((-self.sin[:, :half], self.sin[:, half:]), dim=-1)  # [positions, hd]
            self._rope_len = n

    def reset(self, keep: int = 0) -> None:
        """Forget cached positions from ``keep`` on. Nothing computes now, so the store releases
        what an interrupted step left in use and the prefetcher forgets its predictions."""
        self.cache.length = min(keep, self.cache.length)
        self.store.release_all()
        if self.prefetcher is not None:
            self.prefetcher.release_all()

    # -- forward ---------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, *, all_logits: bool = False) -> torch.Tensor:
        """Run ``ids`` [T] after the cached positions; logits [T, V] or [1, V] (last token)."""
        T = ids.shape[0]
        if T == 1 and self.planner is not None:
            self.planner.start_token()  # the whole decode step counts against its budget
        start = self.cache.length
        self.cache.reserve(start + T)
        self._ensure_rope(start + T)
        h = self.w.embed(ids.to(self.device)).to(self.residual_dtype)  # [T, D]
        h = self._layers(h, start, 0)
        self.cache.length = start + T
        if not all_logits:
            h = h[-1:]
        logits = self._head(h)  # [T or 1, V]
        if T == 1 and self.planner is not None:
            self.planner.end_token()
        return logits

    def _layers(self, h: torch.Tensor, start: int, first: int, inputs: list | None = None) -> torch.Tensor:
        """The residual stream h [T, D] at positions start.. through layers first..; each
        layer's input is appended to ``inputs`` where given."""
        T = h.shape[0]
        cos = self.cos[start:start + T, None, :]  # [T, 1, hd]
        sin = self.sin_signed[start:start + T, None, :]  # [T, 1, hd], sign folded in (see _rope)
        attention = self._attention if self.spec.mla is None else self._mla_attention
        for layer in range(first, self.spec.num_layers):
            lw = self.w.layers[layer]
            if inputs is not None:
                inputs.append(h)
            h = h + attention(layer, lw, _rms(h, lw.attn_norm, self.spec.rms_norm_eps), cos, sin, start)
            h = h + self._ffn(layer, lw, _rms(h, lw.ffn_norm, self.spec.rms_norm_eps), h)
        return h

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        return self.w.lm_head(_rms(h, self.w.norm, self.spec.rms_norm_eps)).float()

    def prefill_inputs(self, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """All logits [T, V] of ``ids`` [T] from an empty cache, and each layer's input [T, D]
        (for :meth:`logits_from`: a measurement that changes one layer runs from it on)."""
        self.reset(0)
        T = ids.shape[0]
        self.cache.reserve(T)
        self._ensure_rope(T)
        inputs: list[torch.Tensor] = []
        h = self._layers(self.w.embed(ids.to(self.device)).to(self.residual_dtype), 0, 0, inputs)
        self.cache.length = T
        return self._head(h), inputs

    def logits_from(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """All logits [T, V] of the prefill :meth:`prefill_inputs` ran, from ``layer`` on with
        input h [T, D] (the cache keeps the earlier layers' keys)."""
        return self._head(self._layers(h, 0, layer))

    def _attention(self, layer: int, lw: LayerWeights, x: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, start: int) -> torch.Tensor:
        s = self.spec
        T, H, Hk, hd = x.shape[0], s.num_heads, s.num_kv_heads, s.head_dim
        qkv = lw.wqkv(x)  # [T, (H+2Hk)*hd]
        if lw.bqkv is not None:
            qkv = qkv + lw.bqkv
        q, k, v = qkv.split((H * hd, Hk * hd, Hk * hd), dim=-1)
        if s.qk_norm == "full":
            q, k = _rms(q, lw.q_norm, s.rms_norm_eps), _rms(k, lw.k_norm, s.rms_norm_eps)
        if s.clip_qkv is not None:
            q, k, v = (t.clamp(-s.clip_qkv, s.clip_qkv) for t in (q, k, v))
        if s.qk_norm == "none" and s.clip_qkv is None:
            qk = _rope(qkv[:, : (H + Hk) * hd].view(T, H + Hk, hd), cos, sin)  # [T, H+Hk, hd] in one go
            q, k = qk[:, :H], qk[:, H:]
            v = v.view(T, Hk, hd)
        else:
            q, k, v = q.view(T, H, hd), k.view(T, Hk, hd), v.view(T, Hk, hd)
            if s.qk_norm == "head":
                q, k = _rms(q, lw.q_norm, s.rms_norm_eps), _rms(k, lw.k_norm, s.rms_norm_eps)
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)  # [T, H, hd], [T, Hk, hd]
        end = start + T
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        kc[:, start:end].copy_(k.transpose(0, 1))  # [Hk, L, hd]
        vc[:, start:end].copy_(v.transpose(0, 1))
        out = _attend(q, kc[:, :end], vc[:, :end], start)  # [T, H*hd]
        return lw.wo(out)  # [T, D]

    def _mla_attention(self, layer: int, lw: LayerWeights, x: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor, start: int) -> torch.Tensor:
        """Multi-head latent attention (DeepSeek-V2) over the compressed cache; cos, sin [T, 1, R/2]."""
        m, mw = self.spec.mla, lw.mla
        T, H, C, R, dn = x.shape[0], self.spec.num_heads, m.kv_lora_rank, m.qk_rope_head_dim, m.qk_nope_head_dim
        qkv = lw.wqkv(x)  # [T, Q+C+R], Q = H*(dn+R) or q_lora_rank
        if lw.bqkv is not None:
            qkv = qkv + lw.bqkv
        q, kv = qkv.split((qkv.shape[1] - C - R, C + R), dim=-1)  # [T, Q], [T, C+R]
        if mw.wq_b is not None:
            q = mw.wq_b(_rms(q, mw.q_a_norm, _MLA_NORM_EPS))  # [T, H*(dn+R)]
        q = q.view(T, H, dn + R)
        end = start + T
        lat = self.cache.latent[layer]  # [capacity, C+R]
        lat[start:end, :C] = _rms(kv[:, :C], mw.kv_a_norm, _MLA_NORM_EPS)  # normed latent
        lat[start:end, C:] = _rope_pairs(kv[:, C:], cos[:, 0], sin[:, 0])  # [T, R] rotary key, shared by heads
        q_pe = _rope_pairs(q[..., dn:], cos, sin)  # [T, H, R]
        absorb = self.mla_absorb
        if absorb is None:
            absorb = _absorb_cheaper(m, T, end)
        if absorb and isinstance(mw.kv_b, FloatLinear):
            out = _mla_absorbed(q[..., :dn], q_pe, lat[:end], mw.kv_b.weight, m, start)  # [T, H*dv]
        else:  # a quantized kv_b_proj is only applied as a whole (x @ W^T): expand
            out = _mla_expanded(q[..., :dn], q_pe, lat[:end], mw.kv_b, m, start)  # [T, H*dv]
        out = lw.wo(out)  # [T, D]
        return out if mw.bo is None else out + mw.bo

    def route(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router weights and experts of each token: topv, topi [T, k]."""
        f, lw = self.spec.ffn[layer], self.w.layers[layer]
        if not f.routed:
            # The one expert, weight 1: made once per token count, not per layer.
            key = (x.shape[0], x.dtype)
            if key not in self._dense_route:
                self._dense_route[key] = (torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device),
                                          torch.zeros(x.shape[0], 1, dtype=torch.long, device=x.device))
            return self._dense_route[key]
        logits = F.linear(x, lw.router, lw.router_bias)  # [T, E]
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # [T, E]
        if f.topk_group < f.n_group:
            probs = _group_limited(probs, f.n_group, f.topk_group)  # [T, E], 0 outside the kept groups
        topv, topi = torch.topk(probs, min(f.top_k, self.route_top_k or f.top_k), dim=-1)  # [T, k]
        if f.norm_topk_prob:
            topv = topv / topv.sum(dim=-1, keepdim=True)
        if f.routed_scaling_factor != 1.0:
            topv = topv * f.routed_scaling_factor
        return topv.to(x.dtype), topi

    def _ffn(self, layer: int, lw: LayerWeights, x: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        f = self.spec.ffn[layer]
        topv, topi = self.route(layer, x)  # [T, k]
        if self.ffn_observer is not None:
            self.ffn_observer(layer, resid, x, topv, topi)
        out = self._experts(layer, x, topv, topi, resid)  # [T, D]
        if f.shared_width:
            gu = lw.shared_gu(x)  # [T, 2*Ws]
            g, u = gu.chunk(2, dim=-1)
            shared = lw.shared_down(F.silu(g) * u)  # [T, D]
            if lw.shared_gate is not None:  # qwen2_moe gates its shared expert; deepseek_v2 does not
                shared = torch.sigmoid(F.linear(x, lw.shared_gate)) * shared
            out = out + shared
        return out

    def part_scores(self, layer: int, x: torch.Tensor, topi: torch.Tensor) -> torch.Tensor | None:
        """Sub-expert gate scores [T, k, S] of the routed experts (None without gates)."""
        if self.gates is None or self.gates[layer] is None:
            return None
        return self.gates[layer].scores(x, topi)

    def unit_weights(self, layer: int, x: torch.Tensor, topv: torch.Tensor, topi: torch.Tensor, *,
                     k: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Selected units (sorted, CPU) [P] and their per-token weights [P, T] (None: all 1), at
        operating point ``k`` (None: the model's)."""
        f, S = self.spec.ffn[layer], self.parts[layer]
        T = x.shape[0]
        selector = self.selector_for(layer) if k is None else self.selector_at(k)
        if selector is None and not f.routed:
            # Dense FFN at full operating point: every unit, weight 1, no sync needed.
            return self._all_units[layer], None
        if T == 1:
            # Decode: the token's units straight from its k (distinct) experts, no [U, T] scatter.
            if selector is not None:
                if self.kernels[layer].reads_whole_experts and not (self.planner is not None and self.planner.trims):
                    # Unselected parts weigh 0 in a kernel that computes them anyway: no host
                    # sync to list the selected ones (a planner that drops units needs the list).
                    dense = None if f.routed else self._all_units[layer]
                    return selector.decode_weights(layer, x, topv, topi, dense)  # [P], [P, 1]
                return selector.decode_units(layer, x, topv, topi)  # [P], [P, 1]
            return full_token_units(S, topv, topi, self._part_ids[S], x.dtype)
        if selector is None:
            w = topv[:, :, None].expand(T, topi.shape[1], S)  # [T, k, S]
        else:
            w = selector(layer, x, topv, topi)  # [T, k, S]
        units = topi[:, :, None] * S + torch.arange(S, device=x.device)  # [T, k, S]
        tok = torch.arange(T, device=x.device)[:, None, None].expand_as(units)  # [T, k, S]
        dense = x.new_zeros(f.num_experts * S, T)  # [U, T]
        dense[units.reshape(-1), tok.reshape(-1)] = w.reshape(-1).to(x.dtype)
        chosen = (dense != 0).any(dim=1).nonzero().squeeze(1)  # [P]
        return chosen.cpu(), dense[chosen]  # [P], [P, T]

    def _experts(self, layer: int, x: torch.Tensor, topv: torch.Tensor, topi: torch.Tensor,
                 resid: torch.Tensor) -> torch.Tensor:
        T = x.shape[0]
        decode = T == 1
        planner = self.planner if decode else None
        k = None if planner is None else planner.operating_point(layer)
        units, wt = self.unit_weights(layer, x, topv, topi, k=k)  # [P], [P, T] or None
        comp = None if self.compensation is None else self.compensation[layer]
        selector = self.selector_for(layer) if k is None else self.selector_at(k)
        if comp is not None and (selector is None or selector.quota(layer) is None):
            comp = None  # every routed part selected: nothing to add back (full K stays exact)
        host = None
        if planner is not None and planner.trims:
            if wt is None:
                wt = x.new_ones(units.shape[0], 1)
            selected = units.shape[0]
            units, wt, host_units, host_wt = self.planner.plan(layer, x, units, wt, topi)  # [P'], [P', 1]
            if comp is None and self.compensation is not None and units.shape[0] + host_units.shape[0] < selected:
                comp = self.compensation[layer]  # the planner dropped some at full K
            if host_units.numel():
                # x's copy to the host is queued now, ahead of the device kernels, so the host
                # compute waits for nothing else (see _host_units).
                host = host_units, HostCopy(x), HostCopy(host_wt)
        step = self.unit_step(layer, T)

        def part(i: int) -> torch.Tensor | None:
            return None if wt is None else wt[i:i + step]

        out = None
        # A prefill under a small memory budget (or a long one) runs its units in rounds.
        for i in range(0, units.shape[0], step):
            y = self._units(layer, x, units[i:i + step], part(i), resid if decode and i == 0 else None)  # [T, D]
            out = y if out is None else out + y
        if out is None:  # the planner sent every selected sub-expert to the host
            out = torch.zeros_like(x)
        if host is not None:
            out = out + self._host_units(layer, *host, like=x)
        if comp is not None:
            kept = [(units, wt)] if host is None else [(units, wt), (host[0], host_wt)]
            out = _compensation(comp, out, topv, topi, kept, self.spec.ffn[layer].routed)
        return out

    def unit_step(self, layer: int, tokens: int) -> int:
        """Units per kernel call: what the store can hold at once, and at most
        FFN_WORKSPACE_BYTES of intermediate activations ([P, T, 2n] and [P, T, D])."""
        n = self.spec.ffn[layer].width // self.parts[layer]
        per_unit = tokens * (3 * n + self.spec.hidden_size) * self.dtype.itemsize
        return max(1, min(self.store.capacity(layer), FFN_WORKSPACE_BYTES // max(per_unit, 1)))

    def _host_units(self, layer: int, units: torch.Tensor, hx: HostCopy, hw: HostCopy, *,
                    like: torch.Tensor) -> torch.Tensor:
        """Sub-experts computed on the host CPU from host memory instead of waiting for their
        copy: [T, D] on the device.

        Overlapped: the host reads their blocks and computes them while the device computes
        the layer's other sub-experts (x reached the host by a copy queued before those
        kernels). Not overlapped: the next layer's launch waits for the host result, and the
        result's copy back is queued on the compute stream. A cost model should take this
        layer as max(device FFN, host reads + host FFN + one device-to-host copy) plus one
        host-to-device copy, not max(device, host) alone.
        """
        blocks = self.store.host_blocks(layer, units.tolist())  # [Ph, 3, n, D] (CPU)
        y = block_ffn(hx.wait().float(), blocks.float(), hw.wait().float())  # [T, D] (CPU)
        return to_device_async(y, like.device, like.dtype)

    def _units(self, layer: int, x: torch.Tensor, units: torch.Tensor, wt: torch.Tensor | None,
               resid: torch.Tensor | None = None) -> torch.Tensor:
        slots = self.store.slots(layer, units)  # [P]
        try:
            ahead = None
            if resid is not None and self.prefetcher is not None:
                # The next layers' predicted loads overlap this layer's compute: predicted
                # before the kernel, issued after its launch on a GPU (prefetch.Prefetcher).
                ahead = self.prefetcher.before_kernel(layer, resid, units)
            y = self.kernels[layer](x, self.store.pool(layer), slots, wt)  # [T, D], read in place
            if ahead is not None:
                self.prefetcher.after_kernel(ahead)
            return y
        finally:
            self.store.done(layer)


FFN_WORKSPACE_BYTES = 64 * 2**20  # intermediate activations of one FFN kernel call, at most


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """Causal attention of new queries q [T, H, hd] over cached k, v [Hk, L, hd] -> [T, H*hd]."""
    T, H, hd = q.shape
    Hk, L = k.shape[0], k.shape[1]
    if T == 1:
        # Decode: grouped matmuls; CPU SDPA with enable_gqa is ~40x slower at this size.
        qg = q.view(Hk, H // Hk, hd)  # [Hk, G, hd]
        scores = torch.matmul(qg, k.transpose(1, 2)) * (1.0 / math.sqrt(hd))  # [Hk, G, L]
        # (In float32 the conversions would be no-op dispatches, 60 per token: skipped.)
        probs = torch.softmax(scores, dim=-1) if q.dtype == torch.float32 else \
            torch.softmax(scores.float(), dim=-1).to(q.dtype)  # [Hk, G, L]
        return torch.matmul(probs, v).reshape(1, H * hd)  # [1, H*hd]
    if H != Hk:
        k, v = k.repeat_interleave(H // Hk, dim=0), v.repeat_interleave(H // Hk, dim=0)  # [H, L, hd]
    mask = None
    if start > 0:
        # Queries see every cached position and the causal part of the new block.
        pos_q = torch.arange(start, start + T, device=q.device)[:, None]
        mask = pos_q >= torch.arange(L, device=q.device)[None, :]  # [T, L]
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k[None], v[None],  # [1, H, T|L, hd]
                                         attn_mask=mask, is_causal=start == 0)
    return out[0].transpose(0, 1).reshape(T, H * hd)  # [T, H*hd]


def _group_limited(probs: torch.Tensor, groups: int, keep: int) -> torch.Tensor:
    """Router probabilities [T, E] with every expert outside each token's ``keep`` best groups
    (ranked by their best expert) set to 0, as DeepSeek-V2's group_limited_greedy."""
    T, E = probs.shape
    best = probs.view(T, groups, E // groups).amax(dim=-1)  # [T, G]
    top = torch.topk(best, keep, dim=-1).indices  # [T, keep]
    kept = torch.zeros_like(best, dtype=torch.bool).scatter_(1, top, True)  # [T, G]
    return probs.masked_fill(~kept.repeat_interleave(E // groups, dim=1), 0.0)  # [T, E]


def _absorb_cheaper(m: MLASpec, T: int, L: int) -> bool:
    """Whether absorbing kv_b_proj into the queries and the output costs fewer multiply-adds
    (per head) than expanding keys and values at every cached position: at decode, unless
    the cache is one position long; a fresh prefill expands (2C > dn + dv in every release)."""
    C, R, dn, dv = m.kv_lora_rank, m.qk_rope_head_dim, m.qk_nope_head_dim, m.v_head_dim
    expanded = L * (C * (dn + dv) + T * (dn + R + dv))
    absorbed = T * (C * (dn + dv) + L * (2 * C + R))
    return absorbed < expanded


def _mla_expanded(q_nope: torch.Tensor, q_pe: torch.Tensor, lat: torch.Tensor, kv_b: Linear,
                  m: MLASpec, start: int) -> torch.Tensor:
    """MLA as transformers computes it: per-head keys [dn | R] and values [dv] expanded from
    every cached latent, then attention. q_nope [T, H, dn], q_pe [T, H, R], lat [L, C+R] -> [T, H*dv]."""
    T, H, dn = q_nope.shape
    L, C, dv = lat.shape[0], m.kv_lora_rank, m.v_head_dim
    kv = kv_b(lat[:, :C].contiguous()).view(L, H, dn + dv)  # [L, H, dn+dv]
    k = kv.new_empty(H, L, dn + m.qk_rope_head_dim)  # [H, L, dn+R]
    k[..., :dn] = kv[..., :dn].transpose(0, 1)
    k[..., dn:] = lat[:, C:]  # the one rotary key, every head
    v = kv[..., dn:].transpose(0, 1)  # [H, L, dv]
    q = torch.cat((q_nope, q_pe), dim=-1).transpose(0, 1)  # [H, T, dn+R]
    mask = None
    if start > 0:
        pos_q = torch.arange(start, start + T, device=q.device)[:, None]
        mask = pos_q >= torch.arange(L, device=q.device)[None, :]  # [T, L]
    out = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask,  # [1, H, T, dv]
                                         is_causal=start == 0 and T > 1, scale=m.softmax_scale)
    return out[0].transpose(0, 1).reshape(T, H * dv)  # [T, H*dv]


def _mla_absorbed(q_nope: torch.Tensor, q_pe: torch.Tensor, lat: torch.Tensor, w: torch.Tensor,
                  m: MLASpec, start: int) -> torch.Tensor:
    """MLA with kv_b_proj absorbed: queries move into the latent space (q_nope W_uk) and the
    output leaves it (W_uv), so attention reads the cached rows as they are, no expansion.
    w: kv_b_proj's weight [H*(dn+dv), C]; shapes as in _mla_expanded."""
    T, H, dn = q_nope.shape
    L, C, dv = lat.shape[0], m.kv_lora_rank, m.v_head_dim
    w = w.view(H, dn + dv, C)  # [H, dn+dv, C]
    q_lat = torch.matmul(q_nope.transpose(0, 1), w[:, :dn])  # [H, T, C]
    q = torch.cat((q_lat, q_pe.transpose(0, 1)), dim=-1)  # [H, T, C+R]
    scores = torch.matmul(q, lat.t()) * m.softmax_scale  # [H, T, L]
    if T > 1:
        pos_q = torch.arange(start, start + T, device=q.device)[:, None]
        future = torch.arange(L, device=q.device)[None, :] > pos_q  # [T, L]
        scores = scores.masked_fill(future, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)  # [H, T, L]
    o_lat = torch.matmul(probs, lat[:, :C])  # [H, T, C]
    out = torch.matmul(o_lat, w[:, dn:].transpose(1, 2))  # [H, T, dv]
    return out.transpose(0, 1).reshape(T, H * dv)  # [T, H*dv]
