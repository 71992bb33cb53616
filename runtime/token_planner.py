"""Token planner: keep a token-latency budget by each layer's operating point alone.

Where a missing sub-expert costs what a resident one does (the CPU reading its misses in
place from the mapped experts file, or everything resident), which sub-experts a layer
computes changes nothing but how many: the decision is the operating point. So a decode
token runs each layer at a fixed operating point K's own selection (the model's
SubExpertSelector for K, cached per K), and the planner only chooses K:

per decode token: start_token() -> layer 0: the largest K whose predicted time fits the
budget less the slack, every layer at K's own point (the model's allocation of K across the
layers, allocation.LayerAllocation, or K everywhere), then the first layers at K+1's points as
far as the time left allows (a fractional operating point) -> each later layer: one clock
read against the schedule; a layer that starts off it by more than SCHEDULE_MARGIN of the budget plans the
rest of the token again from the time left -> end_token() learns the token's time.

Its cost model is per token: fixed + per unit x units computed + per selecting layer x
layers that run a selector (below full K every layer scores its sub-experts' gates; at full
K none does, so full K can be faster than K-1); the fixed term follows the tokens' times. Measured on the
default model at a 25% memory budget: LatencyPlanner's per-layer planning cost ~2.9 ms a
token where the whole range from K=8 to K=16 spans ~6 ms; this planner costs a clock read a
layer and, where a token falls off its schedule, ~20 us of plain Python to plan again.

Where misses cost loads on a copy engine (CUDA), or may run on the host instead, which
sub-experts are missing matters and runtime.planner.LatencyPlanner plans each layer.
"""

from __future__ import annotations

import collections
import math
import statistics
import time

import torch

from edge_prism.errors import ConfigError
from edge_prism.allocation import layer_units
from edge_prism.select import max_operating_point

from .device import synchronize
from .planner import MISS_RATE, SCHEDULE_MARGIN, CostModel, transfer_lanes

FIXED_GAIN = 0.1  # weight of one token in the running mean of the fixed term
# The slack: how far the last SLACK_WINDOW tokens ran past the deadline they planned for
# (budget - slack; or the end the plan predicted, where the floor ends after it), median +
# SLACK_SIGMAS robust sigmas (median absolute deviation): ~98% of a normal spread, for MISS_RATE's 95% with room for the caller's own overhead around
# the forward (0.1 ms of Python on the default model) that the planner cannot see. Robust,
# because one stall (the first decode token: +5 ms) set a quantile's slack for twenty
# tokens. LatencyPlanner's tracker (2% of the budget up per missed token, down a
# nineteenth of it per met one) swung past the quantile on each miss where tokens end
# within +-0.3 ms of their plan (the default model at a 25% budget): 10-20% missed.
SLACK_WINDOW = 32
SLACK_SIGMAS = 3.0


class TokenPlanner:
    """Chooses each decode layer's operating point to fit ``budget_s`` (a model.Planner that
    does not trim: the model's selector for the chosen K selects).

    The deadline planned for is the budget less a slack: how far recent tokens ran past
    the deadline they planned for, median + SLACK_SIGMAS robust sigmas (about MISS_RATE of
    tokens miss, whatever the spread). It starts at SCHEDULE_MARGIN of the budget, so a
    budget that full K meets by more than that drops nothing. No token runs below the
    floor: ``min_share`` of the model's operating point (at least 1; a quarter by default,
    so that a token that stalls runs at K/4, not at one sub-expert a layer), each layer at
    the floor's own point in the model's allocation.
    """

    trims = False  # model.Planner: the model's selector at operating_point(layer) is the selection

    def __init__(self, model, cost: CostModel, *, budget_s: float, min_share: float = 0.25):
        if not 0.0 <= min_share <= 1.0:
            raise ConfigError(f"invalid min_share {min_share!r}: use a share between 0 and 1")
        spec, parts = model.spec, model.parts
        self.model, self.cost, self.budget_s = model, cost, budget_s
        self.min_share = float(min_share)
        self.L = spec.num_layers
        self.full = max_operating_point(spec, parts)
        # [K][layer] for K = 0..full (K = 0 unused): units, and whether a selector runs
        self._u = [[0] * self.L] + [layer_units(spec, parts, k) for k in range(1, self.full + 1)]
        top = self._u[self.full]
        self._sel = [[0] * self.L] + [[int(u < t) for u, t in zip(self._u[k], top)]
                                      for k in range(1, self.full + 1)]
        self.head_s = cost.head_s
        fixed0 = self.L * cost.layer_fixed_s + cost.head_s
        select0 = cost.select_s
        if select0 is None:
            select0 = _selection_s(model, self.full) if model.gates is not None else 0.0
        # Only the fixed term is learnt online (a running mean of the tokens' error): the
        # per-unit and per-selection terms are the kernels' own, measured on whole decode
        # tokens at start-up. Fitted online by ridge regression (RidgeFit), they went wrong:
        # a token that runs late plans its last layers at a lower operating point, so slow
        # tokens compute fewer units and the fit read that as units costing nothing (0.3-7 us
        # a unit where tokens cost 30), until no operating point seemed to save time.
        self.fixed_s = fixed0  # per token: every layer's fixed part and the head
        self.unit_s, self.select_s = cost.unit_s, select0
        self.load_lanes = transfer_lanes(model.store)
        self.slack_s = SCHEDULE_MARGIN * budget_s  # a token ends within about the margin of its plan
        self._over: collections.deque[float] = collections.deque(maxlen=SLACK_WINDOW)
        self._t0 = time.perf_counter()
        self._k = [self.full] * self.L  # this token's operating point per layer
        self._due = [math.inf] * self.L  # per layer: when it should start (since the token's start)
        self._base = self.full
        self._points = [self.full] * self.L  # the model's own operating point per layer (its allocation)
        self._cut = False  # this token's plan runs below the model's points
        self._end = 0.0  # when this token's plan ends (since its start)
        self._costs: dict[tuple, list[float]] = {}  # per-layer points -> suffix sums of their seconds
        self.reset_stats()

    # -- the cost model -----------------------------------------------------------------
    @property
    def layer_fixed_s(self) -> float:
        """Per layer: attention, norms, router, the FFN call's overheads (the head aside)."""
        return max(self.fixed_s - self.head_s, 0.0) / self.L

    def predict(self, units: int, selecting: int) -> float:
        """Seconds of a decode token computing ``units`` sub-experts in all, ``selecting``
        of its layers below full K."""
        return self.fixed_s + self.unit_s * units + self.select_s * selecting

    # -- model.Planner -----------------------------------------------------------------------
    def reset_stats(self) -> None:
        """Zero the counters."""
        self.dropped = 0
        self.tokens = 0
        self.host_computed = 0  # never: kept for the report's keys
        self._k_sum = 0.0
        self.replans = 0

    def set_budget(self, budget_s: float) -> None:
        """Plan for ``budget_s`` per token from now on: the cost terms stay, the slack (learnt
        against the old budget) and the counters start again."""
        self.budget_s, self.slack_s = budget_s, SCHEDULE_MARGIN * budget_s
        self._over.clear()
        self.reset_stats()

    def start_token(self) -> None:
        self._t0 = time.perf_counter()
        m = self.model
        self._base = m.operating_point or self.full
        self._points = m.layer_points or [self._base] * self.L
        self.tokens += 1

    def operating_point(self, layer: int) -> int:
        """This layer's operating point: the token's plan, planned again where the token
        runs off its schedule."""
        now = time.perf_counter() - self._t0
        if layer == 0:
            self._plan(0, now)
        else:
            due, margin = self._due[layer], SCHEDULE_MARGIN * self.budget_s
            if now > due or (now < due - 2 * margin and self._cut):
                self.replans += 1
                self._plan(layer, now)
        return self._k[layer]

    def plan(self, layer, x, units, wt, topi):  # pragma: no cover - trims is False: never called
        raise NotImplementedError("TokenPlanner chooses operating points; it does not trim selections")

    def floor(self) -> int:
        """The lowest operating point a layer runs at, however late the token."""
        return min(self._base, max(1, math.ceil(self.min_share * self._base)))

    def _plan(self, layer: int, elapsed: float) -> None:
        """Operating points for ``layer`` and every later one, from the time left: the largest
        operating point K whose own per-layer points (the model's allocation of K, or K in
        every layer) fit, then the first layers at K+1's points as far as the time left allows."""
        L, a = self.L, self.layer_fixed_s
        left = self.budget_s - self.slack_s - elapsed - a * (L - layer) - self.head_s
        k, lowest = self._base, self.floor()
        pts, cost = self._chain(k)
        while k > lowest and cost[layer] > left:
            k -= 1
            pts, cost = self._chain(k)
        ks = self._k
        ks[layer:] = pts[layer:]
        self._cut = k < self._base
        if self._cut:
            # The first layers at K+1's points as far as the time left allows: between two
            # fixed operating points, where a fixed K must round down.
            spare = left - cost[layer]
            up, step = self._chain(k + 1)[0], self._layer_s
            for j in range(layer, L):
                more = step(up[j], j) - step(pts[j], j)
                if more > spare:
                    break
                ks[j], spare = up[j], spare - more
        margin = SCHEDULE_MARGIN * self.budget_s
        t, due, step = elapsed, self._due, self._layer_s
        for j in range(layer, L):
            due[j] = t + margin
            t += a + step(ks[j], j)
        self._end = max(t + self.head_s, self.budget_s - self.slack_s)

    def _layer_s(self, k: int, layer: int) -> float:
        """Predicted seconds of ``layer``'s sub-experts and selection at operating point ``k``."""
        return self.unit_s * self._u[k][layer] + self.select_s * self._sel[k][layer]

    def _chain(self, k: int) -> tuple[list[int], list[float]]:
        """Operating point ``k``'s per-layer points (at the token's own K: the model's
        layer_points) and the suffix sums of their predicted seconds, length L + 1."""
        pts = self._points if k == self._base else self._alloc_points(k)
        key = tuple(pts)
        if key not in self._costs:
            out = [0.0] * (self.L + 1)
            for j in range(self.L - 1, -1, -1):
                out[j] = out[j + 1] + self._layer_s(pts[j], j)
            self._costs[key] = out
        return pts, self._costs[key]

    def _alloc_points(self, k: int) -> list[int]:
        alloc = self.model.allocation
        return [k] * self.L if alloc is None else alloc.points(k)

    def end_token(self) -> None:
        """The token's logits are computed: its time is learnt, and the slack follows
        whether it met the budget."""
        took = time.perf_counter() - self._t0
        ks, u, sel, base = self._k, self._u, self._sel, self._base
        units = sum(u[k][j] for j, k in enumerate(ks))
        selecting = sum(sel[k][j] for j, k in enumerate(ks))
        # A stall (another process, a page fault) counts as at most 3x the prediction: the
        # fixed term is a running mean, and one 30 ms token would move it for the next twenty.
        predicted = self.predict(units, selecting)
        self.fixed_s = max(self.fixed_s + FIXED_GAIN * (min(took, 3 * predicted) - predicted), self.head_s)
        self.dropped += sum(u[base][j] for j in range(self.L)) - units
        self._k_sum += statistics.fmean(ks)
        over = self._over
        # Past the deadline planned for, or past the end the plan predicted where even the
        # floor does not fit the deadline: counted from the deadline, every such token raised
        # the slack (up to half the budget) and held the next tokens at the floor.
        over.append(took - self._end)
        if len(over) >= 4:
            mid = statistics.median(over)
            spread = 1.4826 * statistics.median(abs(e - mid) for e in over)  # a robust sigma
            self.slack_s = min(max(mid + SLACK_SIGMAS * spread, 0.0), 0.5 * self.budget_s)

    def report(self, latencies_s: list[float]) -> dict:
        """Drop counters, the share of decode tokens within the budget and the fitted costs."""
        within = sum(1 for t in latencies_s if t <= self.budget_s)
        return {
            "token_latency_budget_ms": self.budget_s * 1000,
            "planner": "token",
            "dropped_subexperts": self.dropped,
            "dropped_subexperts_per_token": self.dropped / self.tokens if self.tokens else 0.0,
            "mean_operating_point": self._k_sum / self.tokens if self.tokens else None,
            "tokens_within_budget": within / len(latencies_s) if latencies_s else None,
            "cpu_computed_subexperts": self.host_computed,
            "replans_per_token": self.replans / self.tokens if self.tokens else 0.0,
            "cost_fixed_ms": self.layer_fixed_s * 1000,
            "cost_resident_ms": self.unit_s * 1000,
            "cost_missing_ms": self.unit_s * 1000,
            "cost_selection_ms": self.select_s * 1000,
            "load_lanes": self.load_lanes,
            "slack_ms": self.slack_s * 1000,
        }


@torch.inference_mode()
def _selection_s(model, full: int, repeats: int = 9) -> float:
    """Seconds a decode layer's selection below full K costs beyond full K's, on the layer
    with the most sub-experts (the model's own unit_weights on a random token)."""
    spec = model.spec
    layer = max(range(spec.num_layers), key=lambda i: spec.ffn[i].top_k * model.parts[i]
                + (0 if spec.ffn[i].routed or not spec.is_moe else -10**9))
    x = torch.randn(1, spec.hidden_size, device=model.device, dtype=model.dtype) * 0.1
    topv, topi = model.route(layer, x)

    def timed(k: int) -> float:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            model.unit_weights(layer, x, topv, topi, k=k)
            synchronize(model.device)
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    if full < 2:
        return 0.0
    timed(full - 1)  # the selector is made and warmed
    return max(timed(full - 1) - timed(full), 0.0)
