"""The token planner (runtime.token_planner): each decode layer's operating point chosen to
fit a token-latency budget, where a missing sub-expert costs what a resident one does.

No timings are asserted: the costs are given and the clock is fake.
"""

from __future__ import annotations

import pytest
import torch

import edge_prism
from edge_prism.runtime import token_planner as tp
from edge_prism.runtime.planner import CostModel, LatencyPlanner, _measure_decode
from edge_prism.runtime.token_planner import TokenPlanner, layer_units
from edge_prism.select import SubExpertSelector

MS = 1e-3
PROMPT = list(range(70, 94))


def _cost(**kw) -> CostModel:
    base = dict(device="fake", h2d_bytes_per_s=1e9, copy_overhead_s=0.0, unit_s=0.1 * MS,
                layer_fixed_s=0.5 * MS, head_s=1 * MS, select_s=0.05 * MS)
    return CostModel(**{**base, **kw})


@pytest.fixture(scope="module")
def olmoe_engine(prism_of):
    return edge_prism.load(prism_of("olmoe"))


def _plan_time(planner: TokenPlanner, ks: list[int], layer: int = 0) -> float:
    """What the planner predicts layers ``layer``.. take at ``ks``, with the head."""
    u, sel = planner._u, planner._sel
    return sum(planner.layer_fixed_s + planner.unit_s * u[k][j] + planner.select_s * sel[k][j]
               for j, k in enumerate(ks) if j >= layer) + planner.head_s


def test_layer_units_follow_the_quotas_and_keep_dense_layers_whole(prism_of, tiny_checkpoint):
    olmoe = edge_prism.load(prism_of("olmoe")).model
    S, top_k = olmoe.parts[0], olmoe.spec.ffn[0].top_k
    assert layer_units(olmoe.spec, olmoe.parts, top_k * S) == [top_k * S] * olmoe.spec.num_layers
    assert layer_units(olmoe.spec, olmoe.parts, 3) == [3] * olmoe.spec.num_layers
    ds = edge_prism.load(prism_of("deepseek_v2")).model  # a dense first layer, routed ones after
    dense = [i for i, f in enumerate(ds.spec.ffn) if not f.routed]
    assert dense and all(layer_units(ds.spec, ds.parts, 1)[i] == ds.parts[i] for i in dense)


@pytest.mark.parametrize("budget_ms", [6.0, 9.0, 12.5, 20.0, 100.0])
def test_the_plan_is_the_largest_mix_of_two_adjacent_points_that_fits(olmoe_engine, budget_ms):
    model = olmoe_engine.model
    planner = TokenPlanner(model, _cost(), budget_s=budget_ms * MS)
    planner.slack_s = 0.0
    planner.start_token()
    planner._plan(0, 0.0)
    ks, full, L = list(planner._k), planner.full, planner.L
    lo, hi = min(ks), max(ks)
    assert hi - lo <= 1 and ks == sorted(ks, reverse=True)  # K+1 on the first layers, then K
    assert lo >= planner.floor()
    if lo == full:
        assert _plan_time(planner, ks) <= budget_ms * MS
        return
    if _plan_time(planner, [planner.floor()] * L) <= budget_ms * MS:
        assert _plan_time(planner, ks) <= budget_ms * MS + 1e-12
        more = [hi] * (ks.count(hi) + 1) + [lo] * (L - ks.count(hi) - 1) if lo < hi else [lo + 1] + [lo] * (L - 1)
        assert _plan_time(planner, more[:L]) > budget_ms * MS  # one more step would not fit
    else:
        assert ks == [planner.floor()] * L  # nothing fits: the floor, not below it


def test_a_generous_budget_is_exact_and_a_tight_one_runs_fixed_operating_points(olmoe_engine):
    model = olmoe_engine.model
    exact = olmoe_engine.generate_ids(PROMPT, max_new_tokens=6, temperature=0)
    model.set_planner(TokenPlanner(model, _cost(), budget_s=10.0))
    try:
        assert olmoe_engine.generate_ids(PROMPT, max_new_tokens=6, temperature=0) == exact
        assert olmoe_engine.stats["dropped_subexperts"] == 0
        planner = TokenPlanner(model, _cost(), budget_s=1e-6)  # nothing fits: every layer at the floor
        model.set_planner(planner)
        seen = []
        real = model.unit_weights

        def spy(layer, x, topv, topi, *, k=None):
            seen.append((layer, k))
            return real(layer, x, topv, topi, k=k)

        model.unit_weights = spy
        olmoe_engine.generate_ids(PROMPT, max_new_tokens=4, temperature=0)
        decode = [k for _, k in seen if k is not None]
        assert decode and set(decode) == {planner.floor()}
        s = olmoe_engine.stats
        per_layer = planner._u[planner.full][0] - planner._u[planner.floor()][0]
        assert s["dropped_subexperts"] == per_layer * model.spec.num_layers * planner.tokens
        assert s["mean_operating_point"] == planner.floor() and s["tokens_within_budget"] == 0.0
    finally:
        model.__dict__.pop("unit_weights", None)
        model.set_planner(None)


def test_each_layer_selects_as_the_fixed_operating_point_does(olmoe_engine):
    model = olmoe_engine.model
    gen = torch.Generator().manual_seed(1)
    for k in (1, 3, 5):
        fixed = SubExpertSelector(model.spec, model.parts, model.gates, k)
        for layer in range(model.spec.num_layers):
            x = torch.randn(1, model.spec.hidden_size, generator=gen)
            topv, topi = model.route(layer, x)
            units, wt = model.unit_weights(layer, x, topv, topi, k=k)
            want_units, want_wt = fixed.decode_units(layer, x, topv, topi)
            assert torch.equal(units, want_units) and torch.equal(wt, want_wt)


def test_a_late_layer_plans_the_rest_lower_and_an_early_one_higher(olmoe_engine, monkeypatch):
    model = olmoe_engine.model
    planner = TokenPlanner(model, _cost(), budget_s=4 * MS)
    planner.slack_s = 0.0
    clock = [100.0]
    monkeypatch.setattr(tp.time, "perf_counter", lambda: clock[0])
    planner.start_token()
    first = planner.operating_point(0)
    assert planner.floor() < first < planner.full  # 4 ms fits neither full K nor only the floor
    clock[0] = 100.0 + planner._due[1] + 1 * MS  # layer 1 starts 1 ms behind its schedule
    assert planner.operating_point(1) < first
    assert planner.replans == 1
    planner.start_token()
    planner.operating_point(0)
    level = planner._k[1]
    clock[0] = 100.0 + planner._due[1] - 1.5 * MS  # well ahead of it: the time saved buys more
    assert planner.operating_point(1) > level


def test_the_slack_follows_how_far_tokens_overran_their_plan(olmoe_engine, monkeypatch):
    model = olmoe_engine.model
    planner = TokenPlanner(model, _cost(), budget_s=10 * MS)
    clock = [0.0]
    monkeypatch.setattr(tp.time, "perf_counter", lambda: clock[0])
    for overrun in [0.2, 0.1, 0.3, 0.2, 0.1, 0.2, 0.3, 0.2]:
        planner.start_token()
        planner.operating_point(0)
        clock[0] += 10 * MS - planner.slack_s + overrun * MS
        planner.end_token()
    assert 0.2 * MS < planner.slack_s < 0.6 * MS  # median 0.2 ms + 3 robust sigmas
    planner.start_token()
    clock[0] += 40 * MS  # one stall does not set the slack
    planner.end_token()
    assert planner.slack_s < 1 * MS
    planner.set_budget(20 * MS)
    assert planner.tokens == 0 and planner.slack_s == pytest.approx(tp.SCHEDULE_MARGIN * 20 * MS)


def test_planner_for_picks_by_whether_the_store_streams(prism_of, min_budget):
    path = prism_of("olmoe")
    resident = edge_prism.load(path, token_latency_ms=1000)
    assert isinstance(resident.model.planner, TokenPlanner)
    streaming = edge_prism.load(path, memory_budget=min_budget(path), token_latency_ms=1000)
    assert streaming.model.store.streams and isinstance(streaming.model.planner, LatencyPlanner)


def test_start_up_measures_what_selecting_costs_and_gives_the_model_back(prism_of):
    engine = edge_prism.load(prism_of("olmoe"))
    model = engine.model
    point = model.operating_point
    unit, fixed, select = _measure_decode(model, torch.device("cpu"), 0.0)
    assert unit > 0 and fixed > 0 and select is not None and select >= 0
    assert model.operating_point == point and model.planner is None and model.cache.length == 0


def test_without_a_measured_selection_cost_the_planner_times_the_selector(olmoe_engine):
    planner = TokenPlanner(olmoe_engine.model, _cost(select_s=None), budget_s=10 * MS)
    assert planner.select_s >= 0 and planner.model.planner is None


def test_a_token_the_floor_cannot_fit_does_not_raise_the_slack(olmoe_engine, monkeypatch):
    # Counted from the deadline, each such token's overrun raised the slack until it stopped
    # at half the budget, and the tokens after it stayed at the floor.
    model = olmoe_engine.model
    planner = TokenPlanner(model, _cost(), budget_s=1 * MS)  # below even the floor's time
    clock = [0.0]
    monkeypatch.setattr(tp.time, "perf_counter", lambda: clock[0])
    for _ in range(12):
        planner.start_token()
        planner.operating_point(0)
        assert planner._k == [planner.floor()] * planner.L
        clock[0] += planner._end + 0.05 * MS  # the floor's predicted time, and a little more
        planner.end_token()
    assert planner.slack_s < 0.1 * MS


def test_a_cut_token_runs_the_allocations_of_two_adjacent_points(olmoe_engine):
    from edge_prism.allocation import LayerAllocation

    model = olmoe_engine.model
    full, L = max(model.parts[0] * model.spec.ffn[0].top_k, 1), model.spec.num_layers
    # layer 0 loses ten times what the others do at every K
    rows = [[10.0 ** (j == 0) * (full - k) / full for k in range(1, full + 1)] for j in range(L)]
    alloc = LayerAllocation(model.spec, model.parts, rows)
    model.set_allocation(alloc)
    try:
        engine_k = model.operating_point
        budgets = [_plan_time(TokenPlanner(model, _cost(), budget_s=1.0), alloc.points(k)) for k in (6, 9)]
        for budget in budgets + [sum(budgets) / 2]:
            planner = TokenPlanner(model, _cost(), budget_s=budget)
            planner.slack_s = 0.0
            planner.start_token()
            planner._plan(0, 0.0)
            ks = list(planner._k)
            k = next(k for k in range(planner._base, planner.floor() - 1, -1)
                     if _plan_time(planner, alloc.points(k)) <= budget + 1e-12)
            lo, hi = alloc.points(k), alloc.points(k + 1)
            assert all(x in (a, b) for x, a, b in zip(ks, lo, hi)), (ks, lo, hi)
            assert _plan_time(planner, ks) <= budget + 1e-12, (ks, k, lo, hi, planner._base, planner.floor())
        assert alloc.points(6) != [6] * L  # the allocation moved units to layer 0
    finally:
        model.set_allocation(None)
        assert model.operating_point == engine_k
