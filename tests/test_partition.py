"""Neuron partitioning into sub-experts: objective, solvers, incremental annealing costs."""

from __future__ import annotations

import itertools

import pytest
import torch

from edge_prism.errors import ConfigError
from edge_prism.refactor import partition as part
from edge_prism.refactor.partition import (
    SOLVERS,
    group_mass,
    group_size_ok,
    partition,
    partition_objective,
    permutation_from_groups,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: a second intra-op thread only adds sync cost, and on a busy 2-core
    runner the spinning OpenMP workers can slow a partition down tenfold."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def planted_acts(
    *, tokens: int = 600, cluster_sizes: list[int], active: int = 3, noise: float = 0.05, seed: int = 1234
) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic activations [T, I] with hidden neuron clusters that fire together.

    Each token switches on ``active`` random clusters; a cluster's neurons then carry
    heavy-tailed signed activations, everyone carries a little noise. Returns the
    activations and each neuron's (shuffled) cluster id.
    """
    gen = torch.Generator().manual_seed(seed)
    width, n_clusters = sum(cluster_sizes), len(cluster_sizes)
    cluster = torch.repeat_interleave(torch.arange(n_clusters), torch.tensor(cluster_sizes))
    cluster = cluster[torch.randperm(width, generator=gen)]  # [I]
    pick = torch.rand(tokens, n_clusters, generator=gen).argsort(dim=1)[:, :active]  # [T, active]
    on = torch.zeros(tokens, n_clusters).scatter_(1, pick, torch.rand(tokens, active, generator=gen) + 0.5)
    scale = torch.rand(width, generator=gen) + 0.2  # [I]
    signal = on[:, cluster] * scale * (0.5 + torch.randn(tokens, width, generator=gen).abs())  # [T, I]
    return signal + noise * torch.randn(tokens, width, generator=gen), cluster


@pytest.fixture(scope="module")
def even_clusters() -> torch.Tensor:
    """I=256 in 16 clusters of 16: a perfect partition exists."""
    return planted_acts(cluster_sizes=[16] * 16)[0]


@pytest.fixture(scope="module")
def uneven_clusters() -> torch.Tensor:
    """I=256 in 22 clusters of 4..22 neurons: no group can hold exactly one cluster."""
    sizes = [4, 6, 8, 10, 12, 14, 16, 18, 20] * 2 + [4, 6, 8, 22]
    return planted_acts(cluster_sizes=sizes, active=4, noise=0.1, seed=99)[0]


def objective(acts: torch.Tensor, groups: torch.Tensor, num_groups: int = 16, keep: int = 12) -> float:
    return partition_objective(acts.abs(), groups, num_groups, keep=keep)


def assert_balanced(groups: torch.Tensor, width: int, num_groups: int) -> None:
    assert groups.shape == (width,) and groups.dtype == torch.int64
    assert torch.bincount(groups, minlength=num_groups).tolist() == [width // num_groups] * num_groups


# --------------------------------------------------------------------------- sizes and errors


@pytest.mark.parametrize(
    "width, num_groups, ok",
    [(1536, 16, True), (1536, 12, True), (256, 16, True), (100, 16, False), (16, 32, False), (8, 0, False)],
)
def test_group_size_ok(width: int, num_groups: int, ok: bool) -> None:
    assert group_size_ok(width, num_groups) is ok


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(num_groups=7, keep=3), "7 sub-experts do not split 64 neurons"),
        (dict(num_groups=8, keep=6, solver="kmeans"), "unknown partition solver 'kmeans'"),
        (dict(num_groups=8, keep=0), "keep=0"),
        (dict(num_groups=8, keep=9), "keep=9"),
        (dict(num_groups=8, keep=6, steps=-1), "steps=-1"),
    ],
)
def test_bad_arguments_raise_config_error(kwargs: dict, fragment: str) -> None:
    acts = torch.randn(10, 64)
    num_groups = kwargs.pop("num_groups")
    with pytest.raises(ConfigError, match=fragment):
        partition(acts, num_groups, **kwargs)


def test_divisor_suggestion_and_bad_activations() -> None:
    with pytest.raises(ConfigError, match=r"choose a divisor of 1536 \(e.g. 16\)"):
        partition(torch.randn(4, 1536), 15, keep=12)
    with pytest.raises(ConfigError, match="NaN"):
        partition(torch.full((4, 64), float("nan")), 8, keep=6)
    with pytest.raises(ConfigError, match=r"shape \(64,\)"):
        partition(torch.randn(64), 8, keep=6)


# --------------------------------------------------------------------------- objective


def brute_force_objective(acts_abs: torch.Tensor, groups: torch.Tensor, num_groups: int, keep: int) -> float:
    total = 0.0
    for row in acts_abs.tolist():
        masses = [0.0] * num_groups
        for value, g in zip(row, groups.tolist()):
            masses[g] += value
        total += sum(sorted(masses)[: num_groups - keep])
    return total


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_objective_matches_brute_force(keep: int) -> None:
    gen = torch.Generator().manual_seed(0)
    acts_abs = torch.rand(7, 6, generator=gen)
    for groups in (torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([2, 1, 0, 1, 0, 2])):
        expected = brute_force_objective(acts_abs, groups, 3, keep)
        assert partition_objective(acts_abs, groups, 3, keep=keep) == pytest.approx(expected, rel=1e-12)
    # keep == N computes everything: nothing is left out.
    assert partition_objective(acts_abs, groups, 3, keep=3) == 0.0


def test_group_mass_sums_each_groups_columns() -> None:
    acts_abs = torch.arange(12.0).view(2, 6)
    groups = torch.tensor([1, 0, 1, 2, 0, 2])
    expected = torch.tensor([[1.0 + 4.0, 0.0 + 2.0, 3.0 + 5.0], [7.0 + 10.0, 6.0 + 8.0, 9.0 + 11.0]])
    torch.testing.assert_close(group_mass(acts_abs, groups, 3), expected)


# --------------------------------------------------------------------------- solvers


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize(
    "width, num_groups, keep", [(256, 16, 12), (96, 4, 3), (64, 2, 1), (32, 32, 24), (48, 1, 1)]
)
def test_every_group_has_exactly_width_over_n(solver: str, width: int, num_groups: int, keep: int) -> None:
    acts = planted_acts(tokens=200, cluster_sizes=[width // 4] * 4, seed=5)[0]
    groups = partition(acts, num_groups, keep=keep, solver=solver, seed=3)
    assert_balanced(groups, width, num_groups)


def test_contiguous_and_random_layouts() -> None:
    acts = torch.randn(8, 64)
    assert partition(acts, 4, keep=3, solver="contiguous").tolist() == [g for g in range(4) for _ in range(16)]
    first = partition(acts, 4, keep=3, solver="random", seed=1)
    assert torch.equal(first, partition(acts, 4, keep=3, solver="random", seed=1))
    assert not torch.equal(first, partition(acts, 4, keep=3, solver="random", seed=2))


@pytest.mark.parametrize("solver", ["greedy", "anneal"])
def test_same_seed_gives_identical_groups(solver: str, uneven_clusters: torch.Tensor) -> None:
    first = partition(uneven_clusters, 16, keep=12, solver=solver, seed=7)
    assert torch.equal(first, partition(uneven_clusters, 16, keep=12, solver=solver, seed=7))
    other = partition(uneven_clusters, 16, keep=12, solver=solver, seed=8)
    assert_balanced(other, 256, 16)  # another seed may or may not land elsewhere; it is valid


@pytest.mark.parametrize("data", ["even_clusters", "uneven_clusters"])
def test_greedy_and_anneal_beat_contiguous_and_random(data: str, request: pytest.FixtureRequest) -> None:
    acts = request.getfixturevalue(data)
    scores = {s: objective(acts, partition(acts, 16, keep=12, solver=s, seed=0)) for s in SOLVERS}
    baseline = min(scores["contiguous"], scores["random"])
    assert scores["greedy"] < 0.6 * baseline, scores
    assert scores["anneal"] <= scores["greedy"], scores


def test_greedy_recovers_planted_clusters(even_clusters: torch.Tensor) -> None:
    _, cluster = planted_acts(cluster_sizes=[16] * 16)
    groups = partition(even_clusters, 16, keep=12, solver="greedy", seed=0)
    # Every group is one planted cluster: the co-activation structure is found exactly.
    assert all(cluster[groups == g].unique().numel() == 1 for g in range(16))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("steps", [0, 64, 2000])
def test_anneal_is_never_worse_than_its_greedy_start(seed: int, steps: int, uneven_clusters: torch.Tensor) -> None:
    greedy = partition(uneven_clusters, 16, keep=12, solver="greedy", seed=seed)
    annealed = partition(uneven_clusters, 16, keep=12, solver="anneal", seed=seed, steps=steps)
    assert objective(uneven_clusters, annealed) <= objective(uneven_clusters, greedy)
    if steps == 0:
        assert torch.equal(annealed, greedy)


def test_anneal_improves_on_a_start_it_can_improve(uneven_clusters: torch.Tensor) -> None:
    acts_abs = uneven_clusters.abs()
    start = partition(uneven_clusters, 16, keep=12, solver="random", seed=0)
    annealed = part._anneal(acts_abs, start, 16, keep=12, steps=4000, gen=torch.Generator().manual_seed(0))
    assert_balanced(annealed, 256, 16)
    assert objective(uneven_clusters, annealed) < 0.8 * objective(uneven_clusters, start)


def test_anneal_on_a_token_subset_still_returns_a_valid_improvement(
    uneven_clusters: torch.Tensor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(part, "_MAX_ANNEAL_TOKENS", 100)  # calibration rows beyond this are sampled
    greedy = partition(uneven_clusters, 16, keep=12, solver="greedy", seed=0)
    annealed = partition(uneven_clusters, 16, keep=12, solver="anneal", seed=0)
    assert_balanced(annealed, 256, 16)
    assert objective(uneven_clusters, annealed) <= objective(uneven_clusters, greedy)


# --------------------------------------------------------------------------- incremental costs


@pytest.mark.parametrize("num_groups, keep", [(16, 12), (16, 1), (16, 15), (8, 6), (4, 2), (3, 1), (2, 1), (4, 4)])
def test_swap_deltas_equal_full_recompute(num_groups: int, keep: int) -> None:
    gen = torch.Generator().manual_seed(num_groups * 10 + keep)
    width = 8 * num_groups
    acts_abs = torch.rand(50, width, generator=gen) ** 3
    acts_abs[:, :3] = 0.0  # dead neurons make tied group masses
    acts_abs[:10] = 0.0  # and silent tokens tie every group
    groups = (torch.arange(width) // 8)[torch.randperm(width, generator=gen)]
    state = part._AnnealState.build(acts_abs, groups, num_groups, keep)
    pairs = [(a, b) for a, b in itertools.combinations(range(width), 2) if groups[a] != groups[b]]
    a, b = (torch.tensor(x) for x in zip(*pairs[:: max(1, len(pairs) // 150)]))
    base = partition_objective(acts_abs, groups, num_groups, keep=keep)
    expected = []
    for i, j in zip(a.tolist(), b.tolist()):
        swapped = groups.clone()
        swapped[i], swapped[j] = groups[j], groups[i]
        expected.append(partition_objective(acts_abs, swapped, num_groups, keep=keep) - base)
    torch.testing.assert_close(state.swap_deltas(a, b).double(), torch.tensor(expected, dtype=torch.float64),
                               rtol=0, atol=1e-4)


def test_tangent_bound_is_an_upper_bound_on_every_swap() -> None:
    """The guided candidates rest on this: the cost is concave in the group masses."""
    gen = torch.Generator().manual_seed(0)
    acts_abs = torch.rand(80, 32, generator=gen) ** 2
    groups = (torch.arange(32) // 8)[torch.randperm(32, generator=gen)]
    state = part._AnnealState.build(acts_abs, groups, 4, 2)
    bound = state.grad - state.grad.gather(1, groups.unsqueeze(1))  # [I, N]
    a, b = (t.flatten() for t in torch.meshgrid(torch.arange(32), torch.arange(32), indexing="ij"))
    cross = groups[a] != groups[b]
    a, b = a[cross], b[cross]
    tangent = bound[a, groups[b]] + bound[b, groups[a]]
    assert bool((state.swap_deltas(a, b) <= tangent + 1e-4).all())
    guided_a, guided_b = state.guided_swaps(6)
    assert bool((groups[guided_a] != groups[guided_b]).all())


def test_incremental_state_matches_a_rebuild_after_swaps() -> None:
    gen = torch.Generator().manual_seed(1)
    acts_abs = torch.rand(120, 64, generator=gen) ** 3
    groups = (torch.arange(64) // 8)[torch.randperm(64, generator=gen)]
    state = part._AnnealState.build(acts_abs, groups, 8, 6)
    total = float(state.cost.sum())
    for _ in range(40):
        a, b = torch.randint(64, (2,), generator=gen).tolist()
        if state.groups[a] == state.groups[b]:
            continue
        total += float(state.swap_deltas(torch.tensor([a]), torch.tensor([b])))
        state.apply_swap(a, b)
    fresh = part._AnnealState.build(acts_abs, state.groups, 8, 6)
    torch.testing.assert_close(state.mass, fresh.mass, rtol=0, atol=1e-4)
    torch.testing.assert_close(state.grad, fresh.grad, rtol=0, atol=1e-3)
    assert torch.equal(state.dropped_mask, fresh.dropped_mask)
    assert total == pytest.approx(partition_objective(acts_abs, state.groups, 8, keep=6), rel=1e-5)


# --------------------------------------------------------------------------- permutation


def test_permutation_makes_groups_contiguous_and_keeps_order_within() -> None:
    groups = torch.tensor([2, 0, 1, 2, 0, 1, 0, 2, 1])
    perm = permutation_from_groups(groups)
    assert sorted(perm.tolist()) == list(range(9))
    assert groups[perm].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert perm.tolist() == [1, 4, 6, 2, 5, 8, 0, 3, 7]

    hottest_first = permutation_from_groups(groups, torch.tensor([2, 0, 1]))
    assert groups[hottest_first].tolist() == [2, 2, 2, 0, 0, 0, 1, 1, 1]
    assert hottest_first.tolist() == [0, 3, 7, 1, 4, 6, 2, 5, 8]


@pytest.mark.parametrize("order", [[0, 0, 1], [0, 1], [0, 1, 3]])
def test_permutation_rejects_an_order_that_is_not_a_permutation(order: list[int]) -> None:
    with pytest.raises(ConfigError, match="not a permutation"):
        permutation_from_groups(torch.tensor([0, 1, 2, 2, 1, 0]), torch.tensor(order))


def test_permuted_expert_equals_sum_of_groups() -> None:
    """What the permutation is for: block b of the permuted weights is group order[b]."""
    gen = torch.Generator().manual_seed(0)
    w_gate, w_up = torch.randn(32, 8, generator=gen), torch.randn(32, 8, generator=gen)
    w_down = torch.randn(8, 32, generator=gen)
    x = torch.randn(5, 8, generator=gen)
    groups = (torch.arange(32) // 8)[torch.randperm(32, generator=gen)]
    perm = permutation_from_groups(groups)

    def ffn(g: torch.Tensor, u: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        return (torch.nn.functional.silu(x @ g.t()) * (x @ u.t())) @ d.t()

    blocks = [slice(8 * b, 8 * b + 8) for b in range(4)]
    summed = sum(ffn(w_gate[perm][s], w_up[perm][s], w_down[:, perm][:, s]) for s in blocks)
    torch.testing.assert_close(summed, ffn(w_gate, w_up, w_down), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- realistic size


def test_realistic_expert_size_partitions_well() -> None:
    """I=1536, N=16, T=2000: the size of one expert of the target models."""
    acts, _ = planted_acts(tokens=2000, cluster_sizes=[32] * 48, active=5, noise=0.1, seed=3)
    greedy = partition(acts, 16, keep=12, solver="greedy")
    annealed = partition(acts, 16, keep=12)
    assert_balanced(annealed, 1536, 16)
    assert objective(acts, annealed) <= objective(acts, greedy)
    assert objective(acts, greedy) < 0.6 * objective(acts, partition(acts, 16, keep=12, solver="contiguous"))


def test_default_sub_experts_rule():
    """24 parts of whole 32-neuron groups where a dense width allows it, else 16; routed 8."""
    from edge_prism.refactor.partition import DEFAULT_SUB_EXPERTS_RULE, default_sub_experts
    from edge_prism.refactor.refactor import RefactorConfig, config_record

    assert default_sub_experts(1536, routed=False) == 24  # the default model: parts of 64 neurons
    assert default_sub_experts(6144, routed=False) == 24
    assert default_sub_experts(8192, routed=False) == 16  # 8192 / 24 is not a whole number
    assert default_sub_experts(128, routed=False) == 16
    assert default_sub_experts(1536, routed=True) == 8
    # The rule is part of the record a cached prism is checked against, so a change rebuilds it.
    assert config_record(RefactorConfig())["default_sub_experts"] == DEFAULT_SUB_EXPERTS_RULE
