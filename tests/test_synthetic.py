"""Synthetic models: real shapes from presets or a config.json, random weights made on the
spot, labelled synthetic, exact under any memory budget, and skewable routing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from edge_prism.engine import Engine
from edge_prism.errors import BudgetError, ConfigError
from edge_prism.families import build_spec
from edge_prism.kernels import FloatUnits
from edge_prism.model import Transformer
from edge_prism.prefetch import Predictor, Prefetcher
from edge_prism.select import SubExpertSelector
from edge_prism.synthetic import (PRESETS, SyntheticConfig, SyntheticModel, build_synthetic, random_prompt,
                                  synthetic_config_dict)

# An OLMoE-style config small enough for a unit test: 2 layers, D=64, 8 experts, top-2.
TINY = dict(model_type="olmoe", vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
            max_position_embeddings=256, eos_token_id=299)
FULL_K = 2 * 8  # top-2 experts x 8 sub-experts


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # A CPU shared with other test processes stalls multi-threaded kernels; one thread is plenty here.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("synthetic") / "config.json"
    path.write_text(json.dumps(TINY))
    return path


@pytest.fixture(scope="module")
def prompt() -> list[int]:
    return random_prompt(build_spec(TINY, where="test"), 24, seed=3)


def spec_of(name: str, **kw):
    return build_spec(synthetic_config_dict(name, **kw), where=name)


# -- shapes ----------------------------------------------------------------------------------
def test_olmoe_preset_has_the_real_shape():
    s = spec_of("olmoe-1b-7b")
    assert (s.family, s.num_layers, s.hidden_size, s.vocab_size) == ("olmoe", 16, 2048, 50304)
    assert (s.num_heads, s.num_kv_heads, s.head_dim, s.qk_norm) == (16, 16, 128, "full")
    f = s.ffn[0]
    assert (f.num_experts, f.top_k, f.width, f.routed) == (64, 8, 1024, True)


def test_qwen3_preset_has_the_real_shape():
    s = spec_of("qwen3-30b-a3b")
    assert (s.family, s.num_layers, s.hidden_size, s.vocab_size) == ("qwen3_moe", 48, 2048, 151936)
    assert (s.num_heads, s.num_kv_heads, s.head_dim, s.qk_norm) == (32, 4, 128, "head")
    f = s.ffn[0]
    assert (f.num_experts, f.top_k, f.width, f.norm_topk_prob) == (128, 8, 768, True)


def test_layers_override_keeps_every_other_dimension():
    full, two = spec_of("qwen3-30b-a3b"), spec_of("qwen3-30b-a3b", layers=2)
    assert two.num_layers == 2 and two.ffn == full.ffn[:2] and two.hidden_size == full.hidden_size


def test_synthetic_models_have_no_eos(tiny_config):
    # A sweep decodes every token it asks for.
    assert all("eos_token_id" not in cfg for cfg in PRESETS.values())
    assert "eos_token_id" not in synthetic_config_dict(str(tiny_config))


@pytest.mark.parametrize("kw, message", [
    (dict(model="no-such-model"), "not a preset"),
    (dict(model="olmoe-1b-7b", sub_experts=7), "divisor of 1024"),
])
def test_bad_options_fail_clearly(kw, message):
    with pytest.raises(ConfigError, match=message):
        SyntheticModel(SyntheticConfig(**kw, layers=1), device=torch.device("meta"))


@pytest.mark.parametrize("kw", [dict(layers=0), dict(sub_experts=0), dict(skew=-1.0)])
def test_invalid_knobs_are_refused(kw):
    with pytest.raises(ConfigError):
        SyntheticConfig(model="olmoe-1b-7b", **kw)


# -- running ---------------------------------------------------------------------------------
def test_a_tiny_synthetic_model_generates_and_says_so(tiny_config, prompt):
    engine = build_synthetic(tiny_config, device="cpu")
    out = engine.generate_ids(prompt, max_new_tokens=6, temperature=0)
    assert len(out) == 6, "no eos: a synthetic model decodes every token asked for"
    assert all(0 <= t < TINY["vocab_size"] for t in out)
    assert engine.synthetic is True
    assert "synthetic" in str(engine.source)


def test_a_budget_is_respected_and_blocks_stream(tiny_config, prompt):
    engine = build_synthetic(tiny_config, device="cpu", memory_budget="25%")
    engine.generate_ids(prompt, max_new_tokens=6, temperature=0)
    st = engine.stats
    assert 0 < st["resident_bytes"] <= st["memory_budget_bytes"]
    assert st["misses"] > 0 and st["bytes_to_device"] > 0


def test_a_budget_below_the_minimum_is_refused(tiny_config):
    with pytest.raises(BudgetError, match="minimum"):
        build_synthetic(tiny_config, device="cpu", memory_budget="1%")


@pytest.mark.parametrize("k", [FULL_K, 12])
@pytest.mark.parametrize("budget", ["25%", "60%", "100%"])
def test_budgeted_and_resident_engines_agree(tiny_config, prompt, budget, k):
    resident = build_synthetic(tiny_config, device="cpu", operating_point=k, seed=5)
    budgeted = build_synthetic(tiny_config, device="cpu", operating_point=k, seed=5, memory_budget=budget)
    torch.testing.assert_close(budgeted.logits(prompt), resident.logits(prompt), rtol=1e-5, atol=1e-5)
    greedy = dict(max_new_tokens=8, temperature=0)
    assert budgeted.generate_ids(prompt, **greedy) == resident.generate_ids(prompt, **greedy)


def test_the_seed_decides_the_weights(tiny_config, prompt):
    a, b, c = (build_synthetic(tiny_config, device="cpu", seed=s) for s in (1, 1, 2))
    assert torch.equal(a.logits(prompt), b.logits(prompt))
    assert not torch.equal(a.logits(prompt), c.logits(prompt))


# -- capabilities passed to the model, not assigned to it --------------------------------------------
def test_a_model_built_at_a_point_computes_what_an_assigned_selector_did(tiny_config, prompt):
    """Transformer(..., gates=, operating_point=k) gives the logits and tokens of the old way of
    building it: a plain model with a selector assigned afterwards."""
    sm = SyntheticModel(SyntheticConfig(model=str(tiny_config), seed=4), device="cpu")
    k = 7
    built = sm.engine(sm.resident_store(), operating_point=k)
    old = Transformer(sm.spec, sm.weights, sm.resident_store(), parts=sm.parts,
                      kernels=[FloatUnits() for _ in sm.parts], dtype=sm.dtype, device=sm.device)
    old.selector = SubExpertSelector(sm.spec, sm.parts, sm.gates(), k)
    assigned = Engine(old, None, source=sm.source, max_context=sm.spec.max_position)
    assert built.model.operating_point == k and built.model.selector is not None
    assert torch.equal(built.logits(prompt), assigned.logits(prompt))
    greedy = dict(max_new_tokens=6, temperature=0)
    assert built.generate_ids(prompt, **greedy) == assigned.generate_ids(prompt, **greedy)


def test_a_point_below_full_without_gates_is_refused(tiny_config):
    engine = build_synthetic(tiny_config, device="cpu")  # full K: built without gates
    with pytest.raises(ConfigError, match="no sub-expert gates"):
        engine.set_operating_point(FULL_K // 2)
    assert engine.model.operating_point == FULL_K and engine.model.selector is None


def test_a_prefetcher_needs_a_store_that_streams(tiny_config):
    resident = build_synthetic(tiny_config, device="cpu").model
    with pytest.raises(ConfigError, match="needs a store that streams"):
        resident.set_prefetcher(Prefetcher(Predictor(resident), resident.store))
    assert resident.prefetcher is None
    assert build_synthetic(tiny_config, device="cpu", memory_budget="25%", prefetch=True).model.prefetcher is not None


def test_an_observer_is_cleared_after_its_block_even_on_error(tiny_config, prompt):
    engine = build_synthetic(tiny_config, device="cpu")
    seen = []
    with pytest.raises(KeyboardInterrupt):
        with engine.model.observing(lambda layer, *tensors: seen.append(layer)):
            engine.logits(prompt)
            raise KeyboardInterrupt
    assert seen == list(range(TINY["num_hidden_layers"])) and engine.model.ffn_observer is None


def test_routing_to_fewer_experts_ends_with_its_block(tiny_config, prompt):
    engine = build_synthetic(tiny_config, device="cpu")
    ref = engine.logits(prompt)
    with engine.model.routing_top_k(1):
        one = engine.logits(prompt)
    assert not torch.equal(one, ref) and torch.equal(engine.logits(prompt), ref)


def _routing_share(engine, ids: list[int], top: int) -> float:
    """Share of routing decisions that go to the ``top`` most-chosen experts of each layer."""
    counts = [torch.zeros(TINY["num_experts"]) for _ in range(TINY["num_hidden_layers"])]

    def observe(layer, *tensors):  # (..., topv, topi): the routed experts come last
        counts[layer] += torch.bincount(tensors[-1].reshape(-1), minlength=TINY["num_experts"]).float()

    with engine.model.observing(observe):
        engine.logits(ids)
    return float(sum(c.sort(descending=True).values[:top].sum() / c.sum() for c in counts) / len(counts))


def test_skew_concentrates_routing_on_few_experts(tiny_config):
    ids = random_prompt(build_spec(TINY, where="test"), 128, seed=9)
    flat = _routing_share(build_synthetic(tiny_config, device="cpu"), ids, top=2)
    skewed_engine = build_synthetic(tiny_config, device="cpu", skew=2.0)
    skewed = _routing_share(skewed_engine, ids, top=2)
    assert flat < 0.45  # 2 of 8 experts: about a quarter of the choices when uniform
    assert skewed > flat + 0.25
    # Expert 0 is the hottest, and the profile the store pins by says so.
    sm = SyntheticModel(SyntheticConfig(str(tiny_config), skew=2.0), device=torch.device("cpu"))
    freq = sm.layer_blocks(FULL_K)[0].frequency
    assert list(freq) == sorted(freq, reverse=True) and freq[0] > freq[-1]


def test_memory_tier_blocks_are_the_resident_blocks(tiny_config):
    sm = SyntheticModel(SyntheticConfig(str(tiny_config)), device=torch.device("cpu"))
    layers = sm.layer_blocks(FULL_K)
    nbytes = 3 * (128 // 8) * 64 * 4
    offsets = [lb.offset + pos * nbytes for lb in layers for pos in range(lb.units)]
    tier = sm.tiers()(layers, offsets, nbytes)
    store = sm.resident_store()
    assert torch.equal(tier.block(layers[1].units + 5), store.pool(1)[5])
