"""Split one expert's intermediate neurons into equal groups (sub-experts).

acts [T, I] --|.|--> greedy balanced co-activation clustering --> annealed swaps --> groups [I]

A token that computes only its ``keep`` heaviest groups loses the L1 activation mass of
the others; a good partition puts neurons that fire together in the same group so that
this lost mass is small (MoE-Prism, arXiv 2510.19366). Everything here is plain torch on
one expert's calibration activations; nothing knows about files, layers or models.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from edge_prism.errors import ConfigError
from edge_prism.quant import DEFAULT_GROUP

logger = logging.getLogger(__name__)

SOLVERS = ("anneal", "greedy", "contiguous", "random")

# Group sizes that are multiples of this keep packed sub-expert blocks aligned for matmul
# kernels and DMA; it is a preference, not a requirement (see group_size_ok).
_ALIGN = 16
# Candidate swaps evaluated together; one batch costs a handful of [B, T] tensor ops.
_BATCH = 32
# swap_deltas works through a batch this many candidates at a time: at T ~ 2000 its
# temporaries then fit in L2 and a candidate costs ~2/3 of what it does at 32.
_CHUNK = 8
# Anneal proposals per neuron when ``steps`` is not given: at I=1536, N=16, T=2000 the
# whole partition takes ~0.6-0.8 s of one CPU core, and more steps gained <0.5% there.
_STEPS_PER_NEURON = 4
# Anneal on at most this many calibration rows (a seeded subset); the keep-best check
# against the start still uses every row.
_MAX_ANNEAL_TOKENS = 4096
# Rebuild the group masses from scratch every so many accepted swaps, so float32
# rounding of the incremental updates cannot pile up.
_RESYNC_EVERY = 256
_KMEANS_ITERS = 15
# Start temperature in units of a typical uphill move (see _temperatures).
_T0_FACTOR = 0.1
# Of each anneal batch, this many candidates are the tangent-bound best swaps of distinct
# group pairs; the rest are uniform random swaps.
_GUIDED = 24
# Stop annealing after this many iterations in a row accept nothing.
_PATIENCE = 25


# Default sub-experts per expert. A dense FFN whose width splits into 24 parts of whole
# DEFAULT_GROUP-neuron (32) quantization groups gets 24 (a 4-bit source's W_down is re-quantized per
# sub-expert in groups of 32, see refactor --permuted-down); any other dense FFN 16; a routed
# expert 8. Measured on the default model (width 1536; profiles/quality_subexperts_default.md):
# 24 parts of 64 neurons against 16 of 96, same calibration, at K = 3/4 of full on the first
# 3072 held-out tokens: licenses x1.465 vs x1.556, dialogue x1.461 vs x1.420, one or two more
# usable operating points; 48 parts of 32 gave 7 usable points on licenses but x1.525 at 3/4
# and a 4x longer refactoring.
DENSE_SUB_EXPERTS, DENSE_FALLBACK, ROUTED_SUB_EXPERTS = 24, 16, 8
DEFAULT_SUB_EXPERTS_RULE = (f"routed {ROUTED_SUB_EXPERTS}; dense {DENSE_SUB_EXPERTS} where width % "
                            f"{DENSE_SUB_EXPERTS * DEFAULT_GROUP} == 0, else {DENSE_FALLBACK}")


def default_sub_experts(width: int, routed: bool) -> int:
    """Sub-experts per expert when none are requested (DEFAULT_SUB_EXPERTS_RULE)."""
    if routed:
        return ROUTED_SUB_EXPERTS
    return DENSE_SUB_EXPERTS if width % (DENSE_SUB_EXPERTS * DEFAULT_GROUP) == 0 else DENSE_FALLBACK


def group_size_ok(width: int, num_groups: int) -> bool:
    """Whether ``width`` neurons split into ``num_groups`` equal groups.

    Sizes that are multiples of 16 (``width % (16 * num_groups) == 0``) are the
    preferred case; any other equal split is still accepted. Unequal splits are not.
    """
    # A 16-aligned split (width % (16 * num_groups) == 0) is one case of this.
    return 1 <= num_groups <= width and width % num_groups == 0


def partition(
    acts: Tensor,
    num_groups: int,
    *,
    keep: int,
    solver: str = "anneal",
    seed: int = 0,
    steps: int | None = None,
) -> Tensor:
    """Assign each of an expert's I neurons to one of ``num_groups`` equal groups.

    ``acts`` are the expert's intermediate activations on calibration tokens, [T, I]
    (sign does not matter). ``keep`` is the operating point the partition is tuned for:
    the number of heaviest groups a token computes. ``steps`` is the number of candidate
    swaps the annealer evaluates (default scales with I). Returns int64 group ids [I],
    every group exactly I / num_groups neurons; deterministic for a given ``seed``.
    """
    _check_inputs(acts, num_groups, keep=keep, solver=solver, steps=steps)
    width = acts.shape[1]
    if width % (_ALIGN * num_groups):
        logger.debug("partition: %d neurons / %d groups is not a multiple of %d", width, num_groups, _ALIGN)
    gen = torch.Generator().manual_seed(seed)
    if solver == "contiguous":
        return torch.arange(width) // (width // num_groups)
    if solver == "random":
        return _random_groups(width, num_groups, gen)
    acts_abs = acts.detach().to("cpu", torch.float32).abs()  # [T, I]
    start = time.perf_counter()
    groups = _greedy_groups(acts_abs, num_groups, gen)
    if solver == "anneal":
        n_steps = _STEPS_PER_NEURON * width if steps is None else steps
        groups = _anneal(acts_abs, groups, num_groups, keep=keep, steps=n_steps, gen=gen)
    logger.debug(
        "partition: solver=%s I=%d N=%d keep=%d T=%d took %.3fs",
        solver, width, num_groups, keep, acts.shape[0], time.perf_counter() - start,
    )
    return groups


def partition_objective(acts_abs: Tensor, groups: Tensor, num_groups: int, *, keep: int) -> float:
    """L1 activation mass left out when each token computes only its ``keep`` heaviest groups.

    Summed over the T tokens of ``acts_abs`` [T, I] (already absolute values); lower is
    better, 0 when every token's mass lies in at most ``keep`` groups. Computed in float64.
    """
    mass = group_mass(acts_abs.double(), groups, num_groups)  # [T, N]
    kept = mass.topk(min(keep, num_groups), dim=1).values.sum(dim=1)  # [T]
    return float((mass.sum(dim=1) - kept).sum())


def group_mass(acts_abs: Tensor, groups: Tensor, num_groups: int) -> Tensor:
    """Per-token activation mass of each group: |acts| [T, I] -> [T, N].

    The quantity the partition objective and the sub-expert gates are about. A one-hot
    matmul, because index_add_ along the neuron axis is ~10x slower on CPU.
    """
    onehot = torch.nn.functional.one_hot(groups.to(torch.int64), num_groups).to(acts_abs.dtype)  # [I, N]
    return acts_abs @ onehot


def permutation_from_groups(groups: Tensor, order: Tensor | None = None) -> Tensor:
    """Neuron order that makes each group contiguous: block b holds group ``order[b]``.

    ``order`` defaults to 0..N-1. Within a group the original neuron order is kept, so
    ``weight[perm]`` lays out sub-expert ``order[0]`` first, then ``order[1]``...
    """
    groups = groups.to(torch.int64)
    if order is None:
        order = torch.arange(int(groups.max()) + 1 if groups.numel() else 0)
    order = order.to(torch.int64)
    num_groups = order.numel()
    unknown_group = groups.numel() > 0 and int(groups.max()) >= num_groups
    if sorted(order.tolist()) != list(range(num_groups)) or unknown_group:
        raise ConfigError(
            f"group order {order.tolist()} is not a permutation of the group ids 0..{num_groups - 1}; "
            "pass each group id exactly once"
        )
    block_of_group = torch.empty_like(order)  # [N]
    block_of_group[order] = torch.arange(num_groups)
    return torch.sort(block_of_group[groups], stable=True).indices  # [I]


# --------------------------------------------------------------------------- validation


def _check_inputs(acts: Tensor, num_groups: int, *, keep: int, solver: str, steps: int | None) -> None:
    if solver not in SOLVERS:
        raise ConfigError(f"unknown partition solver {solver!r}; use one of {', '.join(SOLVERS)}")
    if acts.dim() != 2 or acts.shape[0] == 0:
        raise ConfigError(
            f"calibration activations have shape {tuple(acts.shape)}; expected [tokens, neurons] "
            "with at least one token"
        )
    width = acts.shape[1]
    if not group_size_ok(width, num_groups):
        raise ConfigError(
            f"{num_groups} sub-experts do not split {width} neurons into equal groups; "
            f"choose a divisor of {width} (e.g. {_suggest_groups(width, num_groups)})"
        )
    if not 1 <= keep <= num_groups:
        raise ConfigError(f"keep={keep} is outside 1..{num_groups}; pass the sub-experts kept per token")
    if not bool(torch.isfinite(acts).all()):
        raise ConfigError("calibration activations contain NaN or inf; recompute them in float32")
    if steps is not None and steps < 0:
        raise ConfigError(f"steps={steps} is negative; pass 0 to skip annealing or a positive count")


def _suggest_groups(width: int, num_groups: int) -> int:
    """The divisor of ``width`` nearest ``num_groups``, preferring 16-aligned sizes."""
    divisors = [n for n in range(1, width + 1) if width % n == 0]
    aligned = [n for n in divisors if width % (_ALIGN * n) == 0] or divisors
    return min(aligned, key=lambda n: (abs(n - num_groups), n))


# --------------------------------------------------------------------------- helpers


def _random_groups(width: int, num_groups: int, gen: torch.Generator) -> Tensor:
    size = width // num_groups
    return (torch.arange(width) // size)[torch.randperm(width, generator=gen)]  # [I]


# --------------------------------------------------------------------------- greedy


def _greedy_groups(acts_abs: Tensor, num_groups: int, gen: torch.Generator) -> Tensor:
    """Balanced k-means of neurons by co-activation (cosine of their |act| columns).

    Neurons whose activations rise and fall on the same tokens end up in the same group;
    capacity-constrained assignment keeps every group exactly I / N neurons.
    """
    width = acts_abs.shape[1]
    if num_groups == 1:
        return torch.zeros(width, dtype=torch.int64)
    cols = acts_abs.t()  # [I, T]
    feats = cols / cols.norm(dim=1, keepdim=True).clamp_min(1e-12)  # [I, T]
    centroids = feats[_kmeanspp_seeds(feats, num_groups, gen)]  # [N, T]
    groups = torch.full((width,), -1, dtype=torch.int64)
    for it in range(_KMEANS_ITERS):
        new_groups = _balanced_assign(feats @ centroids.t(), width // num_groups)  # [I]
        if torch.equal(new_groups, groups):
            break
        groups = new_groups
        # Sum of raw columns: heavy neurons pull the centroid, as they weigh in the objective.
        summed = group_mass(acts_abs, groups, num_groups).t()  # [N, T]
        centroids = summed / summed.norm(dim=1, keepdim=True).clamp_min(1e-12)  # [N, T]
    logger.debug("greedy partition: %d k-means iterations", it + 1)
    return groups


def _kmeanspp_seeds(feats: Tensor, num_groups: int, gen: torch.Generator) -> Tensor:
    """k-means++ seeding on unit vectors (distance = 1 - cosine), seeded by ``gen``."""
    width = feats.shape[0]
    seeds = [int(torch.randint(width, (1,), generator=gen))]
    dist = 1.0 - feats @ feats[seeds[0]]  # [I]
    for _ in range(num_groups - 1):
        weights = dist.clamp_min(0.0).double()  # [I]
        if float(weights.sum()) <= 0.0:  # all neurons identical: any distinct seed will do
            weights = torch.ones(width, dtype=torch.float64)
            weights[seeds] = 0.0
        nxt = int(torch.multinomial(weights, 1, generator=gen))
        seeds.append(nxt)
        dist = torch.minimum(dist, 1.0 - feats @ feats[nxt])
    return torch.tensor(seeds)


def _balanced_assign(score: Tensor, capacity: int) -> Tensor:
    """Assign rows of ``score`` [I, N] to columns, exactly ``capacity`` rows per column.

    Rounds of proposals: every unassigned neuron proposes to its best group with room
    left, and each group takes its best-scoring proposers up to its room. A group fills
    or everyone is placed each round, so there are at most N rounds.
    """
    width, num_groups = score.shape
    groups = torch.full((width,), -1, dtype=torch.int64)
    room = torch.full((num_groups,), capacity, dtype=torch.int64)
    while True:
        free = (groups < 0).nonzero().squeeze(1)  # [F]
        if free.numel() == 0:
            return groups
        masked = score[free].masked_fill(room == 0, float("-inf"))  # [F, N]
        best_score, best_group = masked.max(dim=1)  # [F], [F]
        # Rank proposers within their group by score (stable sort keeps ties by neuron id).
        by_score = torch.sort(best_score, descending=True, stable=True).indices  # [F]
        by_group = by_score[torch.sort(best_group[by_score], stable=True).indices]  # [F]
        grp_sorted = best_group[by_group]  # [F]
        first = torch.searchsorted(grp_sorted, grp_sorted, side="left")  # [F]
        rank = torch.arange(free.numel()) - first  # [F]
        take = rank < room[grp_sorted]  # [F]
        groups[free[by_group[take]]] = grp_sorted[take]
        room -= torch.bincount(grp_sorted[take], minlength=num_groups)


# --------------------------------------------------------------------------- anneal


@dataclass
class _AnnealState:
    """One partition's group masses, sorted per token, so a swap's exact cost is O(T).

    A token's cost is the sum of its ``dropped`` lightest group masses. ``without_one``
    holds, for every group g and every k in a small window around ``dropped``, the sum of
    the k lightest groups other than g; removing a second group from that is a
    where() on ranks, so a batch of swaps is a few dozen [B, T] elementwise ops.
    """

    acts: Tensor  # [T, I]
    acts_t: Tensor  # [I, T], rows are neurons so a neuron's column is one contiguous read
    groups: Tensor  # [I]
    num_groups: int
    dropped: int  # groups left out per token, N - keep
    window: range  # the k of without_one: dropped-2 .. dropped+1, clipped to what exists
    mass: Tensor  # [N, T], group-major so a group's masses are one contiguous row
    rank: Tensor  # [N, T] int16: position of each group in its token's ascending order
    cost: Tensor  # [T]: mass left out per token
    without_one: Tensor  # [K, N, T]: sum of the k lightest groups other than g, k in window
    dropped_mask: Tensor  # [N, T] float: 1 where the group is among the token's dropped
    grad: Tensor  # [I, N]: per neuron, its mass on the tokens where group g is dropped

    @classmethod
    def build(cls, acts_abs: Tensor, groups: Tensor, num_groups: int, keep: int) -> "_AnnealState":
        """State for ``groups`` on ``acts_abs`` [T, I]."""
        acts = acts_abs.contiguous()  # [T, I]
        dropped = num_groups - keep
        window = range(max(0, dropped - 2), min(dropped, num_groups - 2) + 2)
        empty = acts.new_empty(0)
        state = cls(acts, acts.t().contiguous(), groups.clone(), num_groups, dropped, window,
                    *([empty] * 6))
        state.rebuild()
        return state

    def rebuild(self) -> None:
        """Recompute masses, tables and gradient from scratch (start, and against float drift)."""
        onehot = torch.nn.functional.one_hot(self.groups, self.num_groups).to(self.acts.dtype)  # [I, N]
        self.mass = onehot.t() @ self.acts_t  # [N, T]
        self._resort()
        self.grad = self.acts_t @ self.dropped_mask.t()  # [I, N]

    def _resort(self) -> None:
        # Sorting token-major rows is several times faster than sorting along dim 0.
        values, order = self.mass.t().sort(dim=1)  # [T, N] ascending per token
        positions = torch.arange(self.num_groups, dtype=torch.int16).expand_as(order)  # [T, N]
        rank = torch.empty(order.shape, dtype=torch.int16).scatter_(1, order, positions)  # [T, N]
        self.rank = rank.t().contiguous()  # [N, T]
        csum = torch.cat([values.new_zeros(values.shape[0], 1), values.cumsum(dim=1)], dim=1)  # [T, N+1]
        csum = csum.t().contiguous()  # [N+1, T]
        self.cost = csum[self.dropped]  # [T]
        self.without_one = torch.stack([
            torch.where(self.rank >= k, csum[k], csum[k + 1] - self.mass) for k in self.window
        ])  # [K, N, T]
        self.dropped_mask = (self.rank < self.dropped).to(self.mass.dtype)  # [N, T]

    def swap_deltas(self, a: Tensor, b: Tensor) -> Tensor:
        """Exact change of the total cost if neurons ``a[i]`` and ``b[i]`` trade groups: [B].

        Only groups p and q change. A token's new cost is the lightest of: ``dropped`` of
        the other N-2 groups; one fewer of them plus the lighter new mass; two fewer plus
        both new masses. The others' sums come from ``without_one`` of the lower-ranked
        of p and q, minus the higher-ranked one where it falls inside the prefix.
        """
        if self.dropped == 0:  # every group is kept: nothing a swap does can cost
            return torch.zeros(a.shape[0], dtype=self.mass.dtype)
        if a.shape[0] > _CHUNK:  # small chunks keep the [B, T] temporaries in cache
            chunks = range(0, a.shape[0], _CHUNK)
            return torch.cat([self.swap_deltas(a[i:i + _CHUNK], b[i:i + _CHUNK]) for i in chunks])
        p, q = self.groups[a], self.groups[b]  # [B], [B]
        diff = self.acts_t[b] - self.acts_t[a]  # [B, T]
        old_p, old_q = self.mass[p], self.mass[q]  # [B, T]
        new_p, new_q = old_p + diff, old_q - diff  # [B, T]
        rank_p, rank_q = self.rank[p], self.rank[q]  # [B, T]
        p_lower = rank_p < rank_q  # [B, T]
        rank_hi = torch.maximum(rank_p, rank_q)  # [B, T]
        mass_hi = torch.where(p_lower, old_q, old_p)  # [B, T]
        lo_table = torch.where(p_lower, self.without_one[:, p], self.without_one[:, q])  # [K, B, T]
        k0 = self.window.start
        best = None
        for j, extra in ((0, None), (1, torch.minimum(new_p, new_q)), (2, new_p + new_q)):
            k = self.dropped - j  # lightest others to keep in the dropped set
            if k < k0 or k + 1 >= self.window.stop:
                continue
            # Sum of the k lightest groups other than p and q.
            others = torch.where(rank_hi > k, lo_table[k - k0], lo_table[k + 1 - k0] - mass_hi)  # [B, T]
            cand = others if extra is None else others + extra  # [B, T]
            best = cand if best is None else torch.minimum(best, cand)
        return (best - self.cost).sum(dim=1)  # [B]

    def guided_swaps(self, count: int) -> tuple[Tensor, Tensor]:
        """The ``count`` group pairs whose best swap has the lowest tangent bound: ([C], [C]).

        ``bound[i, g]`` = change of the tangent cost if neuron i alone moved to group g
        (only the dropped groups' mass costs); a swap's bound is the sum of its two moves.
        """
        n_groups, width = self.num_groups, self.groups.shape[0]
        bound = self.grad - self.grad.gather(1, self.groups.unsqueeze(1))  # [I, N]
        members = torch.argsort(self.groups, stable=True).view(n_groups, width // n_groups)  # [N, I/N]
        move, who = bound[members].min(dim=1)  # [N from, N to]: best neuron of p to move to q
        pair = move + move.t()  # [N, N]: swap p <-> q
        pair = pair.triu(1) + torch.full_like(pair, float("inf")).tril()  # each pair once
        top = pair.view(-1).topk(count, largest=False).indices  # [C]
        p, q = top // n_groups, top % n_groups  # [C], [C]
        return members[p, who[p, q]], members[q, who[q, p]]

    def apply_swap(self, a: int, b: int) -> None:
        """Trade the groups of neurons a and b, updating masses, ranks and gradient."""
        p, q = int(self.groups[a]), int(self.groups[b])
        diff = self.acts_t[b] - self.acts_t[a]  # [T]
        self.mass[p] += diff
        self.mass[q] -= diff
        self.groups[a], self.groups[b] = q, p
        old_mask = self.dropped_mask  # [N, T]
        self._resort()
        # The gradient changes only on tokens whose dropped set changed: usually few.
        change = self.dropped_mask - old_mask  # [N, T]
        tokens = change.abs().sum(dim=0).nonzero().squeeze(1)  # [C]
        if tokens.numel():
            self.grad += self.acts[tokens].t() @ change[:, tokens].t()  # [I, N]


def _anneal(
    acts_abs: Tensor, start: Tensor, num_groups: int, *, keep: int, steps: int, gen: torch.Generator
) -> Tensor:
    """Simulated annealing over swaps of two neurons between groups; returns the best seen.

    Each iteration scores a batch of candidate swaps exactly against the current
    partition and applies the best of those that pass the Metropolis test at the current
    temperature (geometric schedule scaled from the start's uphill move sizes).
    Candidates are mostly guided: a token's cost is concave in the group masses, so its
    tangent bounds every swap's delta from above; the best swap of each group pair under
    that bound costs one [I, T] x [T, N] product for all I^2 pairs. A few uniform random
    swaps keep the search from circling the same moves.
    """
    width = acts_abs.shape[1]
    if steps == 0 or keep >= num_groups or num_groups == 1:
        return start
    sub = acts_abs
    if acts_abs.shape[0] > _MAX_ANNEAL_TOKENS:
        rows = torch.randperm(acts_abs.shape[0], generator=gen)[:_MAX_ANNEAL_TOKENS]
        sub = acts_abs[rows.sort().values]  # [T', I]
    state = _AnnealState.build(sub, start, num_groups, keep)
    n_iters = max(1, math.ceil(steps / _BATCH))
    n_guided = min(_GUIDED, num_groups * (num_groups - 1) // 2)
    n_random = _BATCH - n_guided

    t_start, t_end = _temperatures(state, width, gen)
    cur = best = float(state.cost.sum())
    best_groups = state.groups.clone()
    accepted, uphill, idle, guided = 0, 0, 0, None
    for it in range(n_iters):
        temp = t_start * (t_end / t_start) ** (it / max(1, n_iters - 1))
        if guided is None:  # the state changed: new tangent-bound candidates and their costs
            ga, gb = state.guided_swaps(n_guided)
            guided = (ga, gb, state.swap_deltas(ga, gb))
        ra = torch.randint(width, (n_random,), generator=gen)  # [R]
        rb = torch.randint(width, (n_random,), generator=gen)  # [R]
        a, b = torch.cat([guided[0], ra]), torch.cat([guided[1], rb])  # [B], [B]
        delta = torch.cat([guided[2], state.swap_deltas(ra, rb)]).double()  # [B]
        delta = delta.masked_fill(state.groups[a] == state.groups[b], float("inf"))
        uniform = torch.rand(a.shape[0], generator=gen, dtype=torch.float64)  # [B]
        # Metropolis: accept when delta < -temp * ln(u); of those, apply the best.
        ok = delta < -temp * torch.log(uniform)  # [B]
        if not bool(ok.any()):
            idle += 1
            if idle >= _PATIENCE:  # cold and stuck: more of the same will not move
                break
            continue
        idle = 0
        pick = int(torch.where(ok, delta, float("inf")).argmin())
        state.apply_swap(int(a[pick]), int(b[pick]))
        guided = None
        accepted += 1
        uphill += int(delta[pick] > 0)
        if accepted % _RESYNC_EVERY == 0:
            state.rebuild()
            cur = float(state.cost.sum())
        else:
            cur += float(delta[pick])
        if cur < best:
            best = cur
            best_groups = state.groups.clone()

    # The final word goes to the exact float64 objective on all rows: never worse than start.
    start_obj = partition_objective(acts_abs, start, num_groups, keep=keep)
    best_obj = partition_objective(acts_abs, best_groups, num_groups, keep=keep)
    logger.debug(
        "anneal: %d/%d iterations, %d swaps accepted (%d uphill), objective %.6g -> %.6g",
        it + 1, n_iters, accepted, uphill, start_obj, best_obj,
    )
    return best_groups if best_obj < start_obj else start.clone()


def _temperatures(state: _AnnealState, width: int, gen: torch.Generator) -> tuple[float, float]:
    """Start and end temperatures from the sizes of uphill moves around the start.

    Scaling by the data keeps the schedule independent of activation magnitudes: at the
    start a median uphill random swap passes with probability e^-(1/_T0_FACTOR); the end
    temperature is 1000x colder.
    """
    a = torch.randint(width, (_BATCH,), generator=gen)  # [B]
    b = torch.randint(width, (_BATCH,), generator=gen)  # [B]
    delta = state.swap_deltas(a, b)[state.groups[a] != state.groups[b]]  # [B']
    uphill = delta[delta > 0]
    scale = float(uphill.median()) if uphill.numel() else float(state.cost.sum()) / max(1, width)
    scale = max(scale, 1e-12)
    return _T0_FACTOR * scale, _T0_FACTOR * scale * 1e-3
