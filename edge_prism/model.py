"""The decoder: attention with a KV cache, and FFNs computed as sub-experts over a block pool.

[embed] -> per layer: [norm -> attention (+KV cache)] -> [norm -> router -> sub-expert
selection -> store.slots -> FFN kernel over the pool, in place -> weighted sum] -> [norm -> lm_head]

Legend for shape comments: T=tokens, D=hidden, H=heads, Hk=kv heads, hd=head dim,
E=experts, k=top-k, S=sub-experts per expert, n=neurons per sub-expert, P=selected
sub-experts (units) in a layer, U=E*S units of a layer, L=cached positions, V=vocab.

Weights are held as they arrive: float, or quantized (edge_prism.quant) and expanded only
inside the kernels (edge_prism.kernels). A float sub-expert block is one contiguous
[3, n, D] tensor (rows of W_gate, rows of W_up, and the matching columns of W_down as a
row-major [D, n] matrix in the last slot); a quantized one is a byte block of two
quantized matrices (quant.UnitFormat). Either way one copy moves it, and an expert's
output is exactly the sum of its sub-experts' outputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from edge_prism.kernels import Embedding, FFNKernel, FloatEmbedding, FloatLinear, Linear, block_ffn
from edge_prism.spec import ModelSpec

__all__ = ["LayerWeights", "Weights", "Transformer", "KVCache", "block_ffn", "transposed", "tied_head"]


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
    shared_gate: torch.Tensor | None = None  # [1, D]


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


class Selector(Protocol):
    """Chooses sub-experts within the routed experts (the operating point)."""

    def __call__(self, layer: int, x: torch.Tensor, topv: torch.Tensor,
                 topi: torch.Tensor) -> torch.Tensor:
        """Weights [T, k, S] for each token's k experts' S sub-experts; 0 = not computed."""
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


def rope_tables(spec: ModelSpec, positions: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [positions, hd] in float32, computed as transformers does (rotate-half layout)."""
    hd = spec.head_dim
    inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    scaling = dict(spec.rope_scaling)
    if scaling.get("rope_type") == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif scaling.get("rope_type") == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling)
    pos = torch.arange(positions, dtype=torch.float32)
    freqs = pos[:, None] * inv_freq[None, :]  # [positions, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [positions, hd]
    return emb.cos().to(device), emb.sin().to(device)


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


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)  # one fused op (decode runs 61 of them per token)
    # Same op order as transformers' RMSNorm: half-precision inputs are normed in float32.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotate-half rotary embedding: x * cos + cat(-x2, x1) * sin, with the sign folded into
    ``sin_signed`` = cat(-sin, sin) so that cat(-x2, x1) * sin = roll(x, hd/2) * sin_signed."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin_signed)


FFNObserver = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


class Planner(Protocol):
    """Trims a decode token's selection to meet a token-latency budget (runtime.planner)."""

    def start_token(self) -> None:
        """A decode token begins."""
        ...

    def plan(self, layer: int, x: torch.Tensor, units: torch.Tensor, wt: torch.Tensor,
             topi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Units and weights to compute on the device, then on the host CPU (subsets of
        ``units``, together never below the floor)."""
        ...


class Prefetcher(Protocol):
    """Loads the sub-experts later layers will select, ahead of use (edge_prism.prefetch)."""

    def on_selected(self, layer: int, resid: torch.Tensor, units: torch.Tensor) -> None:
        """Layer ``layer`` selected ``units`` (now resident); ``resid`` [1, D] after its attention."""
        ...


class Transformer:
    """A decoder-only model over always-resident weights and an ExpertStore for sub-experts."""

    def __init__(self, spec: ModelSpec, weights: Weights, store: ExpertStore, *,
                 parts: list[int], kernels: list[FFNKernel], dtype: torch.dtype, device: torch.device):
        self.spec, self.w, self.store = spec, weights, store
        self.parts = parts  # S per layer
        self.kernels = kernels  # the FFN kernel that reads each layer's pool
        self.dtype, self.device = dtype, device
        self.selector: Selector | None = None  # None: every part of every routed expert
        self.operating_point: int | None = None  # K, for reports (None: plain checkpoint)
        self.route_top_k: int | None = None  # baseline curves: route to fewer experts than top_k
        self.gates: list | None = None  # sub-expert gates per layer (select.LayerGate), when loaded
        self.ffn_observer: FFNObserver | None = None  # calibration: (layer, resid, x, topv, topi)
        self.prefetcher: Prefetcher | None = None  # decode only
        self.planner: Planner | None = None  # decode only: token-latency budget
        self.cache = KVCache(spec, dtype=dtype, device=device)
        self._rope_len = 0
        self._ensure_rope(256)
        self._all_units = [torch.arange(f.num_experts * s) for f, s in zip(spec.ffn, parts)]
        self._dense_route: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- positions -------------------------------------------------------------------
    def _ensure_rope(self, positions: int) -> None:
        if positions > self._rope_len:
            n = min(max(positions, 2 * self._rope_len), max(positions, self.spec.max_position))
            self.cos, self.sin = rope_tables(self.spec, n, self.device)
            self.cos, self.sin = self.cos.to(self.dtype), self.sin.to(self.dtype)
            half = self.sin.shape[-1] // 2
            self.sin_signed = torch.cat((-self.sin[:, :half], self.sin[:, half:]), dim=-1)  # [positions, hd]
            self._rope_len = n

    def reset(self, keep: int = 0) -> None:
        """Forget cached positions from ``keep`` on."""
        self.cache.length = min(keep, self.cache.length)

    # -- forward ---------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, *, all_logits: bool = False) -> torch.Tensor:
        """Run ``ids`` [T] after the cached positions; logits [T, V] or [1, V] (last token)."""
        T = ids.shape[0]
        start = self.cache.length
        self.cache.reserve(start + T)
        self._ensure_rope(start + T)
        h = self.w.embed(ids.to(self.device))  # [T, D]
        cos = self.cos[start:start + T, None, :]  # [T, 1, hd]
        sin = self.sin_signed[start:start + T, None, :]  # [T, 1, hd], sign folded in (see _rope)
        if T == 1 and self.planner is not None:
            self.planner.start_token()
        for layer, lw in enumerate(self.w.layers):
            h = h + self._attention(layer, lw, _rms(h, lw.attn_norm, self.spec.rms_norm_eps), cos, sin, start)
            h = h + self._ffn(layer, lw, _rms(h, lw.ffn_norm, self.spec.rms_norm_eps), h)
        self.cache.length = start + T
        if not all_logits:
            h = h[-1:]
        h = _rms(h, self.w.norm, self.spec.rms_norm_eps)
        return self.w.lm_head(h).float()  # [T or 1, V]

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
        topv, topi = torch.topk(probs, min(f.top_k, self.route_top_k or f.top_k), dim=-1)  # [T, k]
        if f.norm_topk_prob:
            topv = topv / topv.sum(dim=-1, keepdim=True)
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
            out = out + torch.sigmoid(F.linear(x, lw.shared_gate)) * shared
        return out

    def part_scores(self, layer: int, x: torch.Tensor, topi: torch.Tensor) -> torch.Tensor | None:
        """Sub-expert gate scores [T, k, S] of the routed experts (None without gates)."""
        if self.gates is None or self.gates[layer] is None:
            return None
        return self.gates[layer].scores(x, topi)

    def unit_weights(self, layer: int, x: torch.Tensor, topv: torch.Tensor,
                     topi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Selected units (sorted, CPU) [P] and their per-token weights [P, T] (None: all 1)."""
        f, S = self.spec.ffn[layer], self.parts[layer]
        T = x.shape[0]
        if self.selector is None and not f.routed:
            # Dense FFN at full operating point: every unit, weight 1, no sync needed.
            return self._all_units[layer], None
        if self.selector is None:
            w = topv[:, :, None].expand(T, topi.shape[1], S)  # [T, k, S]
        else:
            w = self.selector(layer, x, topv, topi)  # [T, k, S]
        units = topi[:, :, None] * S + torch.arange(S, device=x.device)  # [T, k, S]
        tok = torch.arange(T, device=x.device)[:, None, None].expand_as(units)  # [T, k, S]
        dense = x.new_zeros(f.num_experts * S, T)  # [U, T]
        dense[units.reshape(-1), tok.reshape(-1)] = w.reshape(-1).to(x.dtype)
        chosen = (dense != 0).any(dim=1).nonzero().squeeze(1)  # [P]
        return chosen.cpu(), dense[chosen]  # [P], [P, T]

    def _experts(self, layer: int, x: torch.Tensor, topv: torch.Tensor, topi: torch.Tensor,
                 resid: torch.Tensor) -> torch.Tensor:
        units, wt = self.unit_weights(layer, x, topv, topi)  # [P], [P, T] or None
        decode = x.shape[0] == 1
        host = None
        if decode and self.planner is not None:
            if wt is None:
                wt = x.new_ones(units.shape[0], 1)
            units, wt, host_units, host_wt = self.planner.plan(layer, x, units, wt, topi)  # [P'], [P', 1]
            if host_units.numel():
                host = host_units, host_wt
        cap = self.store.capacity(layer)

        def part(i: int) -> torch.Tensor | None:
            return None if wt is None else wt[i:i + cap]

        if units.numel():
            out = self._units(layer, x, units[:cap], part(0), resid if decode else None)
        else:  # the planner sent every selected sub-expert to the host
            out = torch.zeros_like(x)
        # A prefill under a small memory budget can select more units than fit at once.
        for i in range(cap, units.shape[0], cap):
            out = out + self._units(layer, x, units[i:i + cap], part(i))
        if host is not None:
            # Computed on the host CPU from host memory instead of waiting for their copy.
            blocks = self.store.host_blocks(layer, host[0].tolist())  # [Ph, 3, n, D] (CPU)
            hx = x.to("cpu", torch.float32)
            out = out + block_ffn(hx, blocks.float(), host[1].cpu().float()).to(x.device, x.dtype)
        return out

    def _units(self, layer: int, x: torch.Tensor, units: torch.Tensor, wt: torch.Tensor | None,
               resid: torch.Tensor | None = None) -> torch.Tensor:
        slots = self.store.slots(layer, units)  # [P]
        if resid is not None and self.prefetcher is not None:
            # Loads for the next layers overlap this layer's compute.
            self.prefetcher.on_selected(layer, resid, units)
        try:
            return self.kernels[layer](x, self.store.pool(layer), slots, wt)  # [T, D], read in place
        finally:
            self.store.done(layer)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """Causal attention of new queries q [T, H, hd] over cached k, v [Hk, L, hd] -> [T, H*hd]."""
    T, H, hd = q.shape
    Hk, L = k.shape[0], k.shape[1]
    if T == 1:
        # Decode: grouped matmuls; CPU SDPA with enable_gqa is ~40x slower at this size.
        qg = q.view(Hk, H // Hk, hd)  # [Hk, G, hd]
        scores = torch.matmul(qg, k.transpose(1, 2)) * (1.0 / math.sqrt(hd))  # [Hk, G, L]
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)  # [Hk, G, L]
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
