"""CUDA paths of the engine: exactness against the CPU, budgets that hold on the device,
prefetch over the copy stream, the latency planner. Skipped where no CUDA device exists."""

from __future__ import annotations

import pytest
import torch

import edge_prism

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PROMPT = list(range(70, 94))


@pytest.mark.parametrize("family", ["llama", "qwen2_moe", "olmoe"])
def test_cuda_float32_matches_cpu(family, tiny_checkpoint):
    path = tiny_checkpoint(family)
    cpu = edge_prism.load(path, device="cpu").logits(PROMPT)
    gpu = edge_prism.load(path, device="cuda", dtype="float32").logits(PROMPT)
    torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=1e-4 * float(cpu.abs().max()))


def test_cuda_bfloat16_is_the_default_and_close(tiny_checkpoint):
    path = tiny_checkpoint("olmoe")
    engine = edge_prism.load(path, device="cuda")
    assert engine.model.dtype in (torch.bfloat16, torch.float16)
    ref = edge_prism.load(path, device="cpu").logits(PROMPT)
    assert float((engine.logits(PROMPT) - ref).abs().max() / ref.abs().max()) < 0.05


@pytest.mark.parametrize("prefetch", [False, True])
def test_cuda_budget_is_exact_and_held(prism_of, prefetch, min_budget):
    path = prism_of("olmoe")
    ref = edge_prism.load(path, device="cuda", dtype="float32")
    want = ref.generate_ids(PROMPT, max_new_tokens=12)
    ref_logits = ref.logits(PROMPT)
    del ref
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    budget = min_budget(path)
    engine = edge_prism.load(path, device="cuda", dtype="float32", memory_budget=budget, prefetch=prefetch)
    assert engine.generate_ids(PROMPT, max_new_tokens=12) == want
    torch.testing.assert_close(engine.logits(PROMPT), ref_logits, rtol=1e-5, atol=1e-5)
    s = engine.stats
    assert s["resident_bytes"] <= s["memory_budget_bytes"] == budget
    # Device memory: the slot pool, the always-resident weights, KV cache and activations;
    # never all sub-experts (the checkpoint's experts file is far larger than the budget here).
    experts_bytes = (path / "experts.safetensors").stat().st_size
    dense_bytes = (path / "dense.safetensors").stat().st_size
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < budget + dense_bytes + experts_bytes // 2 + 8 * 2**20


def test_cuda_slots_are_not_overwritten_while_read(prism_of, min_budget):
    """Tiny budget + prefetch: every load reuses slots a kernel just read; a race would show
    as a wrong token against the fully resident engine."""
    path = prism_of("olmoe")
    ref = edge_prism.load(path, device="cuda", dtype="float32").generate_ids(PROMPT, max_new_tokens=24)
    engine = edge_prism.load(path, device="cuda", dtype="float32", memory_budget=min_budget(path),
                             prefetch=True, policy="lfu")
    _slow_kernels(engine)  # kernels far behind the host: a missing wait shows
    for _ in range(3):
        assert engine.generate_ids(PROMPT, max_new_tokens=24) == ref


def test_cuda_latency_budget_degrades(prism_of, min_budget):
    path = prism_of("olmoe")
    engine = edge_prism.load(path, device="cuda", memory_budget=min_budget(path), token_latency_ms=0.001)
    engine.generate_ids(PROMPT, max_new_tokens=6)
    assert engine.stats["dropped_subexperts"] > 0


# -- quantized weights on the device (edge_prism.quant) ----------------------------------------
def _sm80() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


@pytest.mark.skipif(not _sm80(), reason="torch's CUDA int4 kernel needs compute capability 8.0+")
@pytest.mark.parametrize("kind", ["int4", "int8"])
@pytest.mark.parametrize("rows,cols,tokens", [(64, 64, 1), (576, 96, 1), (100, 192, 5)])
def test_cuda_int4_kernel_matches_reference(kind, rows, cols, tokens):
    from edge_prism.quant import CudaInt4Backend, QMatrix, backend_for

    backend = backend_for(torch.device("cuda"))
    assert isinstance(backend, CudaInt4Backend), backend.name
    gen = torch.Generator().manual_seed(0)
    qm = QMatrix.quantize(torch.randn(rows, cols, generator=gen), kind)
    x = torch.randn(tokens, cols, generator=gen)
    want = x.to(torch.bfloat16).float() @ qm.dequantize().t()
    got = backend.mm(x.cuda().to(torch.bfloat16), backend.pack(qm)).float().cpu()
    torch.testing.assert_close(got, want, rtol=0, atol=2e-2 * float(want.abs().max()))


@pytest.mark.skipif(not _sm80(), reason="torch's CUDA int4 kernel needs compute capability 8.0+")
def test_cuda_quantized_slots_match_the_cpu(tmp_path):
    """A quantized sub-expert block converted into a CUDA slot computes what the CPU computes."""
    from edge_prism.kernels import QuantUnits
    from edge_prism.quant import QMatrix, UnitFormat, backend_for

    fmt = UnitFormat(n=32, hidden=64, gu_planes=1, dn_planes=2, group=32)
    gen = torch.Generator().manual_seed(1)
    block = fmt.pack_block(QMatrix.quantize(torch.randn(64, 64, generator=gen), "int4"),
                           QMatrix.quantize(torch.randn(64, 32, generator=gen), "int8"))
    x = torch.randn(2, 64, generator=gen)
    outs = []
    for device in ("cpu", "cuda"):
        backend = backend_for(torch.device(device))
        pool = torch.empty(1, fmt.nbytes, dtype=torch.uint8, device=device)
        fmt.to_kernel(block, pool[0], backend)
        y = QuantUnits(fmt, backend)(x.to(device), pool, torch.tensor([0]), torch.ones(1, 2, device=device))
        outs.append(y.float().cpu())
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=3e-2 * float(outs[0].abs().max()))


def test_gguf_model_stays_quantized_on_cuda(default_model_path):
    engine = edge_prism.load(default_model_path, device="cuda")
    ref = edge_prism.load(default_model_path, dequantize=True)
    ids = ref.tokenizer.encode("The history of computing is a story of machines")
    a, b = engine.logits(ids), ref.logits(ids)
    assert float((a - b).norm() / b.norm()) < 0.05


# -- ordering under widened race windows (issue 11) ------------------------------------------------------
def _slow_kernels(engine, cycles: int = 2_000_000):
    """Queue ~1 ms of GPU sleep before every FFN kernel: kernels run far behind the host, so a
    copy that does not wait for a reader's mark, or a read that does not wait for its copy,
    shows as a wrong token."""
    kernels = engine.model.kernels
    for i, kernel in enumerate(kernels):
        def slow(*args, _k=kernel):
            torch.cuda._sleep(cycles)
            return _k(*args)
        kernels[i] = slow


@pytest.mark.parametrize("host_tier", ["ram", "disk"])
def test_cuda_ordering_holds_when_kernels_lag(prism_of, min_budget, host_tier):
    path = prism_of("olmoe")
    ref = edge_prism.load(path, device="cuda", dtype="float32").generate_ids(PROMPT, max_new_tokens=16)
    with edge_prism.load(path, device="cuda", dtype="float32", memory_budget=min_budget(path), prefetch=True,
                         host_tier=host_tier) as engine:
        _slow_kernels(engine)
        for _ in range(2):
            assert engine.generate_ids(PROMPT, max_new_tokens=16) == ref
        assert engine.stats["transfer_wait_s"] >= 0


def test_cuda_close_waits_for_copies_in_flight(prism_of, min_budget):
    path = prism_of("olmoe")
    engine = edge_prism.load(path, device="cuda", dtype="float32", memory_budget=min_budget(path), prefetch=True)
    engine.generate_ids(PROMPT, max_new_tokens=8)
    transfers = [p.transfer for p in engine.model.store._pools.values()]
    engine.close()
    for t in transfers:
        assert t._demand.stream.query() and t._speculative.stream.query()
    assert all(p.pool.buffer is None for p in engine.model.store._pools.values())


def test_cuda_interrupted_steps_leave_nothing_in_use(prism_of, min_budget, monkeypatch):
    from edge_prism.runtime.transfer import Transferer

    path = prism_of("olmoe")
    ref = edge_prism.load(path, device="cuda", dtype="float32").generate_ids(PROMPT, max_new_tokens=8)
    engine = edge_prism.load(path, device="cuda", dtype="float32", memory_budget=min_budget(path), prefetch=True)
    _slow_kernels(engine)
    real = Transferer.wait
    for n in (1, 4, 9):
        calls = {"n": 0}

        def flaky(self, tickets, _n=n, _calls=calls):
            _calls["n"] += 1
            if _calls["n"] == _n:
                raise KeyboardInterrupt
            return real(self, tickets)

        monkeypatch.setattr(Transferer, "wait", flaky)
        with pytest.raises(KeyboardInterrupt):
            engine.generate_ids(PROMPT, max_new_tokens=8)
        monkeypatch.setattr(Transferer, "wait", real)
        assert engine.generate_ids(PROMPT, max_new_tokens=8) == ref


def test_cuda_pinned_tier_is_exact_and_outside_the_caching_allocator(tmp_path):
    from edge_prism.runtime.device import host_buffer, is_pinned

    stats = getattr(torch.cuda, "host_memory_stats", None)
    before = stats()["allocated_bytes.current"] if stats else 0
    t = host_buffer((64, 2**20), torch.uint8, torch.device("cuda"))  # 64 MiB
    assert is_pinned(t)
    if stats:
        assert stats()["allocated_bytes.current"] - before < 2**20  # not rounded up by the host allocator
    dst = torch.empty(t.shape, dtype=t.dtype, device="cuda")
    t.fill_(7)
    dst.copy_(t, non_blocking=True)
    torch.cuda.synchronize()
    assert int(dst[-1, -1]) == 7


def test_cuda_device_name_is_per_device():
    from edge_prism.runtime.device import device_name

    name = device_name(torch.device("cuda", 0))
    assert name.startswith(torch.cuda.get_device_properties(0).name)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] >= 8,
                    reason="bfloat16 is refused only below compute capability 8.0")
def test_cuda_bfloat16_refused_before_ampere(tiny_checkpoint):
    from edge_prism.errors import ConfigError

    with pytest.raises(ConfigError, match="compute capability 8.0"):
        edge_prism.load(tiny_checkpoint("llama"), device="cuda", dtype="bfloat16")
    engine = edge_prism.load(tiny_checkpoint("llama"), device="cuda")
    assert engine.model.dtype == torch.float16 and engine.model.residual_dtype == torch.float32
