"""DeepSeek-V2 (model_type deepseek_v2) against transformers: multi-head latent attention and its
compressed cache, both attention paths (absorbed, expanded), yarn rotary tables and softmax
scale, group-limited routing, refused configs, and refactoring to a prism (synthetic tiny
weights; the shared parity tests in test_parity.py run both tiny variants too)."""

from __future__ import annotations

import pytest
import torch

import edge_prism
from edge_prism.errors import CorruptCheckpointError, UnsupportedModelError
from edge_prism.families import build_spec
from edge_prism.model import KVCache, MLACache
from test_parity import assert_logits_close, hf_logits

transformers = pytest.importorskip("transformers")

VARIANTS = ["deepseek_v2", "deepseek_v2-grouped"]
PROMPT = list(range(40, 64))  # 24 byte tokens
MORE = [101, 32, 116, 104, 101, 110, 33, 10]  # a continuation fed after PROMPT


@pytest.fixture(scope="module", params=VARIANTS)
def pair(request, tiny_checkpoint):
    """(edge-prism engine, transformers model) of one tiny DeepSeek-V2 variant."""
    path = tiny_checkpoint(request.param)
    reference = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return edge_prism.load(path), reference


def test_cache_holds_latents_not_keys_and_values(pair):
    engine, _ = pair
    s, m = engine.spec, engine.spec.mla
    engine.generate_ids(PROMPT, max_new_tokens=4, temperature=0)
    cache = engine.model.cache
    assert isinstance(cache, MLACache) and not hasattr(cache, "k")
    row = m.kv_lora_rank + m.qk_rope_head_dim  # 32 + 8 per position per layer
    assert cache.nbytes() == s.num_layers * cache.capacity * row * 4  # float32
    expanded = s.num_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim)  # 4 x (16 + 8 + 12)
    assert expanded / row == 144 / 40


@pytest.mark.parametrize("absorb", [True, False])
def test_both_attention_paths_match_transformers(pair, absorb):
    """Prefill, a cached multi-token block (the causal mask over a prefix) and one-token
    decode steps, each through the absorbed or the expanded path."""
    engine, reference = pair
    model = engine.model
    want = hf_logits(reference, PROMPT + MORE)  # [32, V]
    model.mla_absorb = absorb
    try:
        engine.reset()
        got = [model.forward(torch.tensor(PROMPT), all_logits=True),  # [24, V]
               model.forward(torch.tensor(MORE[:5]), all_logits=True)]  # [5, V] over 24 cached
        got += [model.forward(torch.tensor([t])) for t in MORE[5:]]  # 3 x [1, V]
    finally:
        model.mla_absorb = None
        engine.reset()
    assert_logits_close(torch.cat(got).cpu(), want)


def test_decode_takes_the_absorbed_path_and_prefill_the_expanded(pair, monkeypatch):
    import edge_prism.model as model_mod

    engine, _ = pair
    calls: list[tuple[str, int]] = []
    for name in ("_mla_absorbed", "_mla_expanded"):
        real = getattr(model_mod, name)
        monkeypatch.setattr(model_mod, name, lambda *a, _real=real, _name=name: (
            calls.append((_name, a[0].shape[0])), _real(*a))[1])
    engine.generate_ids(PROMPT, max_new_tokens=3, temperature=0)
    layers = engine.spec.num_layers
    assert calls[:layers] == [("_mla_expanded", len(PROMPT))] * layers
    assert calls[layers:] == [("_mla_absorbed", 1)] * (len(calls) - layers)


def test_rotary_tables_and_softmax_scale_are_transformers(pair):
    engine, reference = pair
    model = engine.model
    positions = torch.arange(200)[None]
    freqs = reference.model.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)[0]  # complex [200, R/2]
    model._ensure_rope(200)
    torch.testing.assert_close(model.cos[:200], freqs.real, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.sin[:200], freqs.imag, rtol=0, atol=1e-6)
    attn = reference.model.layers[0].self_attn
    assert engine.spec.mla.softmax_scale == pytest.approx(attn.scaling, rel=1e-12)
    assert attn.scaling != pytest.approx(attn.qk_head_dim ** -0.5)  # mscale really applies


def test_group_limited_routing_is_transformers_router(tiny_checkpoint):
    path = tiny_checkpoint("deepseek_v2-grouped")
    engine = edge_prism.load(path)
    reference = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    x = torch.randn(256, engine.spec.hidden_size, generator=torch.Generator().manual_seed(0))
    for layer in (1, 2):
        topv, topi = engine.model.route(layer, x)  # [T, 3]
        with torch.no_grad():
            _, want_v, want_i = reference.model.layers[layer].mlp.gate(x)  # unsorted top-k
        order, want_order = topi.argsort(-1), want_i.argsort(-1)
        assert torch.equal(topi.gather(1, order), want_i.gather(1, want_order))
        torch.testing.assert_close(topv.gather(1, order), want_v.gather(1, want_order))
        # The limit changes selections (a test of it, not of plain top-k), and the scaling applies.
        plain = torch.softmax(x @ engine.model.w.layers[layer].router.t(), -1).topk(3).indices.sort(-1).values
        assert (plain != topi.sort(-1).values).any(dim=-1).float().mean() > 0.2
        assert float(topv.sum(-1).max()) > 1.0  # x routed_scaling_factor 2.5


def test_first_k_dense_replace_and_moe_layer_freq():
    cfg = dict(model_type="deepseek_v2", hidden_size=64, num_attention_heads=4, num_hidden_layers=6,
               vocab_size=300, intermediate_size=256, moe_intermediate_size=128, n_routed_experts=8,
               num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, moe_layer_freq=2)
    spec = build_spec(cfg, where="config.json")
    assert [f.routed for f in spec.ffn] == [False, False, True, False, True, False]
    assert [f.width for f in spec.ffn][:3] == [256, 256, 128]
    assert spec.ffn[2].shared_width == 128 and spec.ffn[0].shared_width == 0


@pytest.mark.parametrize("change,key", [
    (dict(topk_method="noaux_tc"), "topk_method 'noaux_tc'"),
    (dict(scoring_func="sigmoid"), "scoring_func 'sigmoid'"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(rope_scaling=dict(type="dynamic", factor=2.0)), "rope scaling 'dynamic'"),
])
def test_what_transformers_does_not_compute_is_refused(change, key):
    cfg = dict(model_type="deepseek_v2", hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
               vocab_size=300, intermediate_size=256, moe_intermediate_size=128, n_routed_experts=8,
               num_experts_per_tok=2, **change)
    with pytest.raises(UnsupportedModelError, match=key):
        build_spec(cfg, where="config.json")


def test_group_limited_without_groups_names_the_keys():
    cfg = dict(model_type="deepseek_v2", hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
               vocab_size=300, intermediate_size=256, moe_intermediate_size=128, n_routed_experts=8,
               num_experts_per_tok=2, topk_method="group_limited_greedy", n_group=3, topk_group=1)
    with pytest.raises(CorruptCheckpointError, match="n_group dividing n_routed_experts"):
        build_spec(cfg, where="config.json")


def test_other_families_keep_their_cache(tiny_engines):
    assert isinstance(tiny_engines("qwen2_moe").model.cache, KVCache)


@pytest.mark.parametrize("variant", VARIANTS)
def test_refactor_cli_and_prism_exact_at_full_k(variant, tiny_checkpoint, tmp_path):
    from edge_prism.cli import main

    path, out = tiny_checkpoint(variant), tmp_path / "ds.prism"
    assert main(["refactor", str(path), "--out", str(out), "--calib-tokens", "384", "--quant", "none"]) == 0
    plain, prism = edge_prism.load(path), edge_prism.load(out)
    assert isinstance(prism.model.cache, MLACache)
    assert_logits_close(prism.logits(PROMPT), plain.logits(PROMPT))
    assert prism.generate_ids(PROMPT, max_new_tokens=8, temperature=0) == \
        plain.generate_ids(PROMPT, max_new_tokens=8, temperature=0)
    full = prism.model.operating_point  # 8 parts x top-k
    lower = edge_prism.load(out, operating_point=full // 2)
    low = lower.logits(PROMPT)
    assert torch.isfinite(low).all() and not torch.allclose(low, plain.logits(PROMPT), rtol=0, atol=1e-3)


def test_quantized_prism_tracks_its_dequantization(prism_of):
    """refactor --quant int4 quantizes kv_b_proj too: attention then expands keys and values
    through the int4 kernel (no absorption) and must agree with the float engine over the
    same dequantized weights (within the int4 kernels' bfloat16 rounding, see test_parity)."""
    from edge_prism.kernels import QuantLinear

    path = prism_of("deepseek_v2-grouped", quant="int4", group_size=32, sub_experts=4)
    q, f = edge_prism.load(path), edge_prism.load(path, dequantize=True)
    assert isinstance(q.model.w.layers[1].mla.kv_b, QuantLinear)
    ids = PROMPT + MORE
    got, want = q.logits(ids), f.logits(ids)
    assert float((got - want).norm() / want.norm()) < 0.05
    assert float((got.argmax(-1) == want.argmax(-1)).float().mean()) >= 0.9
    assert len(q.generate_ids(PROMPT, max_new_tokens=4, temperature=0)) > 0  # decode over a quantized kv_b


@pytest.mark.parametrize("variant", VARIANTS)
def test_memory_budget_prefetch_and_latency_budget_keep_the_output(variant, prism_of, min_budget):
    """Sub-experts streamed under the smallest budget with prefetching (later layers' group-
    limited routers predicted), and a generous token-latency budget, change nothing."""
    path = prism_of(variant)
    resident = edge_prism.load(path)
    want, want_ids = resident.logits(PROMPT), resident.generate_ids(PROMPT, max_new_tokens=8, temperature=0)
    for options in (dict(memory_budget=min_budget(path), prefetch=True), dict(token_latency_ms=1e6)):
        engine = edge_prism.load(path, **options)
        torch.testing.assert_close(engine.logits(PROMPT), want, rtol=1e-5, atol=1e-5)
        assert engine.generate_ids(PROMPT, max_new_tokens=8, temperature=0) == want_ids
    assert engine.stats["dropped_subexperts"] == 0


def test_latency_budget_on_a_low_rank_query_model(tiny_checkpoint):
    # The cost model's start-up timing takes wo's input width from the spec (MLA: v_head_dim).
    engine = edge_prism.load(tiny_checkpoint("deepseek_v2-grouped"), token_latency_ms=1e6)
    assert engine.generate_ids(list(range(5, 15)), max_new_tokens=3, temperature=0)
    assert engine.stats["dropped_subexperts"] == 0
