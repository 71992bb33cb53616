"""The operating point K: which sub-experts of the routed experts a token computes.

The rule that spreads K over the router's ranked experts lives here and only here:

    K active sub-experts per token per MoE layer are shared out over the token's top_k
    experts in router rank order, as evenly as possible, the remainder going to the
    higher-ranked experts (K=10, top_k=4 -> 3, 3, 2, 2). Within each expert the parts
    with the highest sub-expert gate scores are computed. Full K (S x top_k) computes
    every part and reproduces the original model exactly.

Dense FFN layers inside a MoE model always run in full; in a dense model (every FFN one
expert) K applies to each FFN directly (1..S).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edge_prism.errors import ConfigError
from edge_prism.refactor import gates as gatelib
from edge_prism.spec import ModelSpec


def max_operating_point(spec: ModelSpec, parts: list[int]) -> int:
    """Full K: all sub-experts of the top_k experts (MoE layers; every FFN for dense models)."""
    layers = [i for i, f in enumerate(spec.ffn) if f.routed] or list(range(spec.num_layers))
    return max(spec.ffn[i].top_k * parts[i] for i in layers)


def quotas(k: int, top_k: int, parts: int) -> list[int]:
    """Sub-experts per ranked expert for operating point ``k`` (remainder to higher ranks)."""
    base, extra = divmod(k, top_k)
    return [min(parts, base + (1 if j < extra else 0)) for j in range(top_k)]


def check_operating_point(k: int, spec: ModelSpec, parts: list[int]) -> int:
    """``k`` itself when valid, else a one-line ConfigError with the valid range."""
    full = max_operating_point(spec, parts)
    if not 1 <= k <= full:
        raise ConfigError(f"invalid operating point {k}: this model takes 1 to {full} "
                          f"active sub-experts per token per layer")
    return k


@dataclass
class LayerGate:
    """One layer's gate parameters, batched over experts."""

    kind: str
    a: torch.Tensor  # proxy: rows [E, S, r, 2, D]; linear: weight [E, D, S]; oracle: block pool
    b: torch.Tensor | int | None = None  # linear: bias [E, S]; oracle: number of experts

    def scores(self, x: torch.Tensor, topi: torch.Tensor) -> torch.Tensor:
        """Gate scores [T, k, S] of each token's routed experts' parts."""
        if self.kind == "oracle":
            return oracle_scores(self.a, self.a.shape[0] // self.b, x, topi)  # [T, k, S]
        if self.kind == "proxy":
            return gatelib.proxy_scores_batched(self.a, x, topi)  # [T, k, S]
        return gatelib.linear_scores_batched(self.a, self.b, x, topi)  # [T, k, S]


def oracle_scores(pool: torch.Tensor, parts: int, x: torch.Tensor, topi: torch.Tensor) -> torch.Tensor:
    """Exact activation mass of each routed part [T, k, S] (evaluation only: it computes
    every part of every expert, so it saves nothing; it bounds what a real gate can do).

    ``pool`` is the layer's resident block buffer in unit order [E*S, 3, n, D].
    """
    U, _, n, D = pool.shape
    T, k = topi.shape
    gu = pool[:, :2].reshape(U, 2 * n, D).to(x.dtype)  # [U, 2n, D]
    h = torch.matmul(gu, x.t()).transpose(1, 2)  # [U, T, 2n]
    mass = (torch.nn.functional.silu(h[..., :n]) * h[..., n:]).abs().sum(-1)  # [U, T]
    per_expert = mass.view(U // parts, parts, T).permute(2, 0, 1)  # [T, E, S]
    return per_expert.gather(1, topi[:, :, None].expand(T, k, parts))  # [T, k, S]


class SubExpertSelector:
    """Selects each token's sub-experts at operating point K (a model.Selector)."""

    def __init__(self, spec: ModelSpec, parts: list[int], gates: list[LayerGate | None], k: int):
        self.spec, self.parts, self.gates = spec, parts, gates
        self.k = check_operating_point(k, spec, parts)
        dense_model = not spec.is_moe
        self._dense_model = dense_model
        self._ones: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}  # weights 1 [K, 1]
        self._quota: list[torch.Tensor | None] = []  # None: every part (a dense layer of a MoE model, or full K)
        self._on_device: dict[tuple[int, torch.device], torch.Tensor] = {}  # copied once, not per token
        self._part_ids: dict[tuple[int, torch.device], torch.Tensor] = {}  # 0..S-1 per (S, device)
        for f, s in zip(spec.ffn, parts):
            if f.routed or dense_model:
                q = quotas(self.k, f.top_k, s)
                self._quota.append(None if all(n == s for n in q) else torch.tensor(q))
            else:
                self._quota.append(None)  # dense layer of a MoE model: full width

    def quota(self, layer: int) -> torch.Tensor | None:
        """Parts per ranked expert [k] of ``layer`` (None: all)."""
        return self._quota[layer]

    def _picks(self, layer: int, x: torch.Tensor, topi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each routed expert's best parts by gate score, [T, k, qmax], and which of those
        its quota keeps, [k, qmax] (the expert of rank j keeps its first quota[j])."""
        q = self._quota[layer]
        key = (layer, x.device)
        valid = self._on_device.get(key)
        if valid is None:
            valid = self._on_device[key] = (torch.arange(int(q.max()))[None, :] < q[:, None]).to(x.device)
        parts = self.gates[layer].scores(x, topi).topk(valid.shape[1], dim=-1).indices  # [T, k, qmax]
        return parts, valid[: topi.shape[1]]

    def __call__(self, layer: int, x: torch.Tensor, topv: torch.Tensor, topi: torch.Tensor) -> torch.Tensor:
        S = self.parts[layer]
        T, k = topi.shape
        if self._quota[layer] is None:
            return topv[:, :, None].expand(T, k, S)  # [T, k, S]
        parts, valid = self._picks(layer, x, topi)  # [T, k, qmax], [k, qmax]
        keep = torch.zeros(T, k, S, dtype=torch.bool, device=x.device)
        keep.scatter_(2, parts, valid[None].expand_as(parts))  # [T, k, S]
        return topv[:, :, None] * keep  # [T, k, S]

    def decode_units(self, layer: int, x: torch.Tensor, topv: torch.Tensor,
                     topi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token's selection as the store takes it: units e*S+s (sorted, CPU) [P] and their
        weights [P, 1], without the [1, k, S] weight tensor of __call__ (the same choice)."""
        S = self.parts[layer]
        if self._quota[layer] is None:
            ids = self._part_ids.get((S, x.device))
            if ids is None:
                ids = self._part_ids[(S, x.device)] = torch.arange(S, device=x.device)
            return full_token_units(S, topv, topi, ids, x.dtype)
        if self._dense_model:
            # One expert (unit e*S+s is part s), router weight 1: the gate's best K parts,
            # sorted, are the units. Five ops instead of a dozen, every layer of every token.
            k = int(self._quota[layer][0])
            units = self.gates[layer].scores(x, topi)[0, 0].topk(k).indices.sort().values  # [K]
            key = (k, x.dtype, x.device)
            ones = self._ones.get(key)
            if ones is None:
                ones = self._ones[key] = torch.ones(k, 1, dtype=x.dtype, device=x.device)
            return units.cpu(), ones  # [K], [K, 1]
        parts, valid = self._picks(layer, x, topi)
        flat = topi[0, :, None] * S + parts[0]  # [k, qmax]
        wv = topv[0, :, None].expand_as(flat)
        keep = valid & (wv != 0)  # a zero router weight (group-limited routing) computes nothing
        return token_units(flat, wv, keep, x.dtype)

    def decode_weights(self, layer: int, x: torch.Tensor, topv: torch.Tensor, topi: torch.Tensor,
                       dense_units: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One token's selection for a kernel that reads whole experts (FFNKernel
        ``reads_whole_experts``): every part of each routed expert with a quota and a nonzero
        router weight, units sorted (CPU) [P], weighted [P, 1] by the router's weight where
        selected and 0 elsewhere. The kernel computes what it computes for decode_units, with
        no host sync to list the selected parts (none at all for a dense layer:
        ``dense_units``, its units 0..S-1; None for a routed layer).
        """
        S, q = self.parts[layer], self._quota[layer]
        if q is None:
            return self.decode_units(layer, x, topv, topi)
        parts, valid = self._picks(layer, x, topi)  # [1, k, qmax], [k, qmax]
        k = topi.shape[1]
        keep = torch.zeros(k, S, dtype=torch.bool, device=x.device).scatter_(1, parts[0], valid)  # [k, S]
        w = (topv[0, :, None] * keep).to(x.dtype)  # [k, S]
        if dense_units is not None:
            return dense_units, w.reshape(S, 1)  # [S], [S, 1]
        # Which experts' matrices to read: the one host sync of a routed layer.
        host = torch.cat((topi[0].double(), topv[0].double())).tolist()
        quota = q.tolist()
        ranks = sorted((int(host[j]), j) for j in range(k) if quota[j] > 0 and host[k + j] != 0)
        units = torch.tensor([e * S + s for e, _ in ranks for s in range(S)], dtype=torch.long)
        rows = w[[j for _, j in ranks]]  # [k', S]
        return units, rows.reshape(-1, 1)  # [k'S], [k'S, 1]


def full_token_units(S: int, topv: torch.Tensor, topi: torch.Tensor, ids: torch.Tensor,
                     dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Every part of one token's routed experts: units (sorted, CPU) [P], weights [P, 1];
    ``ids`` = arange(S) on the routing's device."""
    flat = topi[0, :, None] * S + ids  # [k, S]
    wv = topv[0, :, None].expand_as(flat)
    return token_units(flat, wv, wv != 0, dtype)


def token_units(flat: torch.Tensor, wv: torch.Tensor, keep: torch.Tensor,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate units ``flat`` with weights ``wv`` (same shape, distinct units), those where
    ``keep``: units sorted (CPU) [P] and their weights [P, 1] in ``dtype``."""
    sel = keep.reshape(-1).nonzero().squeeze(1)  # [P] (the host sync the store needs)
    units, order = flat.reshape(-1)[sel].sort()
    return units.cpu(), wv.reshape(-1)[sel][order, None].to(dtype)  # [P], [P, 1]
