"""Sub-expert gates: score an expert's groups from the layer input, without retraining.

x [T, D] --gate--> scores [T, N] --top-K--> the groups worth computing for each token

A gate predicts how much activation mass |silu(x W_gate^T) * (x W_up^T)| each of an
expert's N neuron groups will carry, so the runtime can compute only the heaviest few.
Two kinds:

- ``proxy`` (MoE-Prism's): per group, r representative neurons whose activations track
  the group's mass; the score is their |activation| summed, i.e. a tiny slice of the
  expert itself. Fitted by forward selection on calibration activations.
- ``linear``: ridge least squares from x to the group masses (or their logarithms), in
  closed form.

Alongside the gates, ``compensation`` gives each group the mean output it has on the
calibration tokens where the default gate drops it at the tuned operating point: the
runtime adds it back for dropped groups (a constant per group, no compute), so a dropped
group costs its deviation from that mean rather than its whole output.

Fitting is offline and per expert; scoring at run time is batched over experts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from edge_prism.errors import ConfigError
from edge_prism.refactor.partition import group_mass

logger = logging.getLogger(__name__)

GATE_KINDS = ("proxy", "linear")
GATE_TARGETS = ("mass", "log")
# The log target's floor, relative to the mean mass: a group that carries nothing is not -inf.
LOG_FLOOR = 1e-2


@dataclass(frozen=True)
class ProxyGate:
    """Gate and up weight rows of ``r`` representative neurons per group.

    ``rows[g, j, 0]`` is a W_gate row, ``rows[g, j, 1]`` the matching W_up row scaled by
    the group's fitted mass/proxy ratio: the activation is linear in the up row, so the
    scale rides along in the weights and no separate tensor is needed.
    """

    rows: Tensor  # [N, r, 2, D]


@dataclass(frozen=True)
class LinearGate:
    """Affine map from the layer input to predicted group masses: x @ weight + bias."""

    weight: Tensor  # [D, N]
    bias: Tensor  # [N]


def fit_proxy_gate(
    acts: Tensor,
    w_gate: Tensor,
    w_up: Tensor,
    groups: Tensor,
    num_groups: int,
    *,
    neurons_per_group: int = 4,
) -> ProxyGate:
    """Pick each group's ``neurons_per_group`` most explanatory neurons as its gate.

    ``acts`` [T, I] are the expert's calibration activations, ``w_gate``/``w_up`` [I, D]
    its weights, ``groups`` [I] the group of each neuron. Per group, neurons are added
    greedily (forward selection) so that a scaled sum of their |act| fits the group's
    mass best in least squares; the fitted scale makes scores comparable across groups.
    """
    # T=tokens, I=neurons, N=groups, S=neurons per group, r=gate neurons per group, D=hidden
    _check_groups(acts, groups, num_groups)
    width, hidden = acts.shape[1], w_gate.shape[1]
    if w_gate.shape != (width, hidden) or w_up.shape != (width, hidden):
        raise ConfigError(
            f"gate/up weights have shapes {tuple(w_gate.shape)} and {tuple(w_up.shape)}; "
            f"expected [{width}, D] each to match the {width} activation columns"
        )
    size = width // num_groups
    if not 1 <= neurons_per_group <= size:
        raise ConfigError(
            f"neurons_per_group={neurons_per_group} does not fit groups of {size} neurons; "
            f"pass 1..{size}"
        )
    acts_abs = acts.detach().float().abs()  # [T, I]
    members = torch.argsort(groups.to(torch.int64), stable=True).view(num_groups, size)  # [N, S]
    mass = group_mass(acts_abs, groups, num_groups)  # [T, N]
    cand = acts_abs.t()[members]  # [N, S, T]
    chosen = _forward_select(cand, mass.t().contiguous(), neurons_per_group)  # [N, r] within-group index
    neurons = members.gather(1, chosen)  # [N, r]

    proxy = acts_abs[:, neurons].sum(dim=2).double()  # [T, N]
    target = mass.double()  # [T, N]
    energy = (proxy * proxy).sum(dim=0)  # [N]
    # Least-squares scale of proxy onto mass; a group whose proxies never fired keeps 1.
    scale = torch.where(energy > 0, (proxy * target).sum(dim=0) / energy.clamp_min(1e-300), 1.0)  # [N]
    up = w_up[neurons].to(torch.float64) * scale[:, None, None]  # [N, r, D]
    rows = torch.stack([w_gate[neurons].to(torch.float64), up], dim=2).to(w_up.dtype)  # [N, r, 2, D]
    logger.debug("proxy gate: %d neurons per group, scales %s", neurons_per_group, scale.tolist())
    return ProxyGate(rows=rows)


def fit_linear_gate(
    x: Tensor, acts: Tensor, groups: Tensor, num_groups: int, *, ridge: float = 1e-3, target: str = "mass"
) -> LinearGate:
    """Ridge regression from the layer input ``x`` [T, D] to the group masses [T, N]
    (``target="mass"``) or to log(mass + LOG_FLOOR x its mean) (``"log"``).

    Closed form in float64 on centred data (the bias is not penalised). ``ridge`` is
    relative to the mean input variance, so it means the same at any activation scale.
    Only the order of a token's scores matters to selection. The log target weighs a
    group's error by its relative size, so the few tokens with very large masses do not
    dominate the fit. On the default model at K=12 of 16, without compensation: fitted on
    all 8192 calibration tokens it lowered the perplexity ratio on all four held-out
    domains (licenses x1.75 -> x1.63); as the refactoring fits it, on the 4096 rows the
    collector keeps, the change was within noise (licenses x1.76, dialogue x1.46 from x1.48).
    """
    # T=tokens, D=hidden, N=groups
    _check_groups(acts, groups, num_groups)
    if x.dim() != 2 or x.shape[0] != acts.shape[0]:
        raise ConfigError(
            f"layer inputs have shape {tuple(x.shape)} for {acts.shape[0]} activation rows; "
            "pass the inputs of the same calibration tokens, [T, D]"
        )
    if ridge < 0:
        raise ConfigError(f"ridge={ridge} is negative; pass a small non-negative value such as 1e-3")
    if target not in GATE_TARGETS:
        raise ConfigError(f"invalid gate target {target!r}: use one of {', '.join(GATE_TARGETS)}")
    inputs = x.detach().to(torch.float64)  # [T, D]
    mass = group_mass(acts.detach().to(torch.float64).abs(), groups, num_groups)  # [T, N]
    if target == "log":
        mass = (mass + LOG_FLOOR * float(mass.mean()) + 1e-30).log()
    x_mean, m_mean = inputs.mean(dim=0), mass.mean(dim=0)  # [D], [N]
    xc, mc = inputs - x_mean, mass - m_mean  # [T, D], [T, N]
    gram = xc.t() @ xc  # [D, D]
    hidden = gram.shape[0]
    # The floor keeps the system solvable when x is constant or has fewer rows than D.
    penalty = ridge * float(gram.diagonal().mean()) + 1e-12
    system = gram + penalty * torch.eye(hidden, dtype=torch.float64)  # [D, D]
    weight = torch.linalg.solve(system, xc.t() @ mc)  # [D, N]
    bias = m_mean - x_mean @ weight  # [N]
    return LinearGate(weight=weight.to(torch.float32), bias=bias.to(torch.float32))


def gate_scores(gate: ProxyGate | LinearGate, x: Tensor) -> Tensor:
    """Predicted mass of each group for each token: x [T, D] -> [T, N]; higher = heavier."""
    # T=tokens, D=hidden, N=groups, r=gate neurons per group
    if isinstance(gate, ProxyGate):
        num_groups, r, _, hidden = gate.rows.shape
        proj = x.to(gate.rows.dtype) @ gate.rows.reshape(-1, hidden).t()  # [T, N*r*2]
        return _proxy_from_projections(proj.view(x.shape[0], num_groups, r, 2))  # [T, N]
    if isinstance(gate, LinearGate):
        return x.to(gate.weight.dtype) @ gate.weight + gate.bias  # [T, N]
    raise TypeError(f"unknown gate type {type(gate).__name__}; expected ProxyGate or LinearGate")


def proxy_scores_batched(rows: Tensor, x: Tensor, experts: Tensor) -> Tensor:
    """Proxy gate scores of each token's routed experts: [T, k, N].

    ``rows`` [E, N, r, 2, D] stacks every expert's ProxyGate rows, ``experts`` [T, k]
    the routed expert ids. Equal to ``gate_scores`` per expert, without a Python loop.
    """
    # T=tokens, k=routed experts per token, E=experts, N=groups, r=gate neurons, D=hidden
    n_experts, num_groups, r, _, hidden = rows.shape
    x = x.to(rows.dtype)
    if _gather_weights(x.shape[0], experts.shape[1], n_experts):
        picked = rows[experts]  # [T, k, N, r, 2, D]
        proj = torch.einsum("td,tknrcd->tknrc", x, picked)  # [T, k, N, r, 2]
    else:
        every = x @ rows.reshape(-1, hidden).t()  # [T, E*N*r*2]
        every = every.view(x.shape[0], n_experts, num_groups, r, 2)  # [T, E, N, r, 2]
        proj = every.gather(1, _expand_index(experts, every.shape))  # [T, k, N, r, 2]
    return _proxy_from_projections(proj)  # [T, k, N]


def linear_scores_batched(weight: Tensor, bias: Tensor, x: Tensor, experts: Tensor) -> Tensor:
    """Linear gate scores of each token's routed experts: [T, k, N].

    ``weight`` [E, D, N] and ``bias`` [E, N] stack every expert's LinearGate,
    ``experts`` [T, k] the routed expert ids. Equal to ``gate_scores`` per expert.
    """
    # T=tokens, k=routed experts per token, E=experts, N=groups, D=hidden
    n_experts, hidden, num_groups = weight.shape
    x = x.to(weight.dtype)
    if n_experts == 1:  # a dense model's FFN: one fused op (decode runs it every layer)
        return torch.addmm(bias, x, weight[0])[:, None, :].expand(x.shape[0], experts.shape[1], num_groups)
    if _gather_weights(x.shape[0], experts.shape[1], n_experts):
        scores = torch.einsum("td,tkdn->tkn", x, weight[experts])  # [T, k, N]
    else:
        every = x @ weight.permute(1, 0, 2).reshape(hidden, -1)  # [T, E*N]
        every = every.view(x.shape[0], n_experts, num_groups)  # [T, E, N]
        scores = every.gather(1, _expand_index(experts, every.shape))  # [T, k, N]
    return scores + bias[experts]  # [T, k, N]


def compensation(acts: Tensor, w_down_t: Tensor, groups: Tensor, num_groups: int, scores: Tensor,
                 keep: int) -> Tensor:
    """Each group's mean output [N, D] over the tokens whose ``keep`` best-scored groups
    leave it out (zero for a group never left out).

    ``acts`` [T, I] are the expert's activations on calibration tokens, ``w_down_t`` [I, D]
    its W_down^T, ``groups`` [I] the group of each neuron, ``scores`` [T, N] the default
    gate's. A group's output on a token is acts[:, group] @ w_down_t[group]; the mean over
    the tokens that drop it is the constant that best stands in for it there (least squares).
    """
    _check_groups(acts, groups, num_groups)
    if scores.shape != (acts.shape[0], num_groups) or not 1 <= keep <= num_groups:
        raise ConfigError(f"gate scores {tuple(scores.shape)} or keep={keep} do not fit {acts.shape[0]} "
                          f"tokens of {num_groups} groups; pass [tokens, groups] scores and keep in 1..{num_groups}")
    dropped = torch.ones_like(scores, dtype=acts.dtype)  # [T, N]
    dropped.scatter_(1, scores.topk(keep, dim=1).indices, 0.0)
    counts = dropped.sum(dim=0)  # [N]
    out = torch.zeros(num_groups, w_down_t.shape[1], dtype=torch.float64)  # [N, D]
    for g in range(num_groups):
        if counts[g] == 0:
            continue
        members = (groups == g).nonzero().squeeze(1)  # [S]
        # sum over dropping tokens of act @ W_down^T, as (dropped^T act) @ W_down^T: one [S] x [S, D]
        weighted = dropped[:, g].double() @ acts[:, members].double()  # [S]
        out[g] = weighted @ w_down_t[members].double() / counts[g].double()
    return out.to(torch.float32)


def gate_quality(scores: Tensor, true_mass: Tensor, keep: int) -> float:
    """Mass the gate's top-``keep`` groups capture, relative to the best possible top-``keep``.

    Both [T, N]; summed over tokens. 1.0 means the gate picks as well as an oracle that
    knows the true masses; a gate picking at random scores about keep/N or more.
    """
    if scores.shape != true_mass.shape or scores.dim() != 2:
        raise ConfigError(
            f"gate scores {tuple(scores.shape)} and true masses {tuple(true_mass.shape)} differ; "
            "pass both as [tokens, groups]"
        )
    if not 1 <= keep <= scores.shape[1]:
        raise ConfigError(f"keep={keep} is outside 1..{scores.shape[1]}; pass the groups kept per token")
    mass = true_mass.to(torch.float64)  # [T, N]
    picked = mass.gather(1, scores.topk(keep, dim=1).indices).sum()
    best = mass.topk(keep, dim=1).values.sum()
    return 1.0 if float(best) <= 0.0 else float(picked / best)


# --------------------------------------------------------------------------- helpers


def _check_groups(acts: Tensor, groups: Tensor, num_groups: int) -> None:
    if acts.dim() != 2 or groups.shape != (acts.shape[1],):
        raise ConfigError(
            f"activations {tuple(acts.shape)} and groups {tuple(groups.shape)} do not match; "
            "pass acts as [tokens, neurons] and one group id per neuron"
        )
    counts = torch.bincount(groups.to(torch.int64), minlength=num_groups)  # [N]
    if counts.numel() != num_groups or bool((counts != acts.shape[1] // num_groups).any()):
        raise ConfigError(
            f"groups are not {num_groups} equal groups of {acts.shape[1]} neurons "
            f"(sizes {counts.tolist()}); pass the output of refactor.partition.partition"
        )


def _forward_select(cand: Tensor, mass: Tensor, count: int) -> Tensor:
    """Per group, ``count`` candidate columns whose scaled sum best fits the group mass.

    ``cand`` [N, S, T] holds each group's neurons' |act|, ``mass`` [N, T] its mass.
    Returns within-group indices [N, count]; all groups are selected at once.
    """
    num_groups, size, tokens = cand.shape
    # <p + c, m> and |p + c|^2 expand into terms computed once plus one <p, c> per step,
    # so no [N, S, T] trial sum is ever materialised.
    cand_mass = torch.bmm(cand, mass.unsqueeze(2)).squeeze(2)  # [N, S]
    cand_energy = (cand * cand).sum(dim=2)  # [N, S]
    current = torch.zeros(num_groups, tokens, dtype=cand.dtype)  # [N, T]
    taken = torch.zeros(num_groups, size, dtype=torch.bool)  # [N, S]
    picks = []
    for _ in range(count):
        cross = (current * mass).sum(dim=1, keepdim=True) + cand_mass  # [N, S]
        overlap = torch.bmm(cand, current.unsqueeze(2)).squeeze(2)  # [N, S]
        energy = (current * current).sum(dim=1, keepdim=True) + cand_energy + 2 * overlap  # [N, S]
        # Residual of the best scaled fit is |m|^2 - <m,p>^2/<p,p>: maximise the explained part.
        explained = torch.where(energy > 0, cross * cross / energy.clamp_min(1e-30), 0.0)  # [N, S]
        best = explained.masked_fill(taken, float("-inf")).argmax(dim=1)  # [N]
        picks.append(best)
        taken[torch.arange(num_groups), best] = True
        current = current + cand[torch.arange(num_groups), best]  # [N, T]
    return torch.stack(picks, dim=1)  # [N, count]


def _proxy_from_projections(proj: Tensor) -> Tensor:
    """Sum over the r gate neurons of |silu(x.g) * (x.u)|: [..., r, 2] -> [...]."""
    return (F.silu(proj[..., 0]) * proj[..., 1]).abs().sum(dim=-1)


def _gather_weights(tokens: int, routed: int, n_experts: int) -> bool:
    """Gather each token's experts' weights, or project onto every expert and pick?

    Gathering copies T*k weight blocks; projecting onto all reads E blocks once but
    computes T*E. At decode (T*k well below E) gathering moves less memory; for
    prefill the one large matmul wins.
    """
    return 2 * tokens * routed < n_experts


def _expand_index(experts: Tensor, shape: torch.Size) -> Tensor:
    """Expert ids [T, k] broadcast to gather along dim 1 of a [T, E, ...] tensor."""
    index = experts.to(torch.int64).view(*experts.shape, *([1] * (len(shape) - 2)))
    return index.expand(experts.shape[0], experts.shape[1], *shape[2:])
