"""Per-layer operating points: where a token's sub-experts go across the layers.

Layers are not equally sensitive to losing sub-experts. On the default model, running layer 0
alone at 12 of 16 costs 0.09 nats of KL divergence from the full model; any one of layers 1-29
at 12 costs 0.01-0.02. A prism checkpoint built with ``layer_sensitivity`` (refactor measures
it on the calibration text) stores, per layer, the KL divergence of the model with that layer
alone at each operating point. Treating the layers' losses as additive:

- a fixed operating point K (``LayerAllocation.points``) runs each layer at its own K_l with
  sum(units(K_l)) = sum(units(K)): the same sub-experts per token as K everywhere, placed
  where they are worth most (an exact dynamic programme over the layers);
- a token-latency planner (runtime.token_planner) spends the time left on the increments
  (one layer from one K to a larger one) with the most loss removed per second first
  (``Increments``: the lower convex hull of each layer's loss against its cost, merged across
  layers), so a budget cut takes sub-experts from where they are worth least.

Without a measured sensitivity every layer runs at K (uniform), as before.
"""

from __future__ import annotations

import bisect
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


class Increments:
    """A token-latency planner's choices: from each layer at its lowest operating point ``lo``,
    the steps to higher ones sorted by loss removed per second (the lower convex hull of each
    layer's (cost, loss) points, merged). ``cost[K][layer]``: seconds of the layer's sub-experts
    and selection at K; ``values``: LayerAllocation.values (None: the loss of a layer at K is
    taken as its units missing, so the steps spread evenly, a fractional uniform K).

    ``plan(layer, spare)``: operating points of layers ``layer``.. for ``spare`` seconds above
    their lowest, and the seconds that plan costs above it."""

    def __init__(self, cost: list[list[float]], values: list[list[float]] | None, lo: list[int], hi: list[int],
                 units: list[list[int]]):
        L = len(lo)
        self.hi = list(hi)
        self.lo = list(lo)  # each layer's cheapest operating point in lo..hi (full K may cost less than K-1)
        steps = []  # (slope, layer, order, K to, cost)
        for j in range(L):
            if values is None:
                loss = [float(units[hi[j]][j] - units[kk][j]) for kk in range(len(units))]
            else:
                loss = values[j]
            pts = _hull([(cost[kk][j], loss[kk], kk) for kk in range(lo[j], hi[j] + 1)])
            self.lo[j] = pts[0][2]
            for n, ((c0, v0, _), (c1, v1, k1)) in enumerate(zip(pts, pts[1:])):
                dc = c1 - c0
                slope = (v1 - v0) / dc if dc > 0 else -math.inf
                steps.append((slope, j, n, k1, dc))
        # Equal slopes (no measured loss: every step alike) go to the earlier layer first, so
        # a plan cut short leaves the last layers lower, as a fractional uniform K does.
        steps.sort(key=lambda s: (s[0], s[1], s[2]))
        self.base_cost = [0.0] * (L + 1)  # suffix sums of cost at lo
        for j in range(L - 1, -1, -1):
            self.base_cost[j] = self.base_cost[j + 1] + cost[self.lo[j]][j]
        # per first layer: cumulative cost of its steps and the operating points after each
        self._cum: list[list[float]] = []
        self._states: list[np.ndarray] = []
        for j in range(L):
            mine = [s for s in steps if s[1] >= j]
            cum, t = [0.0], 0.0
            state = np.array(self.lo, dtype=np.int64)
            states = np.empty((len(mine) + 1, L), dtype=np.int64)
            states[0] = state
            for i, (_, layer, _, k1, dc) in enumerate(mine, start=1):
                t += max(dc, 0.0)
                cum.append(t)
                state[layer] = k1
                states[i] = state
            self._cum.append(cum)
            self._states.append(states)

    def plan(self, layer: int, spare: float) -> tuple[list[int], float]:
        cum = self._cum[layer]
        m = bisect.bisect_right(cum, spare) - 1
        if m < 0:
            m = 0
        return self._states[layer][m].tolist(), cum[m]


def _hull(pts: list[tuple[float, float, int]]) -> list[tuple[float, float, int]]:
    """The lower convex hull of (cost, loss, K) from the cheapest point to the lowest loss,
    points that cost more for no less loss dropped."""
    pts = sorted(pts, key=lambda p: (p[0], p[1]))
    front = []
    for p in pts:  # the Pareto front: loss falls as cost rises
        if front and p[1] >= front[-1][1]:
            continue
        front.append(p)
    hull: list[tuple[float, float, int]] = []
    for p in front:
        while len(hull) >= 2:
            (x0, y0, _), (x1, y1, _) = hull[-2], hull[-1]
            # drop hull[-1] when it lies on or above the segment hull[-2] -> p
            if (y1 - y0) * (p[0] - x0) >= (p[1] - y0) * (x1 - x0):
                hull.pop()
            else:
                break
        hull.append(p)
    return hull
