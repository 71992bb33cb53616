"""The decoder: attention with a KV cache, and FFNs computed as sub-experts over packed blocks.

[embed] -> per layer: [norm -> attention (+KV cache)] -> [norm -> router -> sub-expert
selection -> store.slots -> batched sub-expert kernels -> weighted sum] -> [norm -> lm_head]

Legend for shape comments: T=tokens, D=hidden, H=heads, Hk=kv heads, hd=head dim,
E=experts, k=top-k, S=sub-experts per expert, n=neurons per sub-expert, P=selected
sub-experts (units) in a layer, U=E*S units of a layer, L=cached positions, V=vocab.

A sub-expert block is one contiguous [3, n, D] tensor: rows of W_gate, rows of W_up, and
the matching columns of W_down as a row-major [D, n] matrix in the last slot, so one copy
moves it and an expert's output is exactly the sum of its sub-experts' outputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from edge_prism.spec import ModelSpec


@dataclass
class LayerWeights:
    """Always-resident weights of one decoder layer."""

    attn_norm: torch.Tensor  # [D]
    ffn_norm: torch.Tensor  # [D]
    wqkv_t: torch.Tensor  # [D, (H+2Hk)*hd]: stored transposed, see weights_for_decode()
    bqkv: torch.Tensor | None  # [(H+2Hk)*hd]
    wo_t: torch.Tensor  # [H*hd, D]
    q_norm: torch.Tensor | None  # [hd] (head) or [H*hd] (full)
    k_norm: torch.Tensor | None
    router: torch.Tensor | None  # [E, D]
    router_bias: torch.Tensor | None = None  # [E] (synthetic routing skew)
    shared_gu: torch.Tensor | None = None  # [2*Ws, D]
    shared_down: torch.Tensor | None = None  # [D, Ws]
    shared_gate: torch.Tensor | None = None  # [1, D]


@dataclass
class Weights:
    """All always-resident weights (everything but the sub-expert blocks)."""

    embed: torch.Tensor  # [V, D] (a view of lm_head_t when tied)
    norm: torch.Tensor  # [D]
    lm_head_t: torch.Tensor  # [D, V]
    layers: list[LayerWeights]

    def nbytes(self) -> int:
        """Bytes held, counting a tied lm_head once."""
        seen: set[int] = set()
        total = 0
        tensors = [self.embed, self.norm, self.lm_head_t]
        for lw in self.layers:
            tensors += [t for t in vars(lw).values() if isinstance(t, torch.Tensor)]
        for t in tensors:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total


def transposed(w: torch.Tensor) -> torch.Tensor:
    """``w`` [out, in] stored as [in, out].

    Decode multiplies one row vector by each weight; with the output dimension contiguous
    that streams at ~16-21 GB/s on a 2-core AVX-512 CPU against ~11 GB/s for x @ W^T on
    rows of a few hundred values (measured with torch 2.13 / MKL).
    """
    return w.t().contiguous()


def tied_head(embed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(embedding view [V, D], lm_head_t [D, V]) sharing one buffer for tied embeddings."""
    head_t = transposed(embed)
    return head_t.t(), head_t


class ExpertStore(Protocol):
    """Where sub-expert blocks live during compute (the runtime implements this)."""

    def slots(self, layer: int, units: torch.Tensor) -> torch.Tensor:
        """Make ``units`` (sorted flat ids e*S+s, CPU int64 [P]) resident; their slots [P]."""
        ...

    def pool(self, layer: int) -> torch.Tensor:
        """The slot buffer that ``slots`` index: [num_slots, 3, n, D]."""
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
    # Same op order as transformers' RMSNorm so float32 results agree to the last bits.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


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
                 parts: list[int], dtype: torch.dtype, device: torch.device):
        self.spec, self.w, self.store = spec, weights, store
        self.parts = parts  # S per layer
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

    # -- positions -------------------------------------------------------------------
    def _ensure_rope(self, positions: int) -> None:
        if positions > self._rope_len:
            n = min(max(positions, 2 * self._rope_len), max(positions, self.spec.max_position))
            self.cos, self.sin = rope_tables(self.spec, n, self.device)
            self.cos, self.sin = self.cos.to(self.dtype), self.sin.to(self.dtype)
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
        h = self.w.embed[ids.to(self.device)]  # [T, D]
        cos = self.cos[start:start + T, None, :]  # [T, 1, hd]
        sin = self.sin[start:start + T, None, :]
        if T == 1 and self.planner is not None:
            self.planner.start_token()
        for layer, lw in enumerate(self.w.layers):
            h = h + self._attention(layer, lw, _rms(h, lw.attn_norm, self.spec.rms_norm_eps), cos, sin, start)
            h = h + self._ffn(layer, lw, _rms(h, lw.ffn_norm, self.spec.rms_norm_eps), h)
        self.cache.length = start + T
        if not all_logits:
            h = h[-1:]
        h = _rms(h, self.w.norm, self.spec.rms_norm_eps)
        return torch.matmul(h, self.w.lm_head_t).float()  # [T or 1, V]

    def _attention(self, layer: int, lw: LayerWeights, x: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor, start: int) -> torch.Tensor:
        s = self.spec
        T, H, Hk, hd = x.shape[0], s.num_heads, s.num_kv_heads, s.head_dim
        qkv = torch.matmul(x, lw.wqkv_t)  # [T, (H+2Hk)*hd]
        if lw.bqkv is not None:
            qkv = qkv + lw.bqkv
        q, k, v = qkv.split((H * hd, Hk * hd, Hk * hd), dim=-1)
        if s.qk_norm == "full":
            q, k = _rms(q, lw.q_norm, s.rms_norm_eps), _rms(k, lw.k_norm, s.rms_norm_eps)
        if s.clip_qkv is not None:
            q, k, v = (t.clamp(-s.clip_qkv, s.clip_qkv) for t in (q, k, v))
        q, k, v = q.view(T, H, hd), k.view(T, Hk, hd), v.view(T, Hk, hd)
        if s.qk_norm == "head":
            q, k = _rms(q, lw.q_norm, s.rms_norm_eps), _rms(k, lw.k_norm, s.rms_norm_eps)
        q = q * cos + _rotate_half(q) * sin  # [T, H, hd]
        k = k * cos + _rotate_half(k) * sin  # [T, Hk, hd]
        end = start + T
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        kc[:, start:end].copy_(k.transpose(0, 1))  # [Hk, L, hd]
        vc[:, start:end].copy_(v.transpose(0, 1))
        out = _attend(q, kc[:, :end], vc[:, :end], start)  # [T, H*hd]
        return torch.matmul(out, lw.wo_t)  # [T, D]

    def route(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router weights and experts of each token: topv, topi [T, k]."""
        f, lw = self.spec.ffn[layer], self.w.layers[layer]
        if not f.routed:
            ones = torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)
            return ones, torch.zeros(x.shape[0], 1, dtype=torch.long, device=x.device)
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
            gu = F.linear(x, lw.shared_gu)  # [T, 2*Ws]
            g, u = gu.chunk(2, dim=-1)
            shared = F.linear(F.silu(g) * u, lw.shared_down)  # [T, D]
            out = out + torch.sigmoid(F.linear(x, lw.shared_gate)) * shared
        return out

    def part_scores(self, layer: int, x: torch.Tensor, topi: torch.Tensor) -> torch.Tensor | None:
        """Sub-expert gate scores [T, k, S] of the routed experts (None without gates)."""
        if self.gates is None or self.gates[layer] is None:
            return None
        return self.gates[layer].scores(x, topi)

    def unit_weights(self, layer: int, x: torch.Tensor, topv: torch.Tensor,
                     topi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Selected units (sorted, CPU) [P] and their per-token weights [P, T]."""
        f, S = self.spec.ffn[layer], self.parts[layer]
        T = x.shape[0]
        if self.selector is None and not f.routed:
            # Dense FFN at full operating point: every unit, weight 1, no sync needed.
            return self._all_units[layer], x.new_ones(S, T)
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
        units, wt = self.unit_weights(layer, x, topv, topi)  # [P], [P, T]
        decode = x.shape[0] == 1
        host = None
        if decode and self.planner is not None:
            units, wt, host_units, host_wt = self.planner.plan(layer, x, units, wt, topi)  # [P'], [P', 1]
            if host_units.numel():
                host = host_units, host_wt
        cap = self.store.capacity(layer)
        out = self._units(layer, x, units[:cap], wt[:cap], resid if decode else None)
        # A prefill under a small memory budget can select more units than fit at once.
        for i in range(cap, units.shape[0], cap):
            out = out + self._units(layer, x, units[i:i + cap], wt[i:i + cap])
        if host is not None:
            # Computed on the host CPU from host memory instead of waiting for their copy.
            blocks = self.store.host_blocks(layer, host[0].tolist())  # [Ph, 3, n, D] (CPU)
            hx = x.to("cpu", torch.float32)
            out = out + block_ffn(hx, blocks.float(), host[1].cpu().float()).to(x.device, x.dtype)
        return out

    def _units(self, layer: int, x: torch.Tensor, units: torch.Tensor, wt: torch.Tensor,
               resid: torch.Tensor | None = None) -> torch.Tensor:
        slots = self.store.slots(layer, units)  # [P]
        if resid is not None and self.prefetcher is not None:
            # Loads for the next layers overlap this layer's compute.
            self.prefetcher.on_selected(layer, resid, units)
        blocks = _gather(self.store.pool(layer), slots)  # [P, 3, n, D]
        if blocks.dtype != x.dtype:
            blocks = blocks.to(x.dtype)  # pool kept in the checkpoint's dtype
        out = block_ffn(x, blocks, wt)  # [T, D]
        self.store.done(layer)
        return out


def block_ffn(x: torch.Tensor, blocks: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    """Weighted sum of sub-expert FFNs: x [T, D], blocks [P, 3, n, D], weights [P, T] -> [T, D]."""
    P, _, n, D = blocks.shape
    gu = blocks[:, :2].reshape(P, 2 * n, D)  # [P, 2n, D]
    # W x^T walks each weight row contiguously: ~20% faster than x W^T for decode.
    h = torch.matmul(gu, x.t()).transpose(1, 2)  # [P, T, 2n]
    act = F.silu(h[..., :n]) * h[..., n:]  # [P, T, n]
    act = act * wt[:, :, None]  # [P, T, n]
    down = blocks[:, 2].reshape(P, D, n)  # [P, D, n] (W_down's columns, see build.pack_expert)
    return torch.matmul(down, act.transpose(1, 2)).sum(dim=0).t()  # [T, D]


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


def _gather(pool: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Blocks at ``slots``: a view when they are consecutive, else one batched gather."""
    P = slots.shape[0]
    if P and int(slots[-1]) - int(slots[0]) == P - 1 and bool((slots.diff() == 1).all()):
        first = int(slots[0])
        return pool[first:first + P]  # [P, 3, n, D] view, no copy
    return pool.index_select(0, slots.to(pool.device))  # [P, 3, n, D]
