"""The memory-budget sweep: every system at every budget and operating point, written as a
CSV and a plot, with honest baselines (synthetic tiny weights; timings are never asserted)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from edge_prism.errors import BudgetError
from edge_prism.runtime.store import BudgetedStore, LayerBlocks
from edge_prism.runtime.transfer import MemoryTier
from edge_prism.sweep import main, run_sweep
from edge_prism.sweep_baselines import ExpertLRUStore, SubExpertLRUStore
from edge_prism.sweep_config import COLUMNS
from edge_prism.sweep_report import format_table, plot, read_csv, write_csv
from edge_prism.synthetic import SyntheticConfig

TINY = dict(model_type="olmoe", vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, num_experts=8, num_experts_per_tok=2,
            max_position_embeddings=256)
BUDGETS = ["30%", "60%", "100%"]
POINTS = [16, 12]  # full K (top-2 x 8 sub-experts) and one lower
# One compute thread: a CPU shared with other test processes stalls multi-threaded kernels.
SWEEP = dict(memory_budgets=BUDGETS, operating_points=POINTS, new_tokens=6, prompt_tokens=12, device="cpu",
             threads=1)
EXPECTED = ("system", "memory_budget", "operating_point", "tokens_per_s", "ttft_s", "hit_rate",
            "bytes_per_token", "p50_ms", "p99_ms", "perplexity", "synthetic", "device")


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sweep") / "config.json"
    path.write_text(json.dumps(TINY))
    return path


@pytest.fixture(scope="module")
def synthetic_rows(tiny_config):
    return run_sweep(None, synthetic=SyntheticConfig(str(tiny_config), skew=1.0), **SWEEP)


def by_key(rows):
    return {(r.system, r.memory_budget, r.operating_point): r for r in rows}


def budgeted_systems() -> list[str]:
    return ["edge-prism", "subexpert-lru", "expert-lru", "bound", "edge-prism+prefetch"]


# -- rows, CSV and plot ------------------------------------------------------------------------
def test_every_system_has_a_row_at_every_budget_and_point(synthetic_rows):
    rows = by_key(synthetic_rows)
    for k in POINTS:
        assert ("all-resident", "all", k) in rows
        for budget in BUDGETS:
            for system in budgeted_systems():
                r = rows[(system, budget, k)]
                assert r.tokens_per_s and r.tokens_per_s > 0, (system, budget, k)
                assert 0.0 <= r.hit_rate <= 1.0 and r.bytes_per_token >= 0
    skipped = [r for r in synthetic_rows if r.system == "transformers+accelerate"]
    assert skipped and all("CUDA" in r.note for r in skipped), "on the CPU the baseline says why it is skipped"


def test_rows_say_synthetic_and_the_device(synthetic_rows):
    assert all(r.synthetic and r.device == "cpu (1 thread)" for r in synthetic_rows)


def test_csv_has_the_columns_and_reads_back(synthetic_rows, tmp_path):
    out = tmp_path / "sub" / "sweep.csv"
    write_csv(synthetic_rows, out)
    with open(out, newline="") as f:
        reader = csv.DictReader(f)
        assert set(EXPECTED) <= set(reader.fieldnames) and tuple(reader.fieldnames) == COLUMNS
        raw = list(reader)
    assert len(raw) == len(synthetic_rows) and all(r["synthetic"] == "True" for r in raw)
    assert read_csv(out) == synthetic_rows
    assert [p.name for p in out.parent.iterdir()] == ["sweep.csv"], "no temporary file left behind"


def test_plot_writes_a_png(synthetic_rows, tmp_path):
    out = tmp_path / "sweep.png"
    plot(synthetic_rows, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_full_budget_never_misses_and_full_k_traffic_is_equal(synthetic_rows):
    rows = by_key(synthetic_rows)
    for system in ("edge-prism", "subexpert-lru", "expert-lru"):
        assert rows[(system, "100%", 16)].hit_rate == 1.0
        assert rows[(system, "100%", 16)].bytes_per_token == 0.0
    # At full K every part of a routed expert is wanted: whole-expert residency changes nothing.
    assert rows[("expert-lru", "30%", 16)].bytes_per_token == rows[("subexpert-lru", "30%", 16)].bytes_per_token


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("k", POINTS)
def test_expert_lru_moves_at_least_what_subexpert_lru_moves(synthetic_rows, budget, k):
    rows = by_key(synthetic_rows)
    assert rows[("expert-lru", budget, k)].bytes_per_token >= rows[("subexpert-lru", budget, k)].bytes_per_token


def test_bound_is_never_slower_than_all_resident_compute(synthetic_rows):
    rows = by_key(synthetic_rows)
    for r in synthetic_rows:
        if r.system == "bound":
            assert r.tokens_per_s <= rows[("all-resident", "all", r.operating_point)].tokens_per_s + 1e-9


# -- the baseline stores ---------------------------------------------------------------------
S, D, N = 4, 8, 2  # parts per expert, hidden, neurons per part


def tiny_store(cls, *, experts: int = 4, max_selection: int = S, slots: int = 2 * S):
    blocks = torch.arange(experts * S * 3 * N * D, dtype=torch.float32).view(experts * S, 3, N, D)
    nbytes = 3 * N * D * 4
    lb = LayerBlocks(layer=0, parts=S, units=experts * S, block_shape=(3, N, D), dtype=torch.float32,
                     offset=0, order=range(experts * S), frequency=[1.0] * (experts * S),
                     max_selection=max_selection)
    store = cls(lambda group, offsets, n: MemoryTier(blocks), [lb], budget_bytes=slots * nbytes,
                device=torch.device("cpu"))
    return store, blocks, nbytes


def test_expert_lru_loads_whole_experts_and_returns_the_right_slots():
    store, blocks, nbytes = tiny_store(ExpertLRUStore)
    store.reset_stats()
    units = torch.tensor([3 * S + 1, 3 * S + 2])  # two parts of expert 3, not resident after warm-up
    slots = store.slots(0, units)
    assert store.stats.misses == S and store.stats.bytes_to_device == S * nbytes
    torch.testing.assert_close(store.pool(0)[slots], blocks[units])
    store.done(0)
    store.close()


def test_subexpert_lru_loads_only_what_is_asked():
    store, blocks, nbytes = tiny_store(SubExpertLRUStore)
    store.reset_stats()
    units = torch.tensor([3 * S + 1, 3 * S + 2])
    slots = store.slots(0, units)
    assert store.stats.bytes_to_device == 2 * nbytes
    torch.testing.assert_close(store.pool(0)[slots], blocks[units])
    store.done(0)
    store.close()


def test_lru_baselines_have_no_pinned_region():
    ours, *_ = tiny_store(BudgetedStore, experts=8, slots=6 * S)
    lru, *_ = tiny_store(SubExpertLRUStore, experts=8, slots=6 * S)
    assert lru.capacity(0) == 6 * S > ours.capacity(0)
    ours.close()
    lru.close()


def test_expert_lru_below_its_minimum_is_refused():
    with pytest.raises(BudgetError, match="minimum"):
        tiny_store(ExpertLRUStore, max_selection=2 * S, slots=S)


# -- command line ------------------------------------------------------------------------------
def test_cli_prints_a_synthetic_table_and_writes_files(tiny_config, tmp_path, capsys):
    out, png = tmp_path / "s.csv", tmp_path / "s.png"
    threads = torch.get_num_threads()
    assert main(["--synthetic", str(tiny_config), "--device", "cpu", "--threads", "1",
                 "--memory-budgets", "50%", "-n", "3", "--prompt-tokens", "8", "--no-baselines",
                 "--out", str(out), "--plot", str(png)]) == 0
    assert torch.get_num_threads() == threads, "--threads applies during the sweep only"
    table = capsys.readouterr().out
    assert "SYNTHETIC" in table and "edge-prism (synthetic)" in table
    assert {r.system for r in read_csv(out)} <= {"edge-prism", "edge-prism+prefetch"} and png.exists()


@pytest.mark.parametrize("argv, message", [
    (["--memory-budgets", "lots"], "invalid memory budget"),
    (["--memory-budgets", "1%"], None),  # below the minimum: a row that says so, not a crash
    (["--operating-points", "99"], "invalid operating point"),
    (["--layers", "2"], "--synthetic models only"),
])
def test_cli_errors_are_one_line(argv, message, tiny_config, capsys):
    syn = [] if "--layers" in argv else ["--synthetic", str(tiny_config)]
    code = main([*syn, "--device", "cpu", "--threads", "1", "-n", "2", "--prompt-tokens", "4", "--no-baselines",
                 *argv])
    err = capsys.readouterr()
    if message is None:
        assert code == 0 and "not run" in err.out
    else:
        assert code == 2 and err.err.startswith("error: ") and message in err.err


# -- a real prism checkpoint -------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_prism(tiny_checkpoint, tmp_path_factory) -> Path:
    """A tiny OLMoE prism checkpoint (quick refactor: contiguous parts), with a quality curve."""
    from edge_prism.refactor.refactor import RefactorConfig, refactor

    out = tmp_path_factory.mktemp("sweep-prism") / "olmoe.prism"
    # every layer at K, so the 30% memory budget holds K=12's largest layer selection
    cfg = RefactorConfig(calib_tokens=64, rows_per_expert=64, seq_len=64, solver="contiguous",
                         layer_sensitivity=False)
    refactor(tiny_checkpoint("olmoe"), out, cfg, progress=False)
    (out / "quality.json").write_text(json.dumps([
        {"operating_point": 16, "perplexity": 300.5, "curve": "prism"},
        {"operating_point": 12, "perplexity": 310.25, "curve": "prism"}]))
    return out


def test_prism_sweep_measures_real_text_with_quality(tiny_prism, tmp_path):
    rows = run_sweep(tiny_prism, **{**SWEEP, "memory_budgets": ["30%"]})
    keyed = by_key(rows)
    for k, ppl in ((16, 300.5), (12, 310.25)):
        assert keyed[("all-resident", "all", k)].perplexity == ppl
        for system in budgeted_systems():
            assert keyed[(system, "30%", k)].tokens_per_s > 0
            assert keyed[(system, "30%", k)].perplexity == ppl
        assert (keyed[("expert-lru", "30%", k)].bytes_per_token
                >= keyed[("subexpert-lru", "30%", k)].bytes_per_token)
    assert not any(r.synthetic for r in rows)
    write_csv(rows, tmp_path / "prism.csv")
    assert read_csv(tmp_path / "prism.csv") == rows


def test_prism_sweep_has_latency_budget_rows(tiny_prism):
    rows = run_sweep(tiny_prism, **{**SWEEP, "memory_budgets": ["30%"], "operating_points": [16]})
    lat = {r.system: r for r in rows if r.latency_budget_ms is not None}
    assert set(lat) == {"edge-prism+latency x0.7", "edge-prism+latency x3"}
    base = next(r for r in rows if r.system == "edge-prism+prefetch")
    for factor, r in ((0.7, lat["edge-prism+latency x0.7"]), (3.0, lat["edge-prism+latency x3"])):
        assert r.latency_budget_ms == pytest.approx(factor * base.p50_ms)
        assert 0.0 <= r.within_budget <= 1.0 and r.dropped_per_token >= 0
        assert r.kl_vs_full >= -1e-6 and 0.0 <= r.same_tokens <= 1.0
    assert "token-latency budget" in format_table(rows)
