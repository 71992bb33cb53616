"""Per-layer operating points (edge_prism.allocation) and the layer sensitivity refactoring
measures for them (edge_prism.refactor.sensitivity)."""

from __future__ import annotations

import itertools
import json
import shutil

import pytest
import torch

from edge_prism.allocation import LayerAllocation
from edge_prism.errors import PrismCheckpointError
from edge_prism.refactor.sensitivity import _curve, grid, windows
from edge_prism.spec import FFNSpec, ModelSpec


def _spec(layers: int, parts: int = 4):
    ffn = FFNSpec(num_experts=1, top_k=1, width=parts * 8, routed=False)
    return ModelSpec(family="llama", vocab_size=10, hidden_size=8, num_layers=layers, num_heads=1, num_kv_heads=1,
                     head_dim=8, rms_norm_eps=1e-5, rope_theta=1e4, max_position=64, tie_word_embeddings=False,
                     attention_bias=False, qk_norm="none", clip_qkv=None, ffn=(ffn,) * layers)


def _values(rows):
    """K = 1..full losses (full: 0) per layer."""
    return [list(r) + [0.0] for r in rows]


def test_uniform_without_sensitivity():
    a = LayerAllocation(_spec(3), [4] * 3)
    assert not a.measured and a.points(2) == [2, 2, 2] and a.points(4) == [4, 4, 4]


def test_points_keep_the_units_and_follow_the_losses():
    # Layer 0 loses ten times what the others do at every K below full.
    rows = [[10.0, 6.0, 3.0], [1.0, 0.6, 0.3], [1.0, 0.6, 0.3]]
    a = LayerAllocation(_spec(3), [4] * 3, _values(rows))
    for k in (1, 2, 3):
        pts = a.points(k)
        assert sum(pts) == 3 * k
        assert pts[0] >= pts[1] and pts[0] >= pts[2]
    assert a.points(2)[0] == 4  # the sensitive layer runs whole
    assert a.points(4) == [4, 4, 4]  # full K is exact everywhere


def test_points_are_the_exact_optimum():
    rows = [[5.0, 2.0, 0.5], [3.0, 2.5, 0.1], [9.0, 1.0, 0.9], [0.5, 0.4, 0.3]]
    a = LayerAllocation(_spec(4), [4] * 4, _values(rows))
    vals = a.values
    for k in (1, 2, 3):
        best = min((sum(vals[j][kk] for j, kk in enumerate(c)), c)
                   for c in itertools.product(range(1, 5), repeat=4) if sum(c) == 4 * k)
        assert a.loss(a.points(k)) == pytest.approx(best[0])


def test_lowest_bounds_the_fixed_points():
    rows = [[9.0, 8.0, 7.0], [0.0, 0.0, 0.0]]
    assert LayerAllocation(_spec(2), [4] * 2, _values(rows)).points(2) == [3, 1]
    a = LayerAllocation(_spec(2), [4] * 2, _values(rows), lowest=2)
    assert a.points(2) == [2, 2]  # layer 1 loses nothing measured, but is not sent below the grid
    assert a.points(3) == [4, 2]
    assert a.points(1) == [1, 1]  # below the lowest K measured: K itself


def test_bad_sensitivity_is_a_clear_error():
    with pytest.raises(PrismCheckpointError, match="layer_sensitivity of layer 1"):
        LayerAllocation(_spec(2), [4] * 2, [[1.0, 0.5, 0.1, 0.0], [1.0, float("nan"), 0.1, 0.0]])
    with pytest.raises(PrismCheckpointError, match="must list 2 layers"):
        LayerAllocation(_spec(2), [4] * 2, [[1.0, 0.5, 0.1, 0.0]])


def test_curve_is_monotone_and_zero_at_full():
    c = _curve({4: 0.06, 6: 0.045, 8: 0.05, 10: 0.02, 12: 0.01, 14: 0.003}, 16)
    assert len(c) == 16 and c[-1] == 0.0
    assert all(a >= b for a, b in zip(c, c[1:]))
    assert c[7] == pytest.approx(0.05) and c[5] == pytest.approx(0.05)  # the dip at 6 lifted to 8's loss
    assert c[0] > c[3]  # grown below the grid
    assert c[10] == pytest.approx((0.02 * 0.01) ** 0.5, abs=1e-6)  # geometric between grid points
    assert c[14] == pytest.approx(0.0015)  # linear from the top grid point to 0 at full


def test_grid_and_windows():
    assert grid(16) == [4, 6, 8, 10, 12, 14]
    assert grid(4) == [1, 2, 3]
    assert grid(1) == []
    ids = torch.arange(1000)
    ws = windows(ids)
    assert len(ws) == 2 and ws[0][0] == 0 and ws[1][-1] == 999 and all(w.numel() == 128 for w in ws)
    assert [w.numel() for w in windows(ids, 50)] == [50, 50]
    assert [w.numel() for w in windows(torch.arange(20))] == [20]


@pytest.mark.parametrize("family", ["llama", "qwen2_moe"])
def test_resumed_prefill_equals_the_forward(tiny_checkpoint, family):
    import edge_prism

    engine = edge_prism.load(tiny_checkpoint(family))
    m = engine.model
    ids = torch.arange(3, 40)
    with torch.inference_mode():
        want = engine.logits(ids)
        logits, inputs = m.prefill_inputs(ids)
        assert torch.equal(logits, want)
        for j in range(m.spec.num_layers):
            assert torch.equal(m.logits_from(j, inputs[j]), want)


def test_refactor_measures_and_load_allocates(prism_of, tmp_path):
    import edge_prism
    from edge_prism.api import memory_report

    path = prism_of("llama", layer_sensitivity=True)
    man = json.loads((path / "prism.json").read_text())
    rec = man["layer_sensitivity"]
    L, full = 2, 16
    assert rec["metric"] == "kl" and rec["grid"] == grid(full) and len(rec["values"]) == L
    for row in rec["values"]:
        assert len(row) == full and row[-1] == 0.0 and all(a >= b for a, b in zip(row, row[1:]))
        assert row[0] > 0.0
    engine = edge_prism.load(path, operating_point=8)
    m = engine.model
    assert m.allocation is not None and m.allocation.measured
    assert sum(m.layer_points) == 8 * L and m.layer_points == m.allocation.points(8)
    uniform = edge_prism.load(path, operating_point=8, layer_allocation=False)
    assert uniform.model.layer_points == [8] * L
    engine.set_operating_point(12)
    assert sum(m.layer_points) == 12 * L
    # at full K the allocation changes nothing: exact
    engine.set_operating_point(full)
    assert m.layer_points == [full] * L
    ids = torch.arange(3, 30)
    assert torch.equal(engine.logits(ids), edge_prism.load(path, layer_allocation=False).logits(ids))
    # a memory budget is planned for the layers' own points
    rep = memory_report(path, edge_prism.RuntimeConfig(operating_point=8, memory_budget="50%"))
    assert rep["fits"]
    # a damaged record is a clear error naming the file
    bad = tmp_path / "bad.prism"
    shutil.copytree(path, bad)
    man["layer_sensitivity"]["values"] = [[1.0]] * L
    (bad / "prism.json").write_text(json.dumps(man))
    with pytest.raises(PrismCheckpointError, match="prism.json: layer_sensitivity of layer 0"):
        edge_prism.load(bad, operating_point=8)


def test_unmeasured_checkpoint_runs_every_layer_at_k(prism_of):
    import edge_prism

    engine = edge_prism.load(prism_of("llama"), operating_point=8)
    assert engine.model.allocation is None and engine.model.layer_points == [8, 8]
