"""Sub-expert gates: fitting, per-expert and batched scoring, quality against an oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edge_prism.errors import ConfigError
from edge_prism.refactor import gates
from edge_prism.refactor.gates import (
    LinearGate,
    ProxyGate,
    fit_linear_gate,
    fit_proxy_gate,
    gate_quality,
    gate_scores,
    linear_scores_batched,
    proxy_scores_batched,
)
from edge_prism.refactor.partition import group_mass, partition


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: extra intra-op threads only add sync cost on a busy 2-core runner."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def swiglu_expert(*, tokens: int = 800, hidden: int = 32, width: int = 128, topics: int = 16, seed: int = 0):
    """A synthetic SwiGLU expert whose neurons follow latent topics of the input.

    Each token mixes a few of ``topics`` directions; each neuron's gate row points along
    one topic, so neurons of a topic fire together. Returns x [T, D], w_gate, w_up
    [I, D] and the activations silu(x w_gate^T) * (x w_up^T) [T, I].
    """
    gen = torch.Generator().manual_seed(seed)
    directions = torch.randn(topics, hidden, generator=gen)  # [K, D]
    pick = torch.rand(tokens, topics, generator=gen).argsort(dim=1)[:, :3]  # [T, 3]
    coef = torch.zeros(tokens, topics).scatter_(1, pick, 1.0 + torch.rand(tokens, 3, generator=gen))
    x = coef @ directions / hidden**0.5 + 0.1 * torch.randn(tokens, hidden, generator=gen)  # [T, D]
    owner = torch.randint(topics, (width,), generator=gen)  # [I]
    w_gate = directions[owner] + 0.3 * torch.randn(width, hidden, generator=gen)  # [I, D]
    w_up = torch.randn(width, hidden, generator=gen) / hidden**0.5  # [I, D]
    acts = F.silu(x @ w_gate.t()) * (x @ w_up.t())  # [T, I]
    return x, w_gate, w_up, acts


@pytest.fixture(scope="module")
def expert():
    x, w_gate, w_up, acts = swiglu_expert()
    groups = partition(acts, 8, keep=6, solver="greedy", seed=0)
    return x, w_gate, w_up, acts, groups


# --------------------------------------------------------------------------- proxy gate


def test_proxy_gate_rows_are_each_groups_own_neurons(expert) -> None:
    x, w_gate, w_up, acts, groups = expert
    gate = fit_proxy_gate(acts, w_gate, w_up, groups, 8, neurons_per_group=3)
    assert isinstance(gate, ProxyGate) and gate.rows.shape == (8, 3, 2, 32)
    for g in range(8):
        for j in range(3):
            match = (w_gate == gate.rows[g, j, 0]).all(dim=1).nonzero().flatten()  # [1]
            assert match.numel() == 1 and int(groups[match]) == g
            # The up row is the neuron's own, scaled by a non-negative group factor.
            ratio = gate.rows[g, j, 1] / w_up[match[0]]
            torch.testing.assert_close(ratio, ratio[:1].expand_as(ratio))
            assert float(ratio[0]) >= 0.0
    assert len({tuple(r.tolist()) for r in gate.rows[:, :, 0].reshape(-1, 32)}) == 24  # no repeats


def test_proxy_scale_is_the_least_squares_fit_to_group_mass(expert) -> None:
    x, w_gate, w_up, acts, groups = expert
    gate = fit_proxy_gate(acts, w_gate, w_up, groups, 8)
    scores = gate_scores(gate, x).double()  # [T, N]
    mass = group_mass(acts.abs().double(), groups, 8)  # [T, N]
    # A least-squares scale leaves the residual orthogonal to the proxy.
    torch.testing.assert_close((scores * mass).sum(0), (scores * scores).sum(0), rtol=1e-4, atol=0)


def test_forward_selection_finds_the_neuron_that_tracks_its_group() -> None:
    gen = torch.Generator().manual_seed(0)
    noise = torch.rand(300, 16, generator=gen)  # [T, I]
    groups = torch.arange(16) // 4
    acts = noise.clone()
    tracker = torch.tensor([2, 5, 11, 12])  # one per group
    base = group_mass(noise, groups, 4)  # [T, N]
    acts[:, tracker] = base * 2.0  # each group's mass is now ~a multiple of its tracker
    w = torch.randn(16, 4, generator=gen)  # any distinct rows will do
    gate = fit_proxy_gate(acts, w, w, groups, 4, neurons_per_group=1)
    picked = [int((w == gate.rows[g, 0, 0]).all(dim=1).nonzero()[0]) for g in range(4)]
    assert picked == tracker.tolist()


def test_proxy_gate_picks_heavy_groups_far_better_than_chance(expert) -> None:
    x, w_gate, w_up, acts, groups = expert
    mass = group_mass(acts.abs(), groups, 8)  # [T, N]
    proxy = gate_quality(gate_scores(fit_proxy_gate(acts, w_gate, w_up, groups, 8), x), mass, 3)
    chance = gate_quality(torch.rand(mass.shape, generator=torch.Generator().manual_seed(0)), mass, 3)
    assert proxy > 0.9 and proxy > chance + 0.15, (proxy, chance)


# --------------------------------------------------------------------------- linear gate


def test_linear_gate_recovers_a_planted_linear_relation() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(500, 12, generator=gen)  # [T, D]
    weight, bias = torch.randn(12, 4, generator=gen), 20.0 + torch.rand(4, generator=gen)
    mass = x @ weight + bias  # [T, N], positive: bias dominates
    assert bool((mass > 0).all())
    groups = torch.arange(20) // 5
    signs = torch.where(torch.rand(500, 20, generator=gen) < 0.5, -1.0, 1.0)
    acts = signs * (mass / 5).repeat_interleave(5, dim=1)  # each neuron a fifth of its group, any sign
    gate = fit_linear_gate(x, acts, groups, 4, ridge=1e-9)
    assert isinstance(gate, LinearGate) and gate.weight.shape == (12, 4) and gate.bias.shape == (4,)
    torch.testing.assert_close(gate.weight, weight, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gate.bias, bias, rtol=1e-4, atol=1e-4)
    assert gate_quality(gate_scores(gate, x), mass, 2) == pytest.approx(1.0)


def test_linear_gate_ridge_shrinks_and_survives_degenerate_inputs() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(100, 8, generator=gen)
    acts = torch.randn(100, 16, generator=gen)
    groups = torch.arange(16) // 4
    loose = fit_linear_gate(x, acts, groups, 4, ridge=1e-6)
    tight = fit_linear_gate(x, acts, groups, 4, ridge=100.0)
    assert float(tight.weight.norm()) < 0.1 * float(loose.weight.norm())
    constant = fit_linear_gate(torch.ones(3, 8), acts[:3], groups, 4)  # fewer rows than D, zero variance
    mass = group_mass(acts[:3].abs(), groups, 4)
    torch.testing.assert_close(constant.bias, mass.mean(0), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- batched scoring


def stacked_gates(n_experts: int, *, hidden: int = 32, num_groups: int = 8):
    proxies, linears = [], []
    for e in range(n_experts):
        x, w_gate, w_up, acts = swiglu_expert(tokens=200, hidden=hidden, width=64, seed=10 + e)
        groups = partition(acts, num_groups, keep=6, solver="greedy", seed=e)
        proxies.append(fit_proxy_gate(acts, w_gate, w_up, groups, num_groups, neurons_per_group=2))
        linears.append(fit_linear_gate(x, acts, groups, num_groups))
    return proxies, linears


@pytest.fixture(scope="module")
def six_experts():
    return stacked_gates(6)


@pytest.mark.parametrize("tokens, routed", [(1, 2), (2, 1), (5, 2), (40, 3)])
def test_batched_scores_equal_per_expert_scores(tokens: int, routed: int, six_experts) -> None:
    proxies, linears = six_experts
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 32, generator=gen) * 0.5  # [T, D]
    experts = torch.stack([torch.randperm(6, generator=gen)[:routed] for _ in range(tokens)])  # [T, k]
    rows = torch.stack([p.rows for p in proxies])  # [E, N, r, 2, D]
    weight = torch.stack([lg.weight for lg in linears])  # [E, D, N]
    bias = torch.stack([lg.bias for lg in linears])  # [E, N]

    proxy_batched = proxy_scores_batched(rows, x, experts)  # [T, k, N]
    linear_batched = linear_scores_batched(weight, bias, x, experts)  # [T, k, N]
    assert proxy_batched.shape == linear_batched.shape == (tokens, routed, 8)
    for t in range(tokens):
        for j, e in enumerate(experts[t].tolist()):
            torch.testing.assert_close(proxy_batched[t, j], gate_scores(proxies[e], x[t:t + 1])[0])
            torch.testing.assert_close(linear_batched[t, j], gate_scores(linears[e], x[t:t + 1])[0])


def test_both_batched_paths_are_covered_and_agree(six_experts, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode-sized batches gather weights; prefill-sized ones project onto every expert."""
    assert gates._gather_weights(1, 2, 6) and not gates._gather_weights(40, 3, 6)
    proxies, linears = six_experts
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    experts = torch.tensor([[0, 5], [2, 2], [4, 1]])
    rows = torch.stack([p.rows for p in proxies])
    weight, bias = torch.stack([lg.weight for lg in linears]), torch.stack([lg.bias for lg in linears])
    results = {}
    for gather in (True, False):
        monkeypatch.setattr(gates, "_gather_weights", lambda *_, g=gather: g)  # force one path
        results[gather] = (proxy_scores_batched(rows, x, experts), linear_scores_batched(weight, bias, x, experts))
    for a, b in zip(results[True], results[False]):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- quality and errors


def test_gate_quality_of_the_oracle_is_one_and_of_a_bad_gate_is_lower() -> None:
    mass = torch.rand(50, 8, generator=torch.Generator().manual_seed(0))
    assert gate_quality(mass, mass, 3) == pytest.approx(1.0)
    assert gate_quality(mass * 7.0 + 1.0, mass, 3) == pytest.approx(1.0)  # only the ranking matters
    worst = gate_quality(-mass, mass, 3)
    assert worst < gate_quality(torch.rand(50, 8, generator=torch.Generator().manual_seed(1)), mass, 3) < 1.0
    assert gate_quality(mass, mass, 8) == pytest.approx(1.0)  # keeping everything is always perfect
    assert gate_quality(torch.rand(4, 3), torch.zeros(4, 3), 1) == 1.0  # nothing to capture


def test_gate_quality_hand_computed() -> None:
    mass = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 1.0]])
    scores = torch.tensor([[0.0, 9.0, 1.0], [0.0, 5.0, 1.0]])  # picks 2 then 1; oracle 2 then 0
    assert gate_quality(scores, mass, 2) == pytest.approx((5.0 + 1.0) / (5.0 + 5.0))


def test_bad_inputs_raise_config_error(expert) -> None:
    x, w_gate, w_up, acts, groups = expert
    with pytest.raises(ConfigError, match="neurons_per_group=17"):
        fit_proxy_gate(acts, w_gate, w_up, groups, 8, neurons_per_group=17)
    with pytest.raises(ConfigError, match="not 8 equal groups"):
        fit_proxy_gate(acts, w_gate, w_up, torch.zeros_like(groups), 8)
    with pytest.raises(ConfigError, match="gate/up weights"):
        fit_proxy_gate(acts, w_gate[:5], w_up, groups, 8)
    with pytest.raises(ConfigError, match="ridge=-1"):
        fit_linear_gate(x, acts, groups, 8, ridge=-1.0)
    with pytest.raises(ConfigError, match="layer inputs"):
        fit_linear_gate(x[:10], acts, groups, 8)
    with pytest.raises(ConfigError, match="keep=0"):
        gate_quality(torch.rand(2, 3), torch.rand(2, 3), 0)
    with pytest.raises(ConfigError, match="differ"):
        gate_quality(torch.rand(2, 3), torch.rand(2, 4), 1)
