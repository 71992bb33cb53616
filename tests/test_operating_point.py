"""Engine.set_operating_point: one loaded prism serves every operating point, and each point
computes what a fresh load at that point computes (synthetic tiny weights)."""

from __future__ import annotations

import pytest
import torch

import edge_prism
from edge_prism.errors import ConfigError

PROMPT = list(range(40, 72))  # 32 byte tokens


def full_k(engine) -> int:
    from edge_prism.select import max_operating_point

    return max_operating_point(engine.spec, engine.model.parts)


@pytest.mark.parametrize("family", ["llama", "olmoe"])  # dense (K of 16 per FFN) and MoE (K of 8 x top-2)
@pytest.mark.parametrize("gate", ["linear", "proxy"])
def test_switching_gives_the_logits_of_a_fresh_load(family, gate, prism_of):
    path = prism_of(family)
    engine = edge_prism.load(path, gate=gate)  # loaded at full K
    full = full_k(engine)
    for k in (3, full - 1, 1, full, 5):
        engine.set_operating_point(k)
        fresh = edge_prism.load(path, gate=gate, operating_point=k)
        assert engine.model.operating_point == k
        assert torch.equal(engine.logits(PROMPT), fresh.logits(PROMPT)), k


def test_a_low_point_load_reaches_full_k_exactly(prism_of, tiny_engines):
    engine = edge_prism.load(prism_of("olmoe"), operating_point=2)
    engine.set_operating_point(full_k(engine))
    torch.testing.assert_close(engine.logits(PROMPT), tiny_engines("olmoe").logits(PROMPT), rtol=1e-4, atol=1e-4)


def test_generation_after_a_switch_starts_afresh(prism_of):
    path = prism_of("llama")
    engine = edge_prism.load(path)
    engine.generate_ids(PROMPT, max_new_tokens=4)  # leaves a KV cache computed at full K
    engine.set_operating_point(4)
    assert (engine.generate_ids(PROMPT, max_new_tokens=6)
            == edge_prism.load(path, operating_point=4).generate_ids(PROMPT, max_new_tokens=6))


def test_a_larger_point_than_the_budget_was_planned_for_still_computes_exactly(prism_of, min_budget):
    path = prism_of("olmoe")
    budgeted = edge_prism.load(path, operating_point=2, memory_budget=min_budget(path, 2), prefetch=False)
    for k in (16, 9):
        budgeted.set_operating_point(k)
        torch.testing.assert_close(budgeted.logits(PROMPT), edge_prism.load(path, operating_point=k).logits(PROMPT),
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("bad", [0, 17, -1, 2.5, True, "4"])
def test_invalid_points_are_refused_like_load_refuses_them(prism_of, bad):
    engine = edge_prism.load(prism_of("olmoe"), operating_point=4)  # 8 sub-experts x top-2 = 16 at most
    with pytest.raises(ConfigError, match="operating point"):
        engine.set_operating_point(bad)
    assert engine.model.operating_point == 4  # unchanged


def test_a_plain_checkpoint_names_the_fix(tiny_engines):
    with pytest.raises(ConfigError, match="edge-prism refactor"):
        tiny_engines("llama").set_operating_point(4)


def test_evaluation_loads_the_prism_once(prism_of, monkeypatch):
    import edge_prism.api as api
    from edge_prism.evaluate import evaluate_model

    loads = []
    real = api.load_with
    monkeypatch.setattr(api, "load_with", lambda *a, **kw: loads.append(a) or real(*a, **kw))
    rows, usable = evaluate_model(prism_of("llama"), api.RuntimeConfig(), points="all", max_tokens=256,
                                  progress=False)
    assert len(loads) == 1
    assert sorted(r.operating_point for r in rows) == list(range(1, 17))
    assert 16 in usable["prism"]


# -- Engine.set_token_latency_ms ---------------------------------------------------------------
def test_a_latency_budget_set_after_load_degrades_then_is_lifted(prism_of, min_budget):
    path = prism_of("olmoe")
    engine = edge_prism.load(path, memory_budget=min_budget(path))
    exact = engine.generate_ids(PROMPT, max_new_tokens=8, temperature=0)
    engine.set_token_latency_ms(1e-3)  # nothing fits: every layer runs its floor
    assert engine.config.token_latency_ms == 1e-3
    engine.generate_ids(PROMPT, max_new_tokens=8, temperature=0)
    tight = engine.stats
    assert tight["token_latency_budget_ms"] == 1e-3 and tight["dropped_subexperts"] > 0
    engine.set_token_latency_ms(1e6)  # the planner it made keeps its costs; nothing is dropped
    assert engine.generate_ids(PROMPT, max_new_tokens=8, temperature=0) == exact
    assert engine.stats["dropped_subexperts"] == 0 and engine.stats["tokens_within_budget"] == 1.0
    engine.set_token_latency_ms(None)
    assert engine.generate_ids(PROMPT, max_new_tokens=8, temperature=0) == exact
    assert "token_latency_budget_ms" not in engine.stats and engine.config.token_latency_ms is None


@pytest.mark.parametrize("bad", [0, -5, float("nan"), float("inf"), True, "50"])
def test_invalid_latency_budgets_are_refused(prism_of, bad):
    engine = edge_prism.load(prism_of("olmoe"))
    with pytest.raises(ConfigError, match="token latency budget"):
        engine.set_token_latency_ms(bad)


def test_a_latency_budget_on_a_plain_checkpoint_names_the_fix(tiny_engines):
    with pytest.raises(ConfigError, match="refactor"):
        tiny_engines("llama").set_token_latency_ms(50)


@pytest.mark.parametrize("family", ["llama", "olmoe"])
@pytest.mark.parametrize("gate", ["linear", "proxy"])
def test_a_decode_token_selects_what_the_batched_path_selects(family, gate, prism_of):
    """unit_weights' one-token path (straight to the store's unit list) against the weights
    tensor of the many-token path, at several points and for every layer."""
    engine = edge_prism.load(prism_of(family), gate=gate)
    m = engine.model
    gen = torch.Generator().manual_seed(3)
    for k in (1, 3, full_k(engine) - 1, full_k(engine)):
        engine.set_operating_point(k)
        for layer in range(m.spec.num_layers):
            x = torch.randn(1, m.spec.hidden_size, generator=gen).to(m.dtype)
            topv, topi = m.route(layer, x)
            units, wt = m.unit_weights(layer, x, topv, topi)
            S = m.parts[layer]
            w = topv[:, :, None].expand(1, topi.shape[1], S) if m.selector is None else m.selector(layer, x, topv, topi)
            dense = torch.zeros(m.spec.ffn[layer].num_experts * S)
            dense[(topi[0, :, None] * S + torch.arange(S)).reshape(-1)] = w[0].reshape(-1).float()
            want = dense.nonzero().squeeze(1)
            assert torch.equal(units, want), (k, layer)
            if wt is None:  # a dense FFN at full K: every unit, weight 1
                assert bool((dense[want] == 1).all())
            else:
                assert wt.shape == (want.numel(), 1)
                torch.testing.assert_close(wt[:, 0].float(), dense[want])
            if k < full_k(engine) and m.spec.ffn[layer].routed or not m.spec.is_moe and k < full_k(engine):
                assert units.numel() < topi.shape[1] * S
