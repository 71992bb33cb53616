"""Prefetching and the token-latency budget (synthetic tiny weights).

Prefetch never changes output; without a latency budget nothing is dropped; the planner
drops lowest-priority sub-experts first and never the floor; stats report it all.
"""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

import edge_prism
from edge_prism.errors import ConfigError
from edge_prism.runtime.planner import CostModel, LatencyPlanner

PROMPT = list(range(70, 94))


@pytest.fixture(scope="module")
def olmoe(prism_of):
    return prism_of("olmoe")


def test_prefetch_does_not_change_output(olmoe, min_budget):
    budget = min_budget(olmoe) * 2
    on = edge_prism.load(olmoe, memory_budget=budget, prefetch=True)
    off = edge_prism.load(olmoe, memory_budget=budget, prefetch=False)
    assert on.generate_ids(PROMPT, max_new_tokens=12) == off.generate_ids(PROMPT, max_new_tokens=12)
    torch.testing.assert_close(on.logits(PROMPT), off.logits(PROMPT), rtol=1e-5, atol=1e-5)


def test_prefetch_stats_are_reported(olmoe, min_budget):
    engine = edge_prism.load(olmoe, memory_budget=min_budget(olmoe) * 2, prefetch=True)
    engine.generate_ids(PROMPT, max_new_tokens=12)
    s = engine.stats
    assert 0.0 <= s["prefetch_precision"] <= 1.0 and 0.0 <= s["prefetch_recall"] <= 1.0
    assert s["prefetched_unused_bytes"] >= 0
    assert engine.model.store.stats.prefetch_issued > 0
    off = edge_prism.load(olmoe, memory_budget=min_budget(olmoe) * 2, prefetch=False)
    off.generate_ids(PROMPT, max_new_tokens=4)
    assert off.stats["prefetch_precision"] is None and off.model.prefetcher is None


def test_prefetch_is_on_by_default_only_where_it_pays(olmoe, min_budget):
    from edge_prism.api import RuntimeConfig, prefetch_applies

    assert edge_prism.load(olmoe, memory_budget=min_budget(olmoe) * 2).model.prefetcher is None  # CPU
    assert prefetch_applies(RuntimeConfig(), torch.device("cuda", 0))
    assert not prefetch_applies(RuntimeConfig(), torch.device("cpu"))
    assert prefetch_applies(RuntimeConfig(prefetch=True), torch.device("cpu"))


def test_predictor_ranks_units_of_the_target_layer(olmoe):
    from edge_prism.prefetch import Predictor

    engine = edge_prism.load(olmoe)
    m = engine.model
    resid = torch.randn(1, m.spec.hidden_size)
    pred = Predictor(m).predict(0, resid, 1)
    S, E = m.parts[1], m.spec.ffn[1].num_experts
    assert pred.layer == 1 and pred.units.numel() == m.spec.ffn[1].top_k * S  # full K: all parts
    assert ((0 <= pred.units) & (pred.units < E * S)).all()
    assert (pred.confidence[:-1] >= pred.confidence[1:]).all()


def test_predictor_matches_the_layer_itself_when_residual_is_unchanged(olmoe):
    """Predicting layer l from its own FFN-input residual is exact: same norm, router, gate."""
    from edge_prism.model import _rms
    from edge_prism.prefetch import Predictor

    m = edge_prism.load(olmoe, operating_point=5).model
    resid = torch.randn(1, m.spec.hidden_size)
    pred = Predictor(m).predict(0, resid, 1)  # layer 1 applied to this residual
    x = _rms(resid, m.w.layers[1].ffn_norm, m.spec.rms_norm_eps)
    topv, topi = m.route(1, x)
    units, _ = m.unit_weights(1, x, topv, topi)
    assert sorted(pred.units.tolist()) == units.tolist()


def test_drift_correction_is_stored_and_used(olmoe, min_budget):
    from edge_prism.refactor.prism import open_prism

    pc = open_prism(olmoe)
    assert "layers.0.predict.1.scale" in pc.gates.names()
    engine = edge_prism.load(olmoe, memory_budget=min_budget(olmoe) * 2, prefetch=True)
    assert (0, 1) in engine.model.prefetcher.predictor.corrections


class _BlockingTier:
    """Wraps a host tier: reads wait until ``gate`` is set (to hold the workers)."""

    def __init__(self, inner, gate: threading.Event):
        self.inner, self.gate = inner, gate

    def read_into(self, index, dst):
        self.gate.wait(10)
        self.inner.read_into(index, dst)


def test_stale_prefetches_still_queued_are_cancelled(olmoe):
    from edge_prism.api import layer_blocks
    from edge_prism.families import build_spec
    from edge_prism.refactor.prism import open_prism
    from edge_prism.runtime.store import BudgetedStore, minimum_budget, prism_tiers
    from edge_prism.select import max_operating_point

    pc = open_prism(olmoe)
    spec = build_spec(pc.config, where="test")
    layers = layer_blocks(pc, spec, max_operating_point(spec, pc.parts))
    gate = threading.Event()
    gate.set()  # warm-up loads run freely
    base = prism_tiers(olmoe / "experts.safetensors", torch.device("cpu"))
    store = BudgetedStore(lambda g, o, n: _BlockingTier(base(g, o, n), gate), layers,
                          budget_bytes=minimum_budget(layers) * 2, device=torch.device("cpu"), workers=1)
    gate.clear()  # now every load waits: the first holds the only worker, the rest queue
    resident = {u for u in range(layers[1].units) if store.is_resident(1, u)}
    absent = [u for u in range(layers[1].units) if u not in resident][:4]
    assert store.prefetch(1, absent) == len(absent)
    store.drop_stale(1, absent)
    gate.set()
    assert store.stats.prefetch_cancelled >= len(absent) - 1  # all but the one a worker holds
    assert sum(store.is_resident(1, u) for u in absent) <= 1
    store.close()


# -- planner ------------------------------------------------------------------------------
def _fake_planner(budget_s: float, scores=None, ready=None, nbytes=1000, min_share=0.0):
    S = 4
    model = SimpleNamespace(spec=SimpleNamespace(num_layers=1), parts=[S],
                            part_scores=lambda layer, x, topi: scores)
    store = SimpleNamespace(block_nbytes=lambda layer: nbytes,
                            ready=lambda layer, u: True if ready is None else ready[u])
    cost = CostModel(device="fake", h2d_bytes_per_s=1e6, copy_overhead_s=0.0, unit_s=0.001,
                     layer_fixed_s=0.0, head_s=0.0, workers=1)
    planner = LatencyPlanner(model, store, cost, budget_s=budget_s, min_share=min_share)
    planner.start_token()
    return planner


def _selection():
    # Token routed to experts 2 (weight .7) and 0 (weight .3); all 4 parts of each.
    topi = torch.tensor([[2, 0]])
    units = torch.tensor([0, 1, 2, 3, 8, 9, 10, 11])
    wt = torch.tensor([[.3]] * 4 + [[.7]] * 4)
    return units, wt, topi


def test_planner_keeps_everything_within_budget():
    units, wt, topi = _selection()
    kept, kw, _, _ = _fake_planner(1.0).plan(0, torch.zeros(1, 8), units, wt, topi)
    assert kept.tolist() == units.tolist() and torch.equal(kw, wt)


def test_planner_trims_to_the_operating_point_that_fits():
    units, wt, topi = _selection()
    planner = _fake_planner(0.0035)  # 3 units of compute fit
    kept, kw, _, _ = planner.plan(0, torch.zeros(1, 8), units, wt, topi)
    # What operating point 3 keeps (select.quotas: 2 parts for the first-ranked expert 2, 1 for
    # expert 0), hottest parts first: 8, 9 and 0.
    assert kept.tolist() == [0, 8, 9] and planner.dropped == 5
    assert torch.equal(kw, torch.tensor([[.3], [.7], [.7]]))


def test_planner_ranks_each_experts_parts_by_gate_score():
    units, wt, topi = _selection()
    scores = torch.tensor([[[0., 0., 0., 9.], [5., 0., 0., 0.]]])  # expert 2: part 3 scores highest
    kept, _, _, _ = _fake_planner(0.0025, scores=scores).plan(0, torch.zeros(1, 8), units, wt, topi)
    # Each routed expert's best part by score: expert 2's part 3, expert 0's part 0.
    assert kept.tolist() == [0, 11]


@pytest.mark.parametrize("k_routed,S", [(1, 16), (2, 4), (3, 5)])
def test_planner_order_is_every_fixed_operating_points_selection(k_routed, S):
    """Each prefix of the planner's order is the selection the fixed operating point of its
    length makes (select.quotas per ranked expert, best parts by the same gate scores)."""
    from edge_prism.select import quotas

    gen = torch.Generator().manual_seed(k_routed * 100 + S)
    experts = torch.randperm(6, generator=gen)[:k_routed]
    topi = experts[None]
    scores = torch.randn(1, k_routed, S, generator=gen)
    model = SimpleNamespace(spec=SimpleNamespace(num_layers=1), parts=[S],
                            part_scores=lambda layer, x, t: scores)
    store = SimpleNamespace(block_nbytes=lambda layer: 1000, ready=lambda layer, u: True)
    cost = CostModel(device="fake", h2d_bytes_per_s=1e6, copy_overhead_s=0.0, unit_s=0.001,
                     layer_fixed_s=0.0, head_s=0.0, workers=1)
    planner = LatencyPlanner(model, store, cost, budget_s=1.0)
    ids = torch.sort((experts[:, None] * S + torch.arange(S)).reshape(-1)).values.numpy()
    order = planner.order(0, torch.zeros(1, 8), ids, topi)
    for K in range(1, k_routed * S + 1):
        fixed = {int(experts[j]) * S + int(p) for j, q in enumerate(quotas(K, k_routed, S))
                 for p in scores[0, j].topk(q).indices}
        assert set(ids[order[:K]].tolist()) == fixed


def test_planner_never_drops_below_the_floor():
    units, wt, topi = _selection()
    kept, _, _, _ = _fake_planner(0.0).plan(0, torch.zeros(1, 8), units, wt, topi)  # nothing fits
    assert kept.tolist() == [8]  # no floor: the top part of the top expert
    kept, _, _, _ = _fake_planner(0.0, min_share=0.5).plan(0, torch.zeros(1, 8), units, wt, topi)
    assert kept.tolist() == [0, 1, 8, 9]  # half of the selection: operating point 4
    with pytest.raises(ConfigError, match="min_share"):
        _fake_planner(1.0, min_share=1.5)


def test_planner_keeps_the_most_valuable_in_order_and_counts_missing_ones_dearer():
    units, wt, topi = _selection()
    ready = {u: True for u in units.tolist()}
    ready[9] = False  # loading it costs 2 ms more
    kept, _, _, _ = _fake_planner(0.0035, ready=ready, nbytes=2000).plan(0, torch.zeros(1, 8), units, wt, topi)
    # 8 and 0 fit (2 ms); 9 would need 3 ms more, and the list ends there: cheaper resident
    # parts after it (1, 10, ...) are not taken in its place.
    assert kept.tolist() == [0, 8]
    everything_ready = _fake_planner(0.0035, nbytes=2000).plan(0, torch.zeros(1, 8), units, wt, topi)[0]
    assert everything_ready.tolist() == [0, 8, 9]


def test_planner_leaves_the_later_layers_the_same_operating_point(monkeypatch):
    """Two layers of 8 units at 1 ms each and a 10 ms budget: the first layer keeps 5, not the
    8 that fit in the time left alone, so the second can keep 5 too (one operating point for
    the token, as a fixed K would run), and the token meets its budget."""
    from edge_prism.runtime import planner as planner_mod

    clock = [0.0]
    monkeypatch.setattr(planner_mod, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    model = SimpleNamespace(spec=SimpleNamespace(num_layers=2), parts=[8, 8],
                            part_scores=lambda layer, x, topi: None)
    store = SimpleNamespace(block_nbytes=lambda layer: 1000, ready=lambda layer, u: True)
    cost = CostModel(device="fake", h2d_bytes_per_s=1e6, copy_overhead_s=0.0, unit_s=0.001,
                     layer_fixed_s=0.0, head_s=0.0, workers=1)
    planner = LatencyPlanner(model, store, cost, budget_s=0.0101, min_share=0.0)
    units, wt, topi = torch.arange(8), torch.ones(8, 1), torch.tensor([[0]])
    for _ in range(3):
        planner.start_token()
        kept = []
        for layer in range(2):
            k = planner.plan(layer, torch.zeros(1, 8), units, wt, topi)[0].numel()
            kept.append(k)
            clock[0] += 0.001 * k  # the segment takes what the plan predicted
        planner.end_token()
        assert kept == [5, 5]


def test_no_latency_budget_drops_nothing_and_generous_budget_is_exact(olmoe):
    ref = edge_prism.load(olmoe)
    generous = edge_prism.load(olmoe, token_latency_ms=1e6)
    assert generous.generate_ids(PROMPT, max_new_tokens=10) == ref.generate_ids(PROMPT, max_new_tokens=10)
    s = generous.stats
    assert s["dropped_subexperts"] == 0 and s["tokens_within_budget"] == 1.0


def test_tight_latency_budget_degrades_instead_of_stalling(olmoe, min_budget):
    engine = edge_prism.load(olmoe, memory_budget=min_budget(olmoe), token_latency_ms=0.001)
    out = engine.generate_ids(PROMPT, max_new_tokens=8)
    s = engine.stats
    full = engine.spec.ffn[0].top_k * engine.model.parts[0]
    assert len(out) > 0 and s["dropped_subexperts"] > 0
    # The floor: one sub-expert per layer per token is always computed.
    assert s["dropped_subexperts_per_token"] <= engine.spec.num_layers * (full - 1)
    for key in ("cpu_computed_subexperts", "tokens_within_budget", "token_latency_budget_ms"):
        assert key in s


def test_cost_model_is_cached_per_device(olmoe, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_PRISM_PROFILES", str(tmp_path))
    edge_prism.load(olmoe, token_latency_ms=50)
    files = list(tmp_path.glob("cost-*.json"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    edge_prism.load(olmoe, token_latency_ms=50)
    assert files[0].stat().st_mtime_ns == mtime  # reused, not re-measured


def test_missing_sub_experts_run_on_the_host_when_that_is_faster(olmoe, min_budget):
    """Force the CUDA choice on this CPU with a cost model where copies are slow and host
    compute is fast: nothing is dropped, the output stays exact, and the count is reported."""
    ref = edge_prism.load(olmoe)
    engine = edge_prism.load(olmoe, memory_budget=min_budget(olmoe), prefetch=False, token_latency_ms=10_000)
    forced = CostModel(device="forced", h2d_bytes_per_s=1e3, copy_overhead_s=0.0, unit_s=1e-9,
                       layer_fixed_s=0.0, head_s=0.0, host_unit_s=1e-9)
    engine.model.set_planner(LatencyPlanner(engine.model, engine.model.store, forced, budget_s=10.0))
    assert engine.generate_ids(PROMPT, max_new_tokens=8) == ref.generate_ids(PROMPT, max_new_tokens=8)
    s = engine.stats
    assert s["cpu_computed_subexperts"] > 0 and s["dropped_subexperts"] == 0


def test_online_cost_separates_fixed_resident_and_missing_time():
    from edge_prism.runtime.planner import OnlineCost

    gen = torch.Generator().manual_seed(0)
    fit = OnlineCost(0.01, 0.01, 0.01)  # a wrong start-up guess
    for _ in range(300):
        n_ready, n_missing = (int(v) for v in torch.randint(0, 16, (2,), generator=gen))
        noise = float(torch.randn(1, generator=gen)) * 1e-5
        fit.observe(n_ready, n_missing, 0.002 + 0.0001 * n_ready + 0.0005 * n_missing + noise)
    assert abs(fit.fixed_s - 0.002) < 2e-4
    assert abs(fit.ready_s - 0.0001) < 2e-5 and abs(fit.missing_s - 0.0005) < 2e-5
    # A trimmed layer is predicted by its own terms, not by a scale of the untrimmed one.
    assert abs(fit.predict(2, 0) - 0.0022) < 3e-4


def test_planner_keeps_wider_later_layers_whole_when_everything_fits(monkeypatch):
    """A narrow first layer (a dense layer of a MoE model: 4 units) that fits its budget does
    not cap a wider later one (8 units) at its own width: nothing is dropped."""
    from edge_prism.runtime import planner as planner_mod

    monkeypatch.setattr(planner_mod, "time", SimpleNamespace(perf_counter=lambda: 0.0))
    model = SimpleNamespace(spec=SimpleNamespace(num_layers=2), parts=[4, 4],
                            part_scores=lambda layer, x, topi: None)
    store = SimpleNamespace(block_nbytes=lambda layer: 1000, ready=lambda layer, u: True)
    cost = CostModel(device="fake", h2d_bytes_per_s=1e6, copy_overhead_s=0.0, unit_s=0.001,
                     layer_fixed_s=0.0, head_s=0.0, workers=1)
    planner = LatencyPlanner(model, store, cost, budget_s=1.0)
    for _ in range(2):
        planner.start_token()
        first = planner.plan(0, torch.zeros(1, 8), torch.arange(4), torch.ones(4, 1), torch.tensor([[0]]))[0]
        second = planner.plan(1, torch.zeros(1, 8), torch.arange(8), torch.ones(8, 1), torch.tensor([[0, 1]]))[0]
        planner.end_token()
        assert first.numel() == 4 and second.numel() == 8 and planner.dropped == 0
