"""Soak: 2000 generated tokens on the default model's prism under a 25% memory budget.

Host memory stays flat after warm-up (within 5%: no leak per token, per generation or per
transfer), and the resident sub-expert bytes never exceed the budget at any token. Slow:
run with ``pytest -m slow tests/test_soak.py -s`` (it prints its figures). It builds the
default prism in the test cache first (minutes); ``EDGE_PRISM_SOAK_PRISM=DIR`` runs it on
an existing copy instead.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import psutil
import pytest

import edge_prism

pytestmark = pytest.mark.slow

QUESTIONS = ["Tell me about the history of the bicycle.", "How do volcanoes form?",
             "Write a short poem about the sea.", "Explain what a hash table is.",
             "What should I pack for a week of hiking?", "Why do cats purr?",
             "Describe how bread rises.", "What is the difference between weather and climate?"]


def test_soak_2000_tokens_at_a_quarter_budget():
    from edge_prism.api import default_prism

    given = os.environ.get("EDGE_PRISM_SOAK_PRISM")
    path = Path(given) if given else default_prism(progress=False)
    process = psutil.Process()
    rss: list[int] = []
    generated, decode_s, worst, turn = 0, 0.0, 0, 0
    started = time.perf_counter()
    # Prefetch on (the default on GPUs): speculative loads, cancellations and promotions run
    # beside the demand loads, the path with the most moving parts.
    with edge_prism.load(path, memory_budget="25%", prefetch=True) as engine:
        store = engine.model.store
        budget = store.budget_bytes
        while generated < 2000:
            messages = [{"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]}]
            for _piece in engine.stream_chat(messages, max_new_tokens=128, temperature=0.8, seed=turn):
                worst = max(worst, store.resident_bytes())
            stats = engine.stats
            assert stats["resident_bytes"] <= stats["memory_budget_bytes"] == budget
            if turn >= 2:  # warm-up: allocator, page cache, slots in their steady state
                generated += stats["generated_tokens"]
                decode_s += stats["generated_tokens"] / max(stats["decode_tokens_per_s"], 1e-9)
                rss.append(process.memory_info().rss)
            engine.reset()
            turn += 1
        hit_rate, precision = stats["hit_rate"], stats["prefetch_precision"]
    assert worst <= budget
    low, high = min(rss), max(rss)
    print(f"\nsoak: {generated} tokens in {turn - 2} replies after warm-up, "
          f"{generated / decode_s:.1f} decode tokens/s, wall {time.perf_counter() - started:.0f} s; "
          f"RSS {low / 2**20:.1f}-{high / 2**20:.1f} MiB (x{high / low:.3f}); resident at most "
          f"{worst / 2**20:.2f} MiB of a {budget / 2**20:.2f} MiB budget; last reply: hit rate {hit_rate:.0%}, "
          f"prefetch precision {precision:.0%}")
    assert high <= 1.05 * low, f"RSS grew from {low} to {high} bytes"
