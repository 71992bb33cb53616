"""The latency planner's per-layer cost model (runtime.planner), with synthetic costs.

A layer takes max(device FFN, host side) + the host result's copy back: the device's missing
loads queue on the transfer engine's lanes (one FIFO copy stream on CUDA), the host side is
x's copy to the host and each host unit's read, convert and FFN. No timings are asserted:
the clock is fake or the costs are given.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import edge_prism
from edge_prism.runtime import planner as planner_mod
from edge_prism.runtime.planner import CostModel, LatencyPlanner, OnlineCost, transfer_lanes

MS = 1e-3


# -- the cost of one layer -------------------------------------------------------------------
def test_two_misses_on_one_lane_cost_twice_one_miss():
    fit = OnlineCost(0.0, 1 * MS, 3 * MS, lanes=1)  # a miss: 1 ms compute + 2 ms load
    assert fit.device_s(0, 2) == pytest.approx(2 * fit.device_s(0, 1)) == pytest.approx(6 * MS)
    assert fit.predict(3, 2) == pytest.approx(fit.fixed_s + 5 * MS + 4 * MS)
    two = OnlineCost(0.0, 1 * MS, 3 * MS, lanes=2)  # two loads at once: one wave
    assert two.device_s(0, 2) == pytest.approx(2 * MS + 2 * MS)
    assert two.device_s(0, 3) == pytest.approx(3 * MS + 4 * MS)


def test_cost_model_loads_queue_on_the_lanes_it_is_given():
    cost = CostModel(device="fake", h2d_bytes_per_s=1e6, copy_overhead_s=0.0, unit_s=MS, layer_fixed_s=0.0,
                     head_s=0.0)  # workers=2: the old assumption of two parallel loads
    assert cost.load_s(1000, 2) == pytest.approx(1 * MS)
    assert cost.load_s(1000, 2, lanes=1) == pytest.approx(2 * cost.load_s(1000, 1, lanes=1)) == pytest.approx(2 * MS)


def test_host_side_counts_both_copies_and_every_step_of_a_unit():
    cost = CostModel(device="fake", h2d_bytes_per_s=1e6, copy_overhead_s=0.1 * MS, unit_s=MS, layer_fixed_s=0.0,
                     head_s=0.0, host_unit_s=1 * MS, host_read_s=0.5 * MS, host_convert_s=0.25 * MS,
                     d2h_s=0.2 * MS, h2d_result_s=0.3 * MS)
    assert cost.host_s == pytest.approx(1.75 * MS)
    fit = OnlineCost(0.0, MS, 3 * MS, host_s=cost.host_s, d2h_s=cost.d2h, h2d_s=cost.h2d_result)
    # device: 2 resident units (2 ms); host: 0.2 + 2 x 1.75 = 3.7 ms; then 0.3 ms back
    assert fit.ffn_s(2, 0, 2) == pytest.approx(3.7 * MS + 0.3 * MS)
    # device: 5 resident units (5 ms) hide the host side, not the copy back
    assert fit.ffn_s(5, 0, 2) == pytest.approx(5 * MS + 0.3 * MS)
    assert fit.ffn_s(5, 0, 0) == pytest.approx(5 * MS)
    # A hand-made profile without the copies or reads: the overhead stands for each copy.
    bare = CostModel(device="fake", h2d_bytes_per_s=1e6, copy_overhead_s=0.1 * MS, unit_s=MS, layer_fixed_s=0.0,
                     head_s=0.0, host_unit_s=MS)
    assert bare.host_s == MS and bare.d2h == bare.h2d_result == 0.1 * MS


def test_prefix_costs_split_the_misses_where_the_layer_is_shortest():
    # 4 resident then 4 missing units; a miss costs 1 ms compute + 2 ms load on one lane, a
    # host unit 2 ms. All on the device: 4 + 4 x 3 = 16 ms. Host for k of them:
    # max(4 + 3 (4 - k), 2 k): k = 3 gives max(7, 6) = 7 ms (all 4: max(4, 8) = 8).
    fit = OnlineCost(0.0, MS, 3 * MS, lanes=1, host_s=2 * MS)
    ready = np.array([True] * 4 + [False] * 4)
    cost, n_host = fit.prefix_costs(ready, host=True)
    assert cost[-1] == pytest.approx(7 * MS) and n_host[-1] == 3
    assert np.all(np.diff(cost) >= 0)
    device_only, none = fit.prefix_costs(ready, host=False)
    assert device_only[-1] == pytest.approx(16 * MS) and not none.any()
    assert np.all(cost <= device_only + 1e-12)


# -- plans -----------------------------------------------------------------------------------
@pytest.fixture
def frozen_clock(monkeypatch):
    """The planner's clock stands still: a plan sees the whole budget left, however slow the
    machine running the test."""
    monkeypatch.setattr(planner_mod, "time", SimpleNamespace(perf_counter=lambda: 0.0))


def _planner(budget_s, *, ready, lanes=1, host_s=None, d2h_s=None, h2d_s=None, block_dtype=torch.float32,
             workers=2, min_share=0.5):
    S = 4
    model = SimpleNamespace(spec=SimpleNamespace(num_layers=1), parts=[S], part_scores=lambda layer, x, topi: None)
    store = SimpleNamespace(block_nbytes=lambda layer: 2000, ready=lambda layer, u: ready[u],
                            host_blocks=lambda layer, units: None,
                            pool=lambda layer: torch.empty(1, dtype=block_dtype))
    # a unit: 1 ms; a load: 2 ms
    cost = CostModel(device="fake", h2d_bytes_per_s=1e6, copy_overhead_s=0.0, unit_s=MS, layer_fixed_s=0.0,
                     head_s=0.0, workers=workers, host_unit_s=host_s, d2h_s=d2h_s, h2d_result_s=h2d_s)
    planner = LatencyPlanner(model, store, cost, budget_s=budget_s, load_lanes=lanes, min_share=min_share)
    planner.start_token()
    return planner


def _selection():
    # Token routed to experts 2 (weight .7) and 0 (weight .3); all 4 parts of each, no gate
    # scores: operating-point order 8, 0, 9, 1, 10, 2, 11, 3.
    return torch.tensor([0, 1, 2, 3, 8, 9, 10, 11]), torch.tensor([[.3]] * 4 + [[.7]] * 4), torch.tensor([[2, 0]])


def _plan(planner):
    units, wt, topi = _selection()
    dev, _, host, _ = planner.plan(0, torch.zeros(1, 8), units, wt, topi)
    return sorted(dev.tolist()), sorted(host.tolist())


def _two_missing():
    ready = {u: True for u in range(12)}
    ready[10] = ready[11] = False
    return ready  # all on the device, one lane: 8 x 1 + 2 x 2 = 12 ms


def test_host_is_chosen_only_when_it_beats_the_load_queue_with_its_copies(frozen_clock):
    everything = [0, 1, 2, 3, 8, 9, 10, 11]
    # 1 ms a host unit, cheap copies: device 6 ms | host 0.5 + 2 = 2.5 ms, + 0.5 ms back = 6.5 < 12
    dev, host = _plan(_planner(10.0, ready=_two_missing(), host_s=MS, d2h_s=0.5 * MS, h2d_s=0.5 * MS))
    assert host == [10, 11] and dev == [0, 1, 2, 3, 8, 9]
    # The same host units (1 ms each, under a miss's 3 ms: what the old per-unit comparison
    # took) behind 6 ms copies each way: max(6, 6 + 2) + 6 = 14 ms > 12 ms: the device keeps them.
    dev, host = _plan(_planner(10.0, ready=_two_missing(), host_s=MS, d2h_s=6 * MS, h2d_s=6 * MS))
    assert host == [] and dev == everything
    # On a tie (12 ms either way) the device keeps them.
    dev, host = _plan(_planner(10.0, ready=_two_missing(), host_s=MS, d2h_s=5 * MS, h2d_s=5 * MS))
    assert host == []


def test_the_host_wins_against_one_lane_and_loses_against_two(frozen_clock):
    # host for both: max(6, 1 + 2) + 5 = 11 ms; device, one lane: 12 ms; two lanes: 8 + 2 = 10 ms
    one = _planner(10.0, ready=_two_missing(), lanes=1, host_s=MS, d2h_s=MS, h2d_s=5 * MS)
    two = _planner(10.0, ready=_two_missing(), lanes=2, host_s=MS, d2h_s=MS, h2d_s=5 * MS)
    assert _plan(one)[1] == [10, 11] and _plan(two)[1] == []


def test_one_lane_fits_one_of_two_misses_where_two_lanes_fit_both(frozen_clock):
    ready = {u: True for u in range(12)}
    ready[8] = ready[0] = False  # the first two units in order are missing: 3 ms each alone
    # one lane: 3, 6, 7, ... ms; two lanes: 3, 4, 5, ... ms; 4.5 ms left (no floor)
    one = _planner(4.5 * MS, ready=ready, lanes=1, min_share=0.0)
    two = _planner(4.5 * MS, ready=ready, lanes=2, min_share=0.0)
    assert _plan(one)[0] == [8] and _plan(two)[0] == [0, 8]
    assert one.dropped == 7 and two.dropped == 6


def test_quantized_blocks_never_go_to_the_host(frozen_clock):
    planner = _planner(10.0, ready=_two_missing(), host_s=MS, d2h_s=0.0, h2d_s=0.0, block_dtype=torch.uint8)
    assert _plan(planner)[1] == []


def test_lanes_come_from_the_store_then_from_the_cost_models_workers():
    assert transfer_lanes(SimpleNamespace(load_lanes=lambda: 2)) == 2
    assert transfer_lanes(SimpleNamespace(load_lanes=lambda: 0)) == 1
    assert transfer_lanes(SimpleNamespace()) is None  # everything resident: no transfer engine
    ready = {u: True for u in range(12)}
    assert _planner(1.0, ready=ready, lanes=None, workers=3).load_lanes == 3


def test_planner_for_takes_the_cpu_stores_reader_count(prism_of, min_budget):
    path = prism_of("olmoe")
    engine = edge_prism.load(path, memory_budget=min_budget(path), token_latency_ms=1000)
    store = engine.model.store
    readers = {len(p.transfer._threads) + 1 for p in store._pools.values()}  # CPU: workers and the waiting thread
    assert {p.transfer.lanes for p in store._pools.values()} == readers
    assert engine.model.planner.load_lanes == transfer_lanes(store) == store.load_lanes() == min(readers)
    assert engine.stats["load_lanes"] == min(readers)


# -- fitting ---------------------------------------------------------------------------------
def _true_segment(n_ready, n_missing, n_host, *, lanes, fixed=2 * MS, ready=0.1 * MS, load=0.6 * MS,
                  host=0.3 * MS, d2h=0.05 * MS, h2d=0.05 * MS):
    device = ready * (n_ready + n_missing) + load * -(-n_missing // lanes)
    if n_host == 0:
        return fixed + device
    return fixed + max(device, d2h + host * n_host) + h2d


@pytest.mark.parametrize("lanes", [1, 2])
def test_online_fit_recovers_the_device_and_host_terms(lanes):
    gen = np.random.default_rng(0)
    fit = OnlineCost(0.01, 0.01, 0.01, lanes=lanes, host_s=5 * MS, d2h_s=0.05 * MS, h2d_s=0.05 * MS)
    for _ in range(600):
        n_ready, n_missing = (int(v) for v in gen.integers(0, 16, 2))
        n_host = int(gen.integers(1, 12)) if gen.random() < 0.3 else 0
        noise = gen.normal() * 1e-5
        fit.observe(n_ready, n_missing, _true_segment(n_ready, n_missing, n_host, lanes=lanes) + noise, n_host)
    assert abs(fit.fixed_s - 2 * MS) < 0.2 * MS
    assert abs(fit.ready_s - 0.1 * MS) < 0.02 * MS and abs(fit.load_s - 0.6 * MS) < 0.05 * MS
    assert abs(fit.host_s - 0.3 * MS) < 0.03 * MS


def test_planner_learns_synthetic_costs_while_planning(monkeypatch):
    """The planner fed segments of known costs (a fake clock) fits them, host term included."""
    clock = [0.0]
    monkeypatch.setattr(planner_mod, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    L, S = 2, 4
    gen = np.random.default_rng(1)
    ready = {}
    model = SimpleNamespace(spec=SimpleNamespace(num_layers=L), parts=[S] * L,
                            part_scores=lambda layer, x, topi: None)
    store = SimpleNamespace(block_nbytes=lambda layer: 2000, ready=lambda layer, u: ready[u],
                            host_blocks=lambda layer, units: None)
    # A wrong start-up guess: 1 ms fixed, 1 ms a unit, 2 ms a load, 3 ms a host unit (truly 2,
    # 0.1, 0.6 and 1: a host unit dearer than a miss, so layers split their misses).
    cost = CostModel(device="fake", h2d_bytes_per_s=1e6, copy_overhead_s=0.0, unit_s=MS, layer_fixed_s=MS,
                     head_s=0.0, host_unit_s=3 * MS, d2h_s=0.05 * MS, h2d_result_s=0.05 * MS)
    planner = LatencyPlanner(model, store, cost, budget_s=10.0, load_lanes=1)
    units, wt, topi = _selection()
    seen = set()
    for _ in range(400):
        planner.start_token()
        for layer in range(L):
            ready.clear()
            ready.update({u: bool(gen.random() < 0.6) for u in range(2 * 4 * S)})
            k = int(gen.integers(1, 9))  # selections of different sizes separate fixed and per-unit time
            planner.plan(layer, torch.zeros(1, 8), units[:k], wt[:k], topi)
            _, n_ready, n_missing, n_host = planner._last
            clock[0] += _true_segment(n_ready, n_missing, n_host, lanes=1, host=MS)
            seen.add((n_missing > 0, n_host > 0))
        planner.end_token()
    fit = planner.fit
    assert {(True, False), (False, True), (True, True)} <= seen  # device misses, host units, both
    assert abs(fit.fixed_s - 2 * MS) < 0.2 * MS
    assert abs(fit.ready_s - 0.1 * MS) < 0.03 * MS and abs(fit.missing_s - 0.7 * MS) < 0.1 * MS
    assert abs(fit.host_s - MS) < 0.1 * MS


# -- measuring the host path -------------------------------------------------------------------
def test_host_path_is_measured_step_by_step_and_plans_with_it(prism_of, min_budget):
    """The host path's measurement (CUDA only in load(); its steps run on the CPU too): every
    step has a time, and a planner using them with slow loads computes misses on the host,
    exactly."""
    path = prism_of("olmoe")
    ref = edge_prism.load(path)
    engine = edge_prism.load(path, memory_budget=min_budget(path), prefetch=False, token_latency_ms=10_000)
    model = engine.model
    x = torch.randn(1, model.spec.hidden_size, dtype=model.dtype)
    host = planner_mod._measure_host(model, 0, x, torch.device("cpu"))
    assert set(host) == {"host_unit_s", "host_read_s", "host_convert_s", "d2h_s", "h2d_result_s"}
    assert all(v >= 0 for v in host.values()) and host["host_unit_s"] > 0 and host["host_read_s"] > 0
    slow_loads = CostModel(device="forced", h2d_bytes_per_s=1e3, copy_overhead_s=0.0, unit_s=1e-6,
                           layer_fixed_s=1e-6, head_s=0.0, **host)
    model.set_planner(LatencyPlanner(model, model.store, slow_loads, budget_s=10.0))
    assert engine.generate_ids(list(range(70, 94)), max_new_tokens=6) == ref.generate_ids(list(range(70, 94)),
                                                                                          max_new_tokens=6)
    s = engine.stats
    assert s["cpu_computed_subexperts"] > 0 and s["dropped_subexperts"] == 0 and s["cost_host_unit_ms"] > 0


def test_profiles_of_the_older_cost_model_are_not_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_PRISM_PROFILES", str(tmp_path))
    path = planner_mod._cache_path(torch.device("cpu"), "sig")
    assert path.parent == tmp_path and path.name.endswith(f"-v{planner_mod.COST_MODEL_VERSION}.json")


def test_observe_many_is_that_many_observations():
    """One aggregated update equals the same segments observed one by one (no forgetting), and
    a stall counts as at most 3x the prediction."""
    one, many = (OnlineCost(0.5 * MS, 0.05 * MS, 0.2 * MS, forget=1.0) for _ in range(2))
    for n, secs in ((4, 0.8 * MS), (8, 1.1 * MS)):
        for _ in range(5):
            one.observe(n, 0, secs)
        many.observe_many(n, 0, 5 * secs, 5)
    assert many.theta == pytest.approx(one.theta, rel=1e-9)
    assert one.clipped(8, 0, 1.0) == pytest.approx(3 * (one.fixed_s + 8 * one.ready_s))
