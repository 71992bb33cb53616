"""Memory budgets: output never depends on the budget; resident bytes never exceed it;
too-small budgets fail at load with the minimum (synthetic tiny weights)."""

from __future__ import annotations

import pytest
import torch

import edge_prism
from edge_prism.cli import main
from edge_prism.errors import BudgetError, ConfigError

PROMPT = list(range(70, 94))
FAMILIES = ["llama", "qwen2_moe-mlp_only_layers", "olmoe"]


@pytest.fixture(scope="module")
def resident(prism_of):
    cache = {}

    def get(family, **kw):
        key = (family, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = edge_prism.load(prism_of(family), **kw)
        return cache[key]

    return get


def _total(path) -> int:
    return (path / "experts.safetensors").stat().st_size  # blocks dominate; order tensors are tiny


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.25, 0.5, 1.0])
def test_output_does_not_depend_on_the_budget(family, fraction, prism_of, resident, min_budget):
    path = prism_of(family)
    # Every budget from the minimum up (a dense model at full K needs a whole layer).
    budget = max(min_budget(path), int(fraction * _total(path)))
    ref = resident(family)
    engine = edge_prism.load(path, memory_budget=budget)
    torch.testing.assert_close(engine.logits(PROMPT), ref.logits(PROMPT), rtol=1e-5, atol=1e-5)
    assert engine.generate_ids(PROMPT, max_new_tokens=10) == ref.generate_ids(PROMPT, max_new_tokens=10)
    stats = engine.stats
    assert 0 < stats["resident_bytes"] <= stats["memory_budget_bytes"]
    assert stats["hits"] + stats["misses"] > 0


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_lower_operating_point_under_budget_is_exact(policy, prism_of, resident):
    path = prism_of("olmoe")
    ref = resident("olmoe", operating_point=5)
    engine = edge_prism.load(path, operating_point=5, memory_budget="20%", policy=policy)
    torch.testing.assert_close(engine.logits(PROMPT), ref.logits(PROMPT), rtol=1e-5, atol=1e-5)
    assert engine.generate_ids(PROMPT, max_new_tokens=10) == ref.generate_ids(PROMPT, max_new_tokens=10)


def test_small_budget_misses_and_moves_bytes(prism_of, min_budget):
    engine = edge_prism.load(prism_of("olmoe"), memory_budget=min_budget(prism_of("olmoe")))
    engine.generate_ids(PROMPT, max_new_tokens=6)
    s = engine.stats
    assert s["misses"] > 0 and s["bytes_to_device"] > 0
    assert s["token_latency_p50_ms"] > 0 and s["token_latency_p99_ms"] >= s["token_latency_p50_ms"]


def test_full_budget_never_misses(prism_of):
    engine = edge_prism.load(prism_of("olmoe"), memory_budget="100%")
    engine.generate_ids(PROMPT, max_new_tokens=6)
    assert engine.stats["misses"] == 0 and engine.stats["hit_rate"] == 1.0


def test_pool_is_preallocated_within_budget(prism_of):
    engine = edge_prism.load(prism_of("olmoe"), memory_budget="30%")
    store = engine.model.store
    pool_bytes = sum(p.pool.buffer.numel() * p.pool.buffer.element_size() for p in store._pools.values())
    assert pool_bytes <= engine.stats["memory_budget_bytes"]
    ptrs = [p.pool.buffer.data_ptr() for p in store._pools.values()]
    engine.generate_ids(PROMPT, max_new_tokens=4)
    assert [p.pool.buffer.data_ptr() for p in store._pools.values()] == ptrs


def test_budget_below_minimum_fails_at_load(prism_of, min_budget):
    path = prism_of("olmoe")
    low = min_budget(path) - 1
    with pytest.raises(BudgetError, match=f"minimum is .*\\({low + 1} bytes\\)"):
        edge_prism.load(path, memory_budget=low)


def test_bad_budget_text_is_refused(prism_of):
    with pytest.raises(ConfigError, match="memory budget"):
        edge_prism.load(prism_of("olmoe"), memory_budget="lots")


def test_auto_budget_loads(prism_of):
    engine = edge_prism.load(prism_of("olmoe"), memory_budget="auto")
    assert engine.stats["memory_budget_bytes"] > 0


def test_cli_budget_below_minimum_exits_2(prism_of, capsys):
    code = main(["chat", "-m", str(prism_of("olmoe")), "--prompt", "hi", "-n", "2", "--memory-budget", "1KiB"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "minimum is" in err and err.count("\n") == 1


def test_cli_chat_with_budget_prints_runtime_summary(prism_of, capsys):
    code = main(["chat", "-m", str(prism_of("olmoe")), "--prompt", "the", "-n", "4", "-t", "0",
                 "--memory-budget", "25%"])
    err = capsys.readouterr().err
    assert code == 0 and "hit rate" in err and "resident" in err
