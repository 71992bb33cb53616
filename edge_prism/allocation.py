"""Per-layer operating points: where a token's sub-experts go across the layers.

Layers are not equally sensitive to losing sub-experts. On the default model, running layer 0
alone at 12 of 16 costs 0.09 nats of KL divergence from the full model; any one of layers 1-29
at 12 costs 0.01-0.02. A prism checkpoint built with ``layer_sensitivity`` (refactor measures
it on the calibration text) stores, per layer, the KL divergence of the model with that layer
alone at each operating point. Treating the layers' losses as additive:

- a fixed operating point K (``LayerAllocation.points``) runs each layer at its own K_l with
  sum(units(K_l)) = sum(units(K)): the same sub-experts per token as K everywhere, placed
  where they are worth most (an exact dynamic programme over the layers);
- a token-latency planner (runtime.token_planner) that must cut a token runs the largest
  operating point whose allocation fits the time left, and K+1's allocation in the first
  layers as far as the rest allows: a cut token computes what a fixed operating point's
  layers would. (Spending the time on the most loss per second first, the lower convex hull
  of each layer's loss against its cost merged across layers, did worse: on the default
  model at 0.85x of the unconstrained p50, KL 0.90 at a mean K of 8.4, worse than fixed K=8
  with fewer units (0.85); this plan gave 0.66-0.75 at a mean K of 9.0-9.1.)

Without a measured sensitivity every layer runs at K (uniform), as before.
"""

from __future__ import annotations

import math

import numpy as np

from edge_prism.errors import PrismCheckpointError
from edge_prism.select import max_operating_point, quotas


def layer_units(spec, parts: list[int], k: int) -> list[int]:
    """Sub-experts each layer computes per decode token at operating point ``k`` (a dense
    layer of a MoE model: all of its parts, at every K)."""
    out = []
    for f, s in zip(spec.ffn, parts):
        if f.routed or not spec.is_moe:
            out.append(sum(quotas(k, f.top_k, s)))
        else:
            out.append(f.top_k * s)
    return out


class LayerAllocation:
    """Operating point per layer for a model's K. ``sensitivity``: per layer, its measured
    loss at K = 1..full (full: 0), or None for a layer whose units do not vary with K; None
    altogether: uniform."""

    def __init__(self, spec, parts: list[int], sensitivity: list | None = None, *, lowest: int = 1,
                 where: str = "prism.json"):
        self.L = spec.num_layers
        self.full = max_operating_point(spec, parts)
        # [K][layer] for K = 0..full (K = 0 unused)
        self.units = [[0] * self.L] + [layer_units(spec, parts, k) for k in range(1, self.full + 1)]
        self.varies = [len({self.units[k][j] for k in range(1, self.full + 1)}) > 1 for j in range(self.L)]
        self.values = None
        if sensitivity is not None:
            self.values = _checked_values(sensitivity, self.L, self.full, self.varies, where)
        # No layer of a fixed operating point at or above it goes below the lowest K measured
        # (below it the losses are extrapolated).
        self.lowest = max(1, int(lowest))
        self._points: dict[int, list[int]] = {}

    @property
    def measured(self) -> bool:
        return self.values is not None

    def loss(self, points: list[int]) -> float:
        """Predicted loss (sum of the layers' measured losses) of running ``points``."""
        if self.values is None:
            return math.nan
        return float(sum(self.values[j][k] for j, k in enumerate(points) if self.varies[j]))

    def points(self, k: int) -> list[int]:
        """Each layer's operating point for the model's operating point ``k``: the same units
        per token as ``k`` everywhere, spread where they remove the most measured loss."""
        if k not in self._points:
            if self.values is None or k >= self.full:
                self._points[k] = [k] * self.L
            else:
                self._points[k] = self._solve(k)
        return list(self._points[k])

    def _solve(self, k: int) -> list[int]:
        layers = [j for j in range(self.L) if self.varies[j]]
        target = sum(self.units[k][j] for j in layers)
        inf = math.inf
        best = np.full(target + 1, inf)
        best[0] = 0.0
        choice = []  # per layer: [total] -> K
        for j in layers:
            new = np.full(target + 1, inf)
            arg = np.zeros(target + 1, dtype=np.int64)
            for kk in range(min(k, self.lowest), self.full + 1):
                c = self.units[kk][j]
                if c > target:
                    break
                cand = best[:target + 1 - c] + self.values[j][kk]
                better = cand < new[c:]
                new[c:][better] = cand[better]
                arg[c:][better] = kk
            best = new
            choice.append(arg)
        out = [k] * self.L
        if not math.isfinite(best[target]):  # pragma: no cover - uniform k always reaches target
            return out
        t = target
        for j, arg in zip(reversed(layers), reversed(choice)):
            kk = int(arg[t])
            out[j] = kk
            t -= self.units[kk][j]
        return out


def _checked_values(sensitivity, L: int, full: int, varies: list[bool], where: str) -> list[list[float]]:
    if not isinstance(sensitivity, list) or len(sensitivity) != L:
        raise PrismCheckpointError(f"{where}: layer_sensitivity must list {L} layers; rebuild the checkpoint "
                                   "with `edge-prism refactor`")
    out = []
    for j, row in enumerate(sensitivity):
        if row is None or not varies[j]:
            out.append([0.0] * (full + 1))
            continue
        if (not isinstance(row, list) or len(row) != full
                or not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in row)):
            raise PrismCheckpointError(f"{where}: layer_sensitivity of layer {j} must hold {full} finite losses "
                                       "(K = 1..full); rebuild the checkpoint with `edge-prism refactor`")
        out.append([0.0] + [float(v) for v in row[:-1]] + [0.0])  # full K loses nothing
    return out
