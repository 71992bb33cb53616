"""Dynamic degradation against fixed operating points (edge_prism.degrade), on a tiny prism:
the rows are consistent; timings are not asserted."""

from __future__ import annotations

import pytest

from edge_prism.degrade import DegradeConfig, compare, plot, table


def test_compare_rows_and_table(prism_of, tmp_path):
    path = prism_of("olmoe")
    cfg = DegradeConfig(model=path, memory_budget="60%", prompt_tokens=8, decode_tokens=10, warmup_tokens=2,
                        operating_points=(16, 12, 8), budgets=2, extra_budgets=(1000.0,))
    rows = compare(cfg, progress=lambda _: None)
    ref = rows[0]
    assert ref.kind == "reference" and ref.operating_point == 16 and ref.kl == 0.0 and ref.agreement == 1.0
    fixed = {r.operating_point: r for r in rows if r.kind == "fixed"}
    assert set(fixed) == {16, 12, 8} and all(r.kl >= 0 for r in fixed.values())
    dynamic = [r for r in rows if r.kind == "dynamic"]
    # budgets=2: the fastest fixed K's p50 and the reference's (one row when timing noise makes
    # full K the fastest), then 1000 x the reference's p50
    fastest = min(r.p50_ms for r in fixed.values())
    expected = sorted({round(b, 3) for b in (fastest, ref.p50_ms, 1000.0 * ref.p50_ms)})
    assert [r.latency_budget_ms for r in dynamic] == pytest.approx(expected)
    generous = max(dynamic, key=lambda r: r.latency_budget_ms)  # 1000 x the reference's p50
    assert generous.within_budget == 1.0 and generous.dropped_per_token == 0.0 and generous.kl < 1e-9
    for r in dynamic:
        if r.best_fixed_k is not None:  # the largest K whose median latency meets the budget
            assert fixed[r.best_fixed_k].p50_ms <= r.latency_budget_ms
            assert all(f.p50_ms > r.latency_budget_ms for k, f in fixed.items() if k > r.best_fixed_k)
        if r.best_within_k is not None:  # 95% within the budget implies a median within it
            assert r.best_fixed_k is not None and r.best_within_k <= r.best_fixed_k
    text = table(rows)
    assert "best fixed K" in text and "| 12 |" in text
    plot(rows, tmp_path / "q.png", "test")
    assert (tmp_path / "q.png").stat().st_size > 0
