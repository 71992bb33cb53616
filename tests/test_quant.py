"""Quantized weights: storage form, GGUF block types, kernels against a plain-torch
reference, and engines whose weights stay quantized (GGUF files and refactor --quant)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants

import edge_prism
from edge_prism.kernels import ExpertMatrices, QuantExperts, QuantLinear, QuantUnits, expert_matrices
from edge_prism.loaders.gguf_quant import dequantized, to_qmatrix
from edge_prism.quant import (CpuInt4Backend, Int4Backend, QMatrix, UnitFormat, backend_for, relative_error,
                              tile_codes, untile_codes)
from test_gguf import TINY, _tiny_weights, write_tiny_gguf

BACKENDS = [Int4Backend(torch.device("cpu")), backend_for(torch.device("cpu"))]
BACKEND_IDS = [b.name for b in BACKENDS]


def reference_mm(x: torch.Tensor, qm: QMatrix) -> torch.Tensor:
    """What every int4 kernel computes: bfloat16 inputs, the stored W, float32 accumulation."""
    return x.to(torch.bfloat16).float() @ qm.dequantize().t()


# -- storage form ----------------------------------------------------------------------------
@pytest.mark.parametrize("rows", [64, 100, 192])
def test_tiles_round_trip(rows):
    c = torch.randint(0, 16, (-(-rows // 64) * 64, 96), dtype=torch.uint8)
    assert torch.equal(untile_codes(tile_codes(c)), c)


@pytest.mark.parametrize("kind,bound", [("int4", 0.09), ("int8", 0.006)])
@pytest.mark.parametrize("shape", [(64, 64), (100, 96), (576, 192)])
def test_quantize_error_is_what_the_bits_allow(kind, bound, shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    qm = QMatrix.quantize(w, kind)
    assert qm.kind == kind and qm.rows == shape[0] and qm.cols == shape[1]
    assert relative_error(qm.dequantize(), w) < bound


def test_rows_move_whole_and_join_exactly():
    gen = torch.Generator().manual_seed(1)
    a = QMatrix.quantize(torch.randn(70, 64, generator=gen), "int4")
    b = QMatrix.quantize(torch.randn(30, 64, generator=gen), "int8")
    joined = QMatrix.cat_rows([a, b])
    assert joined.planes == 2  # int4 joins int8 as an empty high plane: exact
    assert torch.equal(joined.dequantize(), torch.cat((a.dequantize(), b.dequantize())))
    perm = torch.randperm(70, generator=gen)
    assert torch.equal(a.take_rows(perm).dequantize(), a.dequantize()[perm])
    idx = torch.tensor([3, 69, 0, 41])
    assert torch.equal(joined.rows_dequantized(idx), joined.dequantize()[idx])
    c = QMatrix.quantize(torch.randn(64, 32, generator=gen), "int4")
    d = QMatrix.quantize(torch.randn(64, 64, generator=gen), "int4")
    assert torch.equal(QMatrix.cat_cols([c, d]).dequantize(), torch.cat((c.dequantize(), d.dequantize()), 1))


def test_whole_column_groups_move_exactly():
    from edge_prism.refactor.refactor import whole_groups_of

    q = QMatrix.quantize(torch.randn(100, 128), "int8", 32)  # 2 planes, 100 rows (padded)
    groups = torch.tensor([3, 0, 2])
    cols = torch.cat([torch.arange(g * 32, g * 32 + 32) for g in groups.tolist()])
    assert torch.equal(q.take_col_groups(groups).dequantize(), q.dequantize()[:, cols])
    assert torch.equal(whole_groups_of(cols, 32), groups)
    assert whole_groups_of(cols.flip(0), 32) is None  # reversed inside a group
    assert whole_groups_of(torch.arange(16, 48), 32) is None  # not aligned
    assert whole_groups_of(torch.arange(48), 32) is None  # not whole


def test_affine_groups_map_exactly_up_to_bfloat16_scales():
    gen = torch.Generator().manual_seed(2)
    q = torch.randint(0, 16, (64, 64), generator=gen)
    scale, offset = torch.rand(64, 2, generator=gen) * 0.01, torch.randn(64, 2, generator=gen) * 0.1
    want = (q.float().view(64, 2, 32) * scale[..., None] + offset[..., None]).view(64, 64)
    # (scale, zero) are stored as bfloat16, what the kernels read: 2**-8 relative at most.
    assert relative_error(QMatrix.from_affine(q, scale, offset, bits=4).dequantize(), want) < 4e-3
    q8 = torch.randint(0, 256, (64, 64), generator=gen)
    want8 = (q8.float().view(64, 2, 32) * scale[..., None] + offset[..., None]).view(64, 64)
    assert relative_error(QMatrix.from_affine(q8, scale, offset, bits=8).dequantize(), want8) < 4e-3


# -- GGUF block types ----------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0])
def test_gguf_types_keep_their_values(qtype):
    w = np.random.default_rng(0).standard_normal((96, 256)).astype(np.float32)
    data = quants.quantize(w, qtype)
    qm, err = to_qmatrix(data, qtype, w.shape)
    assert err == 0.0  # mapped, not converted
    assert qm.kind == ("int4" if qtype in (Q.Q4_0, Q.Q4_1) else "int8")
    file_values = dequantized(data, qtype, w.shape)
    assert relative_error(qm.dequantize(), file_values) < 1e-2  # bfloat16 scales only


def _random_k_blocks(block_bytes: int, d_at: tuple[int, ...], rows: int, cols: int) -> np.ndarray:
    rng = np.random.default_rng(3)
    blocks = rng.integers(0, 256, (rows * cols // 256, block_bytes), dtype=np.uint8)
    for at in d_at:  # sane float16 super-block scales
        blocks[:, at:at + 2] = np.full((blocks.shape[0], 1), 0.01, np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


def test_q4_k_keeps_its_values():
    data = _random_k_blocks(144, (0, 2), 64, 256)
    qm, err = to_qmatrix(data, Q.Q4_K, (64, 256))
    assert err == 0.0 and qm.kind == "int4"
    assert relative_error(qm.dequantize(), dequantized(data, Q.Q4_K, (64, 256))) < 4e-3


def test_other_k_quants_are_converted_and_the_error_reported():
    data = _random_k_blocks(210, (208,), 64, 256)  # Q6_K: 16-value sub-blocks, not a kernel group
    qm, err = to_qmatrix(data, Q.Q6_K, (64, 256))
    assert qm.kind == "int8"
    assert 0 < err < 2e-2
    assert relative_error(qm.dequantize(), dequantized(data, Q.Q6_K, (64, 256))) == pytest.approx(err)


# -- kernels -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("kind", ["int4", "int8"])
@pytest.mark.parametrize("rows,cols,tokens", [(64, 64, 1), (100, 96, 3), (576, 192, 1)])
def test_kernel_matches_reference(backend, kind, rows, cols, tokens):
    gen = torch.Generator().manual_seed(4)
    qm = QMatrix.quantize(torch.randn(rows, cols, generator=gen), kind)
    x = torch.randn(tokens, cols, generator=gen)
    got = QuantLinear(backend.pack(qm), backend)(x)
    want = reference_mm(x, qm)
    assert got.shape == (tokens, rows) and got.dtype == x.dtype
    # The kernel rounds its output (each plane's) to bfloat16.
    torch.testing.assert_close(got, want, rtol=0, atol=2e-2 * float(want.abs().max()))


def test_cpu_packing_shortcut_equals_torchs_packer():
    b = backend_for(torch.device("cpu"))
    if not isinstance(b, CpuInt4Backend) or not b.tile_transpose:
        pytest.skip("this CPU's int4 packing is not the tile transpose: the general repack runs")
    qm = QMatrix.quantize(torch.randn(192, 96), "int4")
    from edge_prism.quant import MatrixLayout

    layout = MatrixLayout(qm.rows, qm.cols, qm.planes, qm.group)
    want = torch._convert_weight_to_int4pack_for_cpu(untile_codes(qm.codes).to(torch.int32), 1)
    assert torch.equal(b.pack_codes(qm.codes, layout), want)


def _units(fmt: UnitFormat, count: int, seed: int = 5) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    kind_gu, kind_dn = ("int4", "int8")[fmt.gu_planes - 1], ("int4", "int8")[fmt.dn_planes - 1]
    return [fmt.pack_block(QMatrix.quantize(torch.randn(2 * fmt.n, fmt.hidden, generator=gen) * 0.1, kind_gu),
                           QMatrix.quantize(torch.randn(fmt.hidden, fmt.n, generator=gen) * 0.1, kind_dn))
            for _ in range(count)]


def _reference_units(fmt: UnitFormat, blocks: list[torch.Tensor], x: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    out = 0
    for b, w in zip(blocks, wt):
        gu, dn = fmt.split(b)
        h = reference_mm(x, gu)  # [T, 2n]
        act = torch.nn.functional.silu(h[:, : fmt.n]) * h[:, fmt.n:] * w[:, None]
        out = out + reference_mm(act, dn)
    return out


def test_a_native_backend_reads_stored_blocks_as_its_own_packing():
    """Where the CPU kernel's packing is the stored block order, a streamed block needs no
    conversion: the stored bytes are what packing the block's matrices gives."""
    b = CpuInt4Backend(torch.device("cpu"))
    fmt = UnitFormat(n=64, hidden=96, gu_planes=1, dn_planes=2, group=32)
    block = _units(fmt, 1)[0]
    gu, dn = fmt.split(block)
    packed = torch.cat([torch.cat((b.pack(m).packed.reshape(-1).view(torch.uint8),
                                   m.sz.contiguous().view(torch.uint8).reshape(-1))) for m in (gu, dn)])
    assert b.native_blocks == torch.equal(packed, block)
    converted = torch.empty_like(block)
    fmt.to_kernel(block, converted, b)
    assert torch.equal(converted, packed)  # native or not, a slot holds the kernel's packing


def test_native_blocks_stream_from_the_file_without_a_conversion_tier(tmp_path):
    from edge_prism.runtime.store import ConvertingTier, LayerBlocks, prism_tiers
    from edge_prism.runtime.transfer import MappedFileTier

    fmt = UnitFormat(n=32, hidden=64, gu_planes=1, dn_planes=1, group=32)
    blocks = torch.stack(_units(fmt, 3))
    path = tmp_path / "blocks.bin"
    path.write_bytes(blocks.numpy().tobytes())
    lb = LayerBlocks(layer=0, parts=3, units=3, block_shape=(fmt.nbytes,), dtype=torch.uint8, offset=0,
                     order=[0, 1, 2], frequency=[1.0, 1.0, 1.0], max_selection=3)
    for backend in BACKENDS:
        make = prism_tiers(path, torch.device("cpu"), formats={0: fmt}, backend=backend)
        tier = make([lb], [i * fmt.nbytes for i in range(3)], fmt.nbytes)
        assert isinstance(tier, MappedFileTier if backend.native_blocks else ConvertingTier)
        got = torch.empty(fmt.nbytes, dtype=torch.uint8)
        tier.read_into(2, got)
        want = torch.empty_like(got)
        fmt.to_kernel(blocks[2], want, backend)
        assert torch.equal(got, want)
        tier.close()


def test_host_blocks_numbered_after_the_slots_are_read_in_place(tmp_path):
    """QuantUnits over (slot buffer, mapped host blocks): slot i < num_slots reads the slot,
    num_slots + j reads host block j where it lies in the file; the same sum as one buffer
    holding them all."""
    from edge_prism.runtime.transfer import MappedFileTier

    backend = backend_for(torch.device("cpu"))
    fmt = UnitFormat(n=32, hidden=64, gu_planes=1, dn_planes=2, group=32)
    blocks = [torch.empty(fmt.nbytes, dtype=torch.uint8) for _ in range(5)]
    for b, raw in zip(blocks, _units(fmt, 5)):
        fmt.to_kernel(raw, b, backend)
    path = tmp_path / "blocks.bin"
    path.write_bytes(torch.stack(blocks[2:]).numpy().tobytes())
    tier = MappedFileTier(path, [i * fmt.nbytes for i in range(3)], fmt.nbytes, torch.uint8, (fmt.nbytes,))
    host = tier.blocks()
    assert all(torch.equal(h, b) for h, b in zip(host, blocks[2:]))  # views of the file, in index order
    slots = torch.stack(blocks[:2])  # num_slots = 2
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(1, 64, generator=gen)
    ids = torch.tensor([0, 3, 1, 4])  # slot 0, host 1, slot 1, host 2
    wt = torch.rand(4, 1, generator=gen)
    got = QuantUnits(fmt, backend)(x, (slots, host), ids, wt)
    want = QuantUnits(fmt, backend)(x, torch.stack(blocks), ids, wt)
    assert torch.equal(got, want)
    tier.close()


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("planes", [(1, 1), (2, 1), (1, 2)])
def test_sub_experts_from_slots_and_whole_experts_agree(backend, planes):
    fmt = UnitFormat(n=32, hidden=64, gu_planes=planes[0], dn_planes=planes[1], group=32)
    S, E, T = 4, 2, 2
    blocks = _units(fmt, S * E)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(T, 64, generator=gen)
    # A slot pool in the kernel's layout, filled the way transfers fill it.
    pool = torch.empty(len(blocks), fmt.nbytes, dtype=torch.uint8)
    for slot, b in enumerate(blocks):
        fmt.to_kernel(b, pool[slot], backend)
    units = torch.tensor([0, 2, 3, 5, 6])
    wt = torch.rand(units.numel(), T, generator=gen)
    want = _reference_units(fmt, [blocks[u] for u in units], x, wt)
    tol = dict(rtol=0, atol=3e-2 * float(want.abs().max()))
    torch.testing.assert_close(QuantUnits(fmt, backend)(x, pool, units, wt), want, **tol)
    experts: list[ExpertMatrices] = [expert_matrices(blocks[e * S:(e + 1) * S], fmt, backend) for e in range(E)]
    torch.testing.assert_close(QuantExperts(fmt, S, backend)(x, experts, units, wt), want, **tol)
    every = torch.arange(S * E)
    torch.testing.assert_close(QuantExperts(fmt, S, backend)(x, experts, every, None),
                               _reference_units(fmt, blocks, x, torch.ones(S * E, T)), **tol)


# -- engines ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mixed_gguf(tmp_path_factory) -> str:
    """The tiny llama GGUF with Q4_0 q, Q4_1 k, Q8_0 v, BF16 o, Q8_0 embedding, F16 output,
    Q4_1 gate, Q4_0 up, F16 down (test_gguf's type table)."""
    return str(write_tiny_gguf(tmp_path_factory.mktemp("q") / "tiny.gguf", _tiny_weights()))


def test_gguf_weights_stay_quantized_and_track_their_dequantization(mixed_gguf):
    q = edge_prism.load(mixed_gguf)
    f = edge_prism.load(mixed_gguf, dequantize=True)
    lw = q.model.w.layers[0]
    assert isinstance(lw.wqkv, QuantLinear) and lw.wqkv.km.planes == 2  # q, k int4 joined with v int8
    assert not isinstance(lw.wo, QuantLinear)  # BF16 in the file: float
    assert q.model.w.embed.__class__.__name__ == "QuantEmbedding"
    ids = list(range(1, 20))
    a, b = q.logits(ids), f.logits(ids)
    assert relative_error(a, b) < 0.05
    assert q.model.w.nbytes() < f.model.w.nbytes()


@pytest.fixture(scope="module")
def quant_prisms(tiny_checkpoint, tmp_path_factory):
    """The tiny llama and qwen3_moe checkpoints refactored float, int4 and int8 (sub-experts of
    32 neurons: the smallest quantization group)."""
    from edge_prism.refactor.refactor import RefactorConfig, refactor

    fast = dict(calib_tokens=384, rows_per_expert=256, seq_len=128, layer_sensitivity=False)
    out = {}
    for family, parts in (("llama", 8), ("qwen3_moe", 4)):
        for quant in ("none", "int4", "int8"):
            path = tmp_path_factory.mktemp("qprism") / f"{family}-{quant}.prism"
            refactor(tiny_checkpoint(family), path, RefactorConfig(**fast, sub_experts=parts, quant=quant),
                     progress=False)
            out[family, quant] = path
    return out


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
@pytest.mark.parametrize("quant,bound", [("int4", 0.15), ("int8", 0.04)])  # int8: mostly bfloat16 compute
def test_refactor_quant_stays_close_to_float(quant_prisms, family, quant, bound):
    from edge_prism.refactor.prism import open_prism

    pc = open_prism(quant_prisms[family, quant])
    assert all(f is not None and f.gu_planes == (1 if quant == "int4" else 2) for f in
               (pc.unit_format(layer) for layer in range(len(pc.parts))))
    assert pc.manifest["quant"]["relative_error"]["down"] > 0  # measured and recorded
    ref = edge_prism.load(quant_prisms[family, "none"]).logits(list(range(1, 25)))
    got = edge_prism.load(quant_prisms[family, quant]).logits(list(range(1, 25)))
    assert relative_error(got, ref) < bound
    float_bytes = (quant_prisms[family, "none"] / "experts.safetensors").stat().st_size
    quant_bytes = (quant_prisms[family, quant] / "experts.safetensors").stat().st_size
    assert quant_bytes < float_bytes * (0.2 if quant == "int4" else 0.35)


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
@pytest.mark.parametrize("budget", ["60%", "80%"])  # a dense layer at full K is half the model
@pytest.mark.parametrize("host_tier", ["auto", "disk"])  # CPU: read in place, or copied into slots
def test_quantized_blocks_stream_and_give_the_resident_output(quant_prisms, family, budget, host_tier):
    path = quant_prisms[family, "int4"]
    resident = edge_prism.load(path)
    budgeted = edge_prism.load(path, memory_budget=budget, host_tier=host_tier)
    ids = list(range(1, 25))
    # Per-sub-expert kernels (slots) and whole-expert kernels (resident) round their bfloat16
    # outputs at different points: equal within that rounding, not bit for bit; in a MoE
    # model that rounding can flip a later router's choice between two near-tied experts.
    a, b = budgeted.logits(ids), resident.logits(ids)
    close = (a - b).abs() <= 2e-2 * float(b.abs().max())
    assert float(close.float().mean()) > (0.999 if family == "llama" else 0.95)
    assert float((a.argmax(-1) == b.argmax(-1)).float().mean()) >= 0.9
    budgeted.generate_ids(ids, max_new_tokens=6, temperature=0)
    stats = budgeted.stats
    assert stats["resident_bytes"] <= stats["memory_budget_bytes"]
    # Quantized blocks move as they are stored: bytes per miss are the block's bytes. On an
    # AVX-512 CPU they are not moved at all but read in place from the mapped file.
    fmt_bytes = budgeted.model.kernels[0].fmt.nbytes
    moved = "bytes_in_place" if budgeted.model.store.in_place else "bytes_to_device"
    assert stats[moved] > 0 and stats[moved] % fmt_bytes == 0
    assert stats["misses"] * fmt_bytes == stats["bytes_in_place"] + stats["bytes_to_device"]


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_cpu_misses_read_in_place_equal_misses_copied_into_slots(quant_prisms, family):
    """On the CPU a quantized prism's misses are read where they lie in the mapped experts
    file: the same bits as copying them into slots (host_tier='disk'), nothing moved, the
    slots fixed on the hottest sub-experts, no prefetcher (nothing to load ahead)."""
    path = quant_prisms[family, "int4"]
    native = backend_for(torch.device("cpu")).native_blocks
    ids = list(range(1, 25))
    with edge_prism.load(path, device="cpu", memory_budget="60%", prefetch=True) as inplace, \
            edge_prism.load(path, device="cpu", memory_budget="60%", host_tier="disk") as copied:
        assert inplace.model.store.in_place is native and not copied.model.store.in_place
        if not native:
            pytest.skip("this CPU's int4 packing is not the stored block order: misses are copied")
        assert inplace.model.prefetcher is None and not inplace.model.store.streams
        assert torch.equal(inplace.logits(ids), copied.logits(ids))
        assert inplace.generate_ids(ids, max_new_tokens=6, temperature=0) == \
            copied.generate_ids(ids, max_new_tokens=6, temperature=0)
        s, c = inplace.stats, copied.stats
        assert s["bytes_to_device"] == 0 and s["misses"] > 0 and s["hits"] > 0
        assert s["resident_bytes"] == c["resident_bytes"] <= s["memory_budget_bytes"]
        assert all(p.policy.evictions == 0 for p in inplace.model.store._pools.values())  # slots fixed
        assert any(p.policy.evictions > 0 for p in copied.model.store._pools.values())


def test_in_place_needs_a_mapped_host_tier(tmp_path):
    from edge_prism.errors import ConfigError
    from edge_prism.runtime.store import BudgetedStore, LayerBlocks
    from edge_prism.runtime.transfer import FileTier

    fmt = UnitFormat(n=32, hidden=64, gu_planes=1, dn_planes=1, group=32)
    path = tmp_path / "blocks.bin"
    path.write_bytes(torch.stack(_units(fmt, 4)).numpy().tobytes())
    lb = LayerBlocks(layer=0, parts=4, units=4, block_shape=(fmt.nbytes,), dtype=torch.uint8, offset=0,
                     order=[0, 1, 2, 3], frequency=[4.0, 3.0, 2.0, 1.0], max_selection=2)

    def tiers(group, offsets, nbytes):
        return FileTier(path, offsets, nbytes, torch.uint8, (fmt.nbytes,))

    with pytest.raises(ConfigError, match="memory-mapped host tier"):
        BudgetedStore(tiers, [lb], budget_bytes=2 * fmt.nbytes, device=torch.device("cpu"), in_place=True)


@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_whole_expert_kernels_take_unselected_parts_at_weight_zero(quant_prisms, family, monkeypatch):
    """Resident quantized experts compute every part of an expert they read, so a decode
    token hands them all parts with weight 0 where unselected (no host sync to list the
    selected ones): the nonzero ones are decode_units' selection, and the logits are the
    same bits as with that list, at every K. (The dropped parts' compensation sums a
    different number of rows in the two, so with it they agree to rounding.)"""
    from edge_prism.select import max_operating_point

    engine = edge_prism.load(quant_prisms[family, "int4"], device="cpu")
    m = engine.model
    assert all(kern.reads_whole_experts for kern in m.kernels)
    full = max_operating_point(m.spec, m.parts)
    gen = torch.Generator().manual_seed(4)
    prompt, follow = list(range(3, 19)), list(range(40, 46))
    for k in (1, 3, full - 1):
        engine.set_operating_point(k)
        for layer in range(m.spec.num_layers):
            x = torch.randn(1, m.spec.hidden_size, generator=gen)
            topv, topi = m.route(layer, x)
            units, wt = m.unit_weights(layer, x, topv, topi)
            want_units, want_wt = m.selector_for(layer).decode_units(layer, x, topv, topi)
            chosen = wt[:, 0] != 0
            assert torch.equal(units[chosen], want_units) and torch.equal(wt[chosen], want_wt), (k, layer)
            assert units.numel() % m.parts[layer] == 0  # whole experts

        def decode() -> torch.Tensor:
            engine.reset()
            m.forward(torch.tensor(prompt))
            return torch.stack([m.forward(torch.tensor([t]))[-1] for t in follow])

        whole = decode()
        with monkeypatch.context() as mp:
            mp.setattr(QuantExperts, "reads_whole_experts", False)
            listed = decode()
        torch.testing.assert_close(whole, listed, rtol=1e-5, atol=1e-5)
        tables = m.compensation
        m.compensation = None
        try:
            whole = decode()
            with monkeypatch.context() as mp:
                mp.setattr(QuantExperts, "reads_whole_experts", False)
                listed = decode()
        finally:
            m.compensation = tables
        assert torch.equal(whole, listed), k


def test_lower_operating_point_reads_fewer_bytes_under_a_budget(quant_prisms):
    path = quant_prisms["qwen3_moe", "int4"]
    ids = list(range(1, 12))
    read = {}
    for k in (8, 6):
        engine = edge_prism.load(path, operating_point=k, memory_budget="60%")  # per-sub-expert kernels
        engine.generate_ids(ids, max_new_tokens=4, temperature=0)
        read[k] = sum(getattr(kern, "bytes_read", 0) for kern in engine.model.kernels)
    assert read[6] < read[8]


@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_quantize_measured_is_quantize_with_its_error_in_row_chunks(kind):
    from edge_prism.quant import QMatrix, relative_error

    w = torch.randn(300, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    whole = QMatrix.quantize(w.float(), kind, 32)
    q, err = QMatrix.quantize_measured(w, kind, 32, chunk_rows=128)  # 3 chunks, the last partial
    assert torch.equal(q.codes, whole.codes) and torch.equal(q.sz, whole.sz) and q.rows == 300
    assert err == pytest.approx(relative_error(whole.dequantize(), w.float()), rel=1e-3)
