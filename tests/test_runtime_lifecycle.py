"""The runtime's life cycle and the fixes of issue 11 that need no adversarial timing: close()
and `with`, one generation at a time, every documented stats key, memory accounting checked
before anything is allocated, compute-dtype tiers, the integrated-GPU path, the float16
residual stream, positioned reads without pread, the cost-model cache location, events
made once, timings after a sync, predictions queued ahead of the FFN kernel."""

from __future__ import annotations

import gc
import logging
import os
import subprocess
import sys
import threading
import weakref
from pathlib import Path

import pytest
import torch

import edge_prism
from edge_prism.api import RuntimeConfig, memory_report
from edge_prism.cli import main
from edge_prism.errors import BudgetError, ConfigError, EngineBusyError
from edge_prism.runtime import device as devicelib
from edge_prism.runtime import transfer as transferlib
from edge_prism.runtime.device import emulate
from edge_prism.runtime.store import BudgetedStore
from edge_prism.runtime.transfer import FileTier, MemoryTier, SlotPool, Transferer

CPU = torch.device("cpu")
PROMPT = list(range(70, 94))
GREEDY = dict(max_new_tokens=8, temperature=0)


@pytest.fixture(scope="module")
def olmoe(prism_of):
    return prism_of("olmoe")


@pytest.fixture(scope="module")
def want(olmoe):
    return edge_prism.load(olmoe).generate_ids(PROMPT, **GREEDY)


def _transfer_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith(("edge-prism-transfer", "edge-prism-prefetch"))}


# -- close() and `with` (C15) -----------------------------------------------------------------------
def test_with_releases_threads_pools_and_refuses_later_use(olmoe, min_budget, want):
    before = _transfer_threads()
    with edge_prism.load(olmoe, memory_budget=min_budget(olmoe)) as engine:
        assert engine.generate_ids(PROMPT, **GREEDY) == want
        assert _transfer_threads() - before
        pools = [p.pool for p in engine.model.store._pools.values()]
    assert not (_transfer_threads() - before)
    assert all(p.buffer is None for p in pools)
    assert engine.stats["generated_tokens"] == len(want)  # the last figures stay readable
    with pytest.raises(EngineBusyError, match="closed"):
        engine.generate_ids(PROMPT, **GREEDY)
    engine.close()  # idempotent


def test_an_engine_dropped_without_close_is_freed(olmoe, min_budget):
    """No reference cycle (model <-> prefetcher, transferer <-> threads) keeps it alive."""
    before = _transfer_threads()
    engine = edge_prism.load(olmoe, memory_budget=min_budget(olmoe), prefetch=True)
    engine.generate_ids(PROMPT, **GREEDY)
    model = weakref.ref(engine.model)
    del engine
    gc.collect()
    assert model() is None
    for t in _transfer_threads() - before:
        t.join(timeout=5)
    assert not (_transfer_threads() - before)


# -- one generation at a time (tester item 2) ---------------------------------------------------------
def test_threads_sharing_an_engine_get_their_own_replies(olmoe, min_budget):
    engine = edge_prism.load(olmoe, memory_budget=min_budget(olmoe))
    prompts = [PROMPT[i:] + PROMPT[:i] for i in range(0, 24, 6)]
    refs = [engine.generate_ids(p, max_new_tokens=10, temperature=0) for p in prompts]
    got: dict[int, list] = {}
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            for _ in range(3):
                got.setdefault(i, []).append(engine.generate_ids(prompts[i], max_new_tokens=10, temperature=0))
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, ref in enumerate(refs):
        assert got[i] == [ref] * 3


def test_an_open_stream_holds_the_engine(olmoe):
    engine = edge_prism.load(olmoe)
    text = "".join(chr(i) for i in PROMPT)
    stream = engine.stream(text, max_new_tokens=6, temperature=0)
    next(stream)
    with pytest.raises(EngineBusyError, match="close it first"):
        engine.generate(text, max_new_tokens=2)  # this thread: refused, not mixed in
    other: list[str] = []
    worker = threading.Thread(target=lambda: other.append(engine.generate(text, max_new_tokens=6, temperature=0)))
    worker.start()
    worker.join(timeout=0.5)
    assert worker.is_alive()  # another thread waits for the stream
    stream.close()
    worker.join(timeout=30)
    assert other and other[0] == engine.generate(text, max_new_tokens=6, temperature=0)


# -- stats keys (tester item 8) -------------------------------------------------------------------------
GENERATION_KEYS = {"prompt_tokens", "reused_prompt_tokens", "generated_tokens", "time_to_first_token_s",
                   "decode_tokens_per_s", "token_latency_p50_ms", "token_latency_p99_ms"}
BUDGET_KEYS = {"memory_budget_bytes", "resident_bytes", "hits", "misses", "hit_rate", "bytes_to_device",
               "transfer_wait_s", "prefetch_issued", "prefetch_used", "prefetch_cancelled",
               "prefetched_unused_bytes", "prefetch_late", "bytes_in_place", "prefetch_precision", "prefetch_recall"}
LATENCY_KEYS = {"token_latency_budget_ms", "dropped_subexperts", "dropped_subexperts_per_token",
                "tokens_within_budget", "cpu_computed_subexperts"}


@pytest.mark.parametrize("config", ["plain", "prism", "budget", "budget+latency"])
def test_every_documented_stats_key_is_there(config, tiny_checkpoint, olmoe, min_budget):
    if config == "plain":
        engine, keys = edge_prism.load(tiny_checkpoint("olmoe")), GENERATION_KEYS
    elif config == "prism":
        engine, keys = edge_prism.load(olmoe), GENERATION_KEYS
    elif config == "budget":
        engine, keys = edge_prism.load(olmoe, memory_budget=min_budget(olmoe)), GENERATION_KEYS | BUDGET_KEYS
    else:
        engine = edge_prism.load(olmoe, memory_budget=min_budget(olmoe), token_latency_ms=10_000)
        keys = GENERATION_KEYS | BUDGET_KEYS | LATENCY_KEYS
    engine.generate_ids(PROMPT, max_new_tokens=12, temperature=0, seed=0)
    stats = engine.stats
    assert keys <= set(stats), sorted(keys - set(stats))
    assert stats["token_latency_p50_ms"] <= stats["token_latency_p99_ms"]
    if "resident_bytes" in keys:
        assert stats["resident_bytes"] <= stats["memory_budget_bytes"]


# -- memory accounting (C5, item 3) ----------------------------------------------------------------------
def test_memory_report_counts_every_item(olmoe, min_budget):
    r = memory_report(olmoe, RuntimeConfig(memory_budget=2 * min_budget(olmoe), max_context=200))
    for key in ("dense_bytes", "kv_cache_bytes", "kv_growth_bytes", "workspace_bytes", "slot_pool_bytes",
                "host_tier_bytes", "staging_bytes", "device_total_bytes", "device_free_bytes", "fits"):
        assert key in r
    assert 0 < r["slot_pool_bytes"] <= r["memory_budget_bytes"] == 2 * min_budget(olmoe)
    assert r["max_context"] == 200 and r["fits"] and r["unified"]
    engine = edge_prism.load(olmoe, memory_budget=2 * min_budget(olmoe), max_context=200)
    assert engine.model.store.slot_bytes() == r["slot_pool_bytes"]
    assert memory_report(engine)["slot_pool_bytes"] == r["slot_pool_bytes"]


def test_kv_cache_growth_is_counted(tiny_checkpoint):
    """The cache grows by doubling with both copies alive: a long context costs more than its
    own positions at the worst moment (a prefill to max_context - 1, then one more token)."""
    from edge_prism.runtime.accounting import kv_positions

    path = tiny_checkpoint("llama", max_position_embeddings=4096)
    short = memory_report(path, RuntimeConfig(max_context=256))
    long = memory_report(path, RuntimeConfig(max_context=4096))
    assert long["kv_cache_bytes"] == 16 * short["kv_cache_bytes"]
    assert short["kv_growth_bytes"] == 0
    assert long["kv_growth_bytes"] == 2 * long["kv_cache_bytes"] - 3 * long["kv_cache_bytes"] // 4096
    assert kv_positions(4096) == (8190, 4095 + 8190) and kv_positions(100) == (256, 256)
    engine = edge_prism.load(path, max_context=4096)
    per = engine.model.cache.nbytes() // engine.model.cache.capacity
    assert long["kv_cache_bytes"] == 4096 * per  # the model's own cache, measured


def test_auto_budget_leaves_room_for_the_rest(olmoe):
    with emulate(free_memory=11 * 2**20):  # a small discrete GPU: the long prefill takes ~9 MiB
        small = memory_report(olmoe, RuntimeConfig(memory_budget="auto", max_context=64))
        large = memory_report(olmoe, RuntimeConfig(memory_budget="auto", max_context=256))
    assert large["memory_budget_bytes"] < small["memory_budget_bytes"]
    for r in (small, large):
        assert r["fits"] and r["device_total_bytes"] <= 0.9 * r["device_free_bytes"] + 1


def test_a_budget_that_does_not_fit_fails_before_allocating(olmoe, monkeypatch, caplog):
    built = []
    monkeypatch.setattr(BudgetedStore, "__init__", lambda *a, **k: built.append(1))
    with emulate(free_memory=4 * 2**20):
        with pytest.raises(BudgetError, match="--max-context"):
            edge_prism.load(olmoe, memory_budget="auto")
        with pytest.raises(BudgetError, match="needs .* of device memory"):
            edge_prism.load(olmoe, memory_budget="50%", max_context=4096)
    assert not built
    caplog.set_level(logging.INFO, logger="edge_prism.api")
    with emulate(free_memory=2**30):
        monkeypatch.undo()
        edge_prism.load(olmoe, memory_budget="50%", max_context=256).close()
    assert any("KV cache" in r.getMessage() for r in caplog.records)  # what -v shows at load


# -- compute dtype in slots and tiers (C6) -----------------------------------------------------------------
def test_float_blocks_are_held_in_the_compute_dtype(olmoe, min_budget):
    ref = edge_prism.load(olmoe, dtype="bfloat16")
    engine = edge_prism.load(olmoe, dtype="bfloat16", memory_budget=min_budget(olmoe))
    assert engine.model.store.pool(0).dtype == torch.bfloat16
    r = memory_report(olmoe, RuntimeConfig(dtype="bfloat16", memory_budget="100%"))
    assert r["slot_pool_bytes"] * 2 == memory_report(olmoe, RuntimeConfig(memory_budget="100%"))["slot_pool_bytes"]
    want = ref.logits(PROMPT)  # same bfloat16 weights; sums in another order under the budget
    torch.testing.assert_close(engine.logits(PROMPT), want, rtol=0, atol=0.02 * float(want.abs().max()))


# -- host tiers: discrete, integrated, forced (C3, C17) ------------------------------------------------------
@pytest.mark.parametrize("integrated,host,kind", [(False, "auto", MemoryTier), (True, "auto", FileTier),
                                                 (False, "disk", FileTier), (True, "ram", MemoryTier)])
def test_host_tier_follows_the_memory_architecture(olmoe, min_budget, want, integrated, host, kind):
    with emulate(latency_s=0.0005, integrated=integrated):
        with edge_prism.load(olmoe, memory_budget=min_budget(olmoe), host_tier=host) as engine:
            tier = next(iter(engine.model.store._pools.values())).transfer.tier
            assert isinstance(getattr(tier, "tier", tier), kind)
            assert engine.generate_ids(PROMPT, **GREEDY) == want
            report = memory_report(engine)
            assert report["unified"] is integrated
            assert (report["host_tier_bytes"] > 0) is (kind is MemoryTier)


def test_cli_takes_host_tier_and_cuda_ordinals(olmoe, capsys):
    from edge_prism.cli import build_parser, runtime_config

    parser, _ = build_parser()
    args = parser.parse_args(["chat", "-m", str(olmoe), "--host-tier", "disk", "--device", "cuda:1",
                              "--max-context", "512"])
    cfg = runtime_config(args)
    assert (cfg.host_tier, cfg.device, cfg.max_context) == ("disk", "cuda:1", 512)
    if not torch.cuda.is_available():
        assert main(["chat", "-m", str(olmoe), "--device", "cuda:1", "--prompt", "hi"]) == 2
        assert capsys.readouterr().err.startswith("error: device 'cuda:1'")


# -- the pinned host tier's peak (C2) -------------------------------------------------------------------
_PEAK = """
import sys, torch
from pathlib import Path
from edge_prism.runtime.device import emulate
from edge_prism.runtime.store import LayerBlocks, prism_tiers
path, n, width = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
lb = LayerBlocks(layer=0, parts=1, units=n, block_shape=(width,), dtype=torch.float32, offset=0,
                 order=list(range(n)), frequency=[1.0] * n, max_selection=1)
def rss(): return int(open("/proc/self/statm").read().split()[1]) * 4096
with emulate():
    make = prism_tiers(path, torch.device("cpu"), host="ram")
    base = rss()
    tier = make([lb], [i * width * 4 for i in range(n)], width * 4)
# VmHWM: this process's peak (ru_maxrss would include the forking parent's).
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(type(tier).__name__, base, peak)
"""


def test_the_pinned_tier_costs_its_bytes_once(tmp_path):
    """Blocks are read straight into one exactly sized buffer: the peak is ~1x the tier."""
    n, width = 96, 2**18  # 96 MiB of float32 blocks
    path = tmp_path / "experts.bin"
    with open(path, "wb") as f:
        for i in range(n):
            f.write(torch.full((width,), float(i)).numpy().tobytes())
    out = subprocess.run([sys.executable, "-c", _PEAK, str(path), str(n), str(width)], capture_output=True,
                         text=True, check=True).stdout.split()
    kind, base, peak = out[0], int(out[1]), int(out[2])
    assert kind == "MemoryTier"
    assert peak - base < 1.15 * n * width * 4, (peak - base) / (n * width * 4)


# -- float16 compute (C13) ----------------------------------------------------------------------------
def test_float16_keeps_the_residual_stream_in_float32(tiny_checkpoint):
    path = tiny_checkpoint("llama")
    ref = edge_prism.load(path).logits(PROMPT)
    engine = edge_prism.load(path, dtype="float16")
    seen = []
    with engine.model.observing(lambda layer, resid, x, topv, topi: seen.append((resid.dtype, x.dtype))):
        got = engine.logits(PROMPT)
    assert set(seen) == {(torch.float32, torch.float16)}
    torch.testing.assert_close(got, ref, rtol=0.05, atol=0.05 * float(ref.abs().max()))
    # A residual past float16's range (65504) stays finite.
    w = engine.model.w
    w.embed.weight.copy_(w.embed.weight.sign() * 6.5e4)
    w.layers[0].wo.w_t.mul_(1e4)
    assert torch.isfinite(engine.logits(PROMPT)).all()


def test_bfloat16_is_refused_below_compute_capability_8(olmoe, capsys):
    with emulate(capability=(7, 2)):  # Jetson Xavier
        with pytest.raises(ConfigError, match="compute capability 8.0"):
            RuntimeConfig(dtype="bfloat16").torch_dtype(CPU)
        assert RuntimeConfig(dtype="float16").torch_dtype(CPU) == torch.float16
        assert main(["chat", "-m", str(olmoe), "--dtype", "bfloat16", "--prompt", "hi", "-n", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --dtype bfloat16 needs compute capability 8.0") and err.count("\n") == 1


# -- positioned reads without pread (C14) ------------------------------------------------------------------
def test_file_tier_reads_without_pread(tmp_path, monkeypatch):
    blocks = torch.randn(32, 3, 8, 16)
    path = tmp_path / "b.bin"
    path.write_bytes(blocks.numpy().tobytes())
    nbytes = blocks[0].numel() * 4
    monkeypatch.delattr(os, "preadv", raising=False)
    monkeypatch.delattr(os, "pread", raising=False)
    tier = FileTier(path, [i * nbytes for i in range(32)], nbytes, torch.float32, (3, 8, 16))
    out = torch.empty_like(blocks)

    def read(start: int) -> None:
        for _ in range(20):
            for i in range(start, 32, 4):
                tier.read_into(i, out[i])

    threads = [threading.Thread(target=read, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.equal(out, blocks)
    tier.close()


# -- the cost model's cache (C12, tester item 7) ---------------------------------------------------------
def test_cost_model_cache_is_in_the_user_cache(olmoe, tmp_path, monkeypatch):
    from edge_prism.runtime.planner import profiles_dir

    monkeypatch.delenv("EDGE_PRISM_PROFILES", raising=False)
    monkeypatch.setenv("EDGE_PRISM_CACHE", str(tmp_path / "cache"))
    assert profiles_dir() == tmp_path / "cache" / "profiles"
    repo = Path(edge_prism.__file__).resolve().parents[1]
    before = set((repo / "profiles").glob("cost-*"))
    edge_prism.load(olmoe, token_latency_ms=50)
    assert list((tmp_path / "cache" / "profiles").glob("cost-*.json"))
    assert set((repo / "profiles").glob("cost-*")) == before
    monkeypatch.delenv("EDGE_PRISM_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert profiles_dir() == tmp_path / "xdg" / "edge-prism" / "profiles"


def test_device_names_key_the_cache_per_device():
    with emulate(name="Orin-0123"):
        assert devicelib.device_name(CPU) == "Orin-0123"
    assert devicelib.device_name(CPU).startswith("cpu-")


# -- transfer mechanics on the emulated device (C16, ordering rules) ------------------------------------------
def test_no_read_before_the_copy_lands():
    with emulate(latency_s=0.05):
        pool = SlotPool(2, (4,), torch.float32, CPU)
        pool.buffer.zero_()
        with Transferer(pool, MemoryTier(torch.arange(8.0).reshape(2, 4)), CPU) as t:
            ticket = t.submit(1, 0)
            assert not ticket.done() and torch.all(pool.slot(0) == 0)  # still on the copy engine
            t.wait([ticket])  # the host is the compute stream: this waits for the copy
            assert torch.equal(pool.slot(0), torch.tensor([4.0, 5.0, 6.0, 7.0]))
            assert t.stall_seconds() > 0.02  # the stall is counted, not the enqueue time


def test_no_overwrite_before_the_last_readers_mark():
    with emulate(compute_lag_s=0.05) as emu:  # kernels run 50 ms behind the host
        pool = SlotPool(1, (4,), torch.float32, CPU)
        with Transferer(pool, MemoryTier(torch.arange(8.0).reshape(2, 4)), CPU) as t:
            t.wait([t.submit(0, 0)])
            seen = []
            emu.launch(lambda: seen.append(pool.slot(0).clone()))  # a kernel reading slot 0, later
            t.mark_read([0])
            t.wait([t.submit(1, 0)])
            emu.synchronize()
    assert torch.equal(seen[0], torch.arange(4.0))  # read before the next block overwrote it


def test_events_are_made_once(olmoe, min_budget, monkeypatch):
    with emulate(latency_s=0.0005):
        engine = edge_prism.load(olmoe, memory_budget=min_budget(olmoe))
        engine.generate_ids(PROMPT, **GREEDY)
        made = []
        real = devicelib.new_event

        def counting(*a, **k):
            made.append(1)
            return real(*a, **k)

        monkeypatch.setattr(devicelib, "new_event", counting)
        monkeypatch.setattr(transferlib, "new_event", counting)
        engine.generate_ids(PROMPT, **GREEDY)
        assert not made
        assert engine.stats["transfer_wait_s"] > 0  # compute stalled on copies: measured


def test_workers_fit_the_machine():
    cores = os.cpu_count() or 1
    assert devicelib.default_workers(CPU) == max(1, min(4, cores - torch.get_num_threads()))


# -- timings after a sync, predictions ahead of the kernel (C8, C9, C7) ----------------------------------------
def test_token_times_are_taken_after_a_sync(olmoe, monkeypatch):
    engine = edge_prism.load(olmoe)
    calls = []
    monkeypatch.setattr(devicelib, "compute_sync", lambda device: calls.append(device))
    engine.generate_ids(PROMPT, max_new_tokens=6, temperature=0)
    assert len(calls) == engine.stats["generated_tokens"]  # after the prefill and each decode step


@pytest.mark.parametrize("emulated", [False, True])
def test_prefetches_are_predicted_before_the_kernel_and_issued_around_it(olmoe, min_budget, monkeypatch,
                                                                          emulated):
    """One copy of the predictions per layer; on an asynchronous device the loads are issued
    after the layer's kernel is launched (the device computes while the host issues), on the
    CPU before it (the workers read while the kernel computes)."""
    from edge_prism.prefetch import predictor as predictorlib

    with emulate() if emulated else _nothing():
        engine = edge_prism.load(olmoe, memory_budget=min_budget(olmoe), prefetch=True)
        events = []
        store, kernels = engine.model.store, engine.model.kernels
        real_prefetch = store.prefetch
        monkeypatch.setattr(store, "prefetch", lambda layer, *a, **k: events.append(("prefetch", layer))
                            or real_prefetch(layer, *a, **k))
        for i, kernel in enumerate(kernels):
            kernels[i] = (lambda i, k: lambda *a: events.append(("kernel", i)) or k(*a))(i, kernel)
        copies = []
        real_copy = predictorlib.HostCopy
        monkeypatch.setattr(predictorlib, "HostCopy", lambda t: copies.append(1) or real_copy(t))
        engine.generate_ids(PROMPT, max_new_tokens=3, temperature=0)
    first = events.index(("prefetch", 1))
    if emulated:
        assert events[first - 1:first + 2] == [("kernel", 0), ("prefetch", 1), ("kernel", 1)]
    else:
        assert events[first:first + 3] == [("prefetch", 1), ("kernel", 0), ("kernel", 1)]
    assert len(copies) == events.count(("prefetch", 1)) == 2  # one per decode step (2 layers)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
