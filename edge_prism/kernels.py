"""Compute over weights as they are held: float or quantized linears, embeddings, and the
sub-expert FFN kernels that read a block pool in place.

[Linear: float W^T, float W (RowLinear) | int4 KMatrix] -- attention, lm_head, shared experts
[Embedding: float rows | quantized rows dequantized on lookup]
[FFN kernels] (x, pool, slots, weights) -> sum over selected sub-experts, no weight copies:
    FloatUnits    float blocks [slots, 3, n, D]: one batched matmul per run of consecutive slots
    QuantUnits    quantized blocks [slots, bytes]: two int4 kernel calls per sub-expert, on views
    QuantExperts  resident experts [S*2n, D] / [D, S*n]: two calls per routed expert; parts
                  not selected are given weight 0 (the int4 kernel cannot take a subset of a
                  matrix's rows without copying its scales, and on small sub-experts its fixed
                  cost per call exceeds what skipping them saves; see the note in QuantExperts)

Legend for shape comments: T=tokens, D=hidden, n=neurons per sub-expert, S=sub-experts
per expert, P=selected sub-experts, R=stored rows of a quantized matrix.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch
import torch.nn.functional as F

from edge_prism.quant import Int4Backend, KMatrix, QMatrix, UnitFormat, fold_planes


# -- linears and embeddings -------------------------------------------------------------------
class Linear(Protocol):
    """y = x @ W^T for a weight W [out, in], however it is held."""

    out_features: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, in] -> [T, out] in x's dtype."""
        ...

    def nbytes(self) -> int:
        """Bytes held."""
        ...


class FloatLinear:
    """W stored transposed [in, out] (decode walks output columns contiguously: faster on CPUs)."""

    def __init__(self, w_t: torch.Tensor):
        self.w_t = w_t
        self.out_features = w_t.shape[1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, self.w_t)  # [T, out]

    def nbytes(self) -> int:
        return self.w_t.numel() * self.w_t.element_size()

    @property
    def weight(self) -> torch.Tensor:
        """W [out, in] (a view)."""
        return self.w_t.t()


class RowLinear:
    """W kept row-major [out, in] (F.linear): a streamed bfloat16 model's float linears
    (refactor.stream). model.transposed's [in, out] layout is the faster one in float32, but in
    bfloat16 x @ W_t took ~8 ms for a 2048 x 5120 matrix out of cache, 2.6 GB/s (torch 2.13)."""

    def __init__(self, w: torch.Tensor):
        self.w = w
        self.out_features = w.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.w)  # [T, out]

    def nbytes(self) -> int:
        return self.w.numel() * self.w.element_size()


class QuantLinear:
    """An int4-kernel matrix (int4 or int8 as two planes)."""

    def __init__(self, km: KMatrix, backend: Int4Backend):
        self.km, self.backend = km, backend
        self.out_features = km.rows

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.backend.mm(x, self.km)  # [T, out]

    def nbytes(self) -> int:
        return self.km.nbytes()


class Embedding(Protocol):
    """Token id -> hidden vector."""

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [T] -> [T, D]."""
        ...

    def nbytes(self) -> int:
        """Bytes held."""
        ...


class FloatEmbedding:
    """Rows of a float matrix [V, D]."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids]  # [T, D]

    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


class QuantEmbedding:
    """Rows of a quantized matrix (storage form), dequantized when looked up."""

    def __init__(self, qm: QMatrix, *, dtype: torch.dtype, device: torch.device):
        self.qm, self.dtype = qm.to(device), dtype

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qm.rows_dequantized(ids).to(self.dtype)  # [T, D]

    def nbytes(self) -> int:
        return self.qm.nbytes()


class QuantHead(QuantLinear):
    """A quantized lm_head whose top logits are exact.

    The int4 kernels round their outputs to bfloat16: 8 significant bits, so logits near 25
    come out in steps of 0.125 and the two best tokens often tie. Every token's ``refine``
    best logits are recomputed in float32 from the weight's storage rows (the embedding's,
    when tied), so greedy decoding, top-k and the head of top-p see exact values.
    """

    def __init__(self, km: KMatrix, backend: Int4Backend, rows: QMatrix, *, refine: int = 64):
        super().__init__(km, backend)
        self.rows, self.refine = rows, refine

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.backend.mm(x, self.km).float()  # [T, V]
        top = y.topk(min(self.refine, y.shape[1]), dim=1).indices  # [T, r]
        w = self.rows.rows_dequantized(top.reshape(-1)).view(*top.shape, -1)  # [T, r, D]
        exact = torch.einsum("trd,td->tr", w, x.float())  # [T, r]
        return y.scatter(1, top, exact)

    def nbytes(self) -> int:
        return self.km.nbytes() + self.rows.nbytes()


# -- sub-expert FFN kernels ---------------------------------------------------------------------
class FFNKernel(Protocol):
    """Weighted sum of selected sub-experts' FFNs, computed in place from a pool."""

    # True: the kernel computes every part of an expert it reads whatever the selection (parts
    # left out weigh 0), so a selection may list every part of its experts with zero weights
    # instead of the selected ones alone (no host sync to list them; the same bytes read).
    reads_whole_experts: bool

    def __call__(self, x: torch.Tensor, pool, slots: torch.Tensor, wt: torch.Tensor | None) -> torch.Tensor:
        """x [T, D], slots [P] (CPU int64, ascending unit order), weights [P, T] -> [T, D].

        ``wt`` None: every selected sub-expert has weight 1 (a dense FFN at full K).
        """
        ...


def block_ffn(x: torch.Tensor, blocks: torch.Tensor, wt: torch.Tensor | None) -> torch.Tensor:
    """Weighted sum of float sub-expert FFNs: x [T, D], blocks [P, 3, n, D], weights [P, T]
    (None: all 1) -> [T, D]."""
    P, _, n, D = blocks.shape
    gu = blocks[:, :2].reshape(P, 2 * n, D)  # [P, 2n, D]
    # W x^T walks each weight row contiguously: ~20% faster than x W^T for decode.
    h = torch.matmul(gu, x.t()).transpose(1, 2)  # [P, T, 2n]
    act = F.silu(h[..., :n]) * h[..., n:]  # [P, T, n]
    if wt is not None:
        act = act * wt[:, :, None]  # [P, T, n]
    down = blocks[:, 2].reshape(P, D, n)  # [P, D, n] (W_down's columns, see build.pack_expert)
    return torch.matmul(down, act.transpose(1, 2)).sum(dim=0).t()  # [T, D]


def runs(slots: Sequence[int]) -> list[tuple[int, int, int]]:
    """Maximal runs of consecutive slots: (first index in ``slots``, first slot, length)."""
    out: list[tuple[int, int, int]] = []
    for i, s in enumerate(slots):
        if out and out[-1][1] + out[-1][2] == s:
            first, start, length = out[-1]
            out[-1] = (first, start, length + 1)
        else:
            out.append((i, s, 1))
    return out


class FloatUnits:
    """Float blocks [slots, 3, n, D]: each run of consecutive slots is a view (no gather copy)."""

    bytes_read = 0  # weight bytes the kernel has read (for benchmarks)
    reads_whole_experts = False  # runs of selected slots only

    def __call__(self, x: torch.Tensor, pool: torch.Tensor, slots: torch.Tensor,
                 wt: torch.Tensor | None) -> torch.Tensor:
        if pool.dtype != x.dtype:
            raise TypeError(f"slot pool is {pool.dtype} but compute is {x.dtype}")
        spans = runs(slots.tolist())
        self.bytes_read += slots.shape[0] * pool[0].numel() * pool.element_size()
        if len(spans) == 1:  # one run (every sub-expert of a resident layer, or a pinned one)
            return block_ffn(x, pool[spans[0][1]:spans[0][1] + spans[0][2]], wt)  # [T, D]
        out = None
        for i, start, length in spans:
            part = block_ffn(x, pool[start:start + length], None if wt is None else wt[i:i + length])  # [T, D]
            out = part if out is None else out + part
        return out


class QuantUnits:
    """Quantized blocks [slots, nbytes] in the kernel's layout: per sub-expert, one int4
    call for W_gate/W_up and one for W_down, on views of its slot made once per pool.

    ``pool`` may also be a pair (slot buffer, host blocks): a store that reads misses in
    place (store.BudgetedStore with ``in_place``) numbers host block ``i`` as slot
    ``num_slots + i``; the kernel reads both where they lie.
    """

    reads_whole_experts = False  # the selected sub-experts' blocks only

    def __init__(self, fmt: UnitFormat, backend: Int4Backend):
        self.fmt, self.backend = fmt, backend
        self._views: dict[tuple[int, int], list[tuple[KMatrix, KMatrix]]] = {}
        self.bytes_read = 0  # weight bytes the kernel has read (for benchmarks)

    def slot_views(self, pool: torch.Tensor | tuple[torch.Tensor, Sequence[torch.Tensor]]
                   ) -> list[tuple[KMatrix, KMatrix]]:
        """(GU, DN) kernel matrices of every slot of ``pool`` (cached per pool buffer)."""
        buffer, host = pool if isinstance(pool, tuple) else (pool, ())
        key = (buffer.data_ptr(), id(host))
        views = self._views.get(key)
        if views is None:
            g = self.fmt.gu.nbytes
            views = [(self.backend.view(b[:g], self.fmt.gu), self.backend.view(b[g:], self.fmt.dn))
                     for b in (*buffer.unbind(0), *host)]
            self._views[key] = views
        return views

    def __call__(self, x: torch.Tensor, pool, slots: torch.Tensor, wt: torch.Tensor | None) -> torch.Tensor:
        views = self.slot_views(pool)
        fmt, raw = self.fmt, self.backend.raw
        n, T = fmt.n, x.shape[0]
        xb = x.to(torch.bfloat16)
        ids = slots.tolist()
        self.bytes_read += len(ids) * fmt.nbytes
        h = torch.stack([raw(xb, views[s][0]) for s in ids])  # [P, T, R_gu]
        h = fold_units(h, fmt.gu_planes, 2 * n)  # [P, T, 2n]
        act = F.silu(h[..., :n]) * h[..., n:]  # [P, T, n] in bfloat16, the kernels' own precision
        if wt is not None:
            act = act * wt[:, :, None].to(act.dtype)
        ys = torch.stack([raw(a, views[s][1]) for a, s in zip(act.unbind(0), ids)])  # [P, T, R_dn]
        y = ys.sum(0, dtype=torch.float32)  # [T, R_dn]
        return fold_planes(y, fmt.dn_planes, fmt.hidden).to(x.dtype)  # [T, D]


def fold_units(h: torch.Tensor, planes: int, rows: int) -> torch.Tensor:
    """[..., T, planes * Np] kernel outputs -> [..., T, rows]."""
    if planes == 1:
        return h if h.shape[-1] == rows else h[..., :rows]
    return h.unflatten(-1, (planes, -1)).sum(-2)[..., :rows]


class ExpertMatrices:
    """One resident expert's sub-experts as two kernel matrices: GU [S*2n, D] (per part:
    its W_gate rows, then its W_up rows) and DN [D, S*n] (parts' W_down columns side by side)."""

    __slots__ = ("gu", "dn")

    def __init__(self, gu: KMatrix, dn: KMatrix):
        self.gu, self.dn = gu, dn

    def nbytes(self) -> int:
        """Bytes held."""
        return self.gu.nbytes() + self.dn.nbytes()


class QuantExperts:
    """Resident quantized experts of one layer shape: two int4 calls per routed expert.

    A partial selection of an expert's parts runs the whole expert with the unselected
    parts weighted 0. Taking only the selected rows would need their (scale, zero) rows
    gathered into a contiguous tensor every token (the kernel reads scales [K/g, N, 2]
    for exactly the rows it computes), and per-part calls cost ~6 us each at the default
    model's 96-neuron parts against ~3 us per part inside one call (measured: 156 us for
    12 per-part calls vs 79 us for the whole 16-part layer, 2-core Xeon). Under a memory
    budget the parts live in separate slots and QuantUnits computes exactly the selected ones.
    """

    reads_whole_experts = True

    def __init__(self, fmt: UnitFormat, parts: int, backend: Int4Backend):
        self.fmt, self.S, self.backend = fmt, parts, backend
        self.bytes_read = 0  # weight bytes the kernel has read (for benchmarks)

    def __call__(self, x: torch.Tensor, pool: Sequence[ExpertMatrices], slots: torch.Tensor,
                 wt: torch.Tensor | None) -> torch.Tensor:
        S, T = self.S, x.shape[0]
        xb = x.to(torch.bfloat16)
        ids = slots.tolist()
        out = None
        i = 0
        while i < len(ids):
            e = ids[i] // S
            j = i
            while j < len(ids) and ids[j] // S == e:
                j += 1
            if wt is None and j - i == S:
                w = None  # every part, weight 1
            elif j - i == S:
                w = wt[i:j]  # [S, T] every part
            elif x.is_cuda:
                # Row by row from Python ints: an index tensor made on the host would be a
                # pageable copy to the device (a host sync) per expert per token.
                w = x.new_zeros(S, T)
                for r, u in enumerate(ids[i:j]):
                    if wt is None:
                        w[u % S] = 1
                    else:
                        w[u % S] = wt[i + r]
            else:  # on the CPU one indexed write is cheaper than a write per part
                w = x.new_zeros(S, T)
                w[torch.tensor([u % S for u in ids[i:j]])] = 1 if wt is None else wt[i:j]
            y = self._expert(xb, pool[e], w)  # [T, D]
            self.bytes_read += pool[e].nbytes()
            out = y if out is None else out + y
            i = j
        return out if out.dtype == x.dtype else out.to(x.dtype)

    def _expert(self, xb: torch.Tensor, m: ExpertMatrices, w: torch.Tensor | None) -> torch.Tensor:
        fmt, S, raw = self.fmt, self.S, self.backend.raw
        n, T = fmt.n, xb.shape[0]
        h = fold_planes(raw(xb, m.gu), m.gu.planes, S * 2 * n).view(T, S, 2 * n)  # [T, S, 2n]
        act = F.silu(h[..., :n]) * h[..., n:]  # [T, S, n] in bfloat16, the kernels' own precision
        if w is not None:
            act = act * w.t()[:, :, None].to(act.dtype)  # [T, S, n]
        y = raw(act.reshape(T, S * n), m.dn)  # [T, R_dn]
        return fold_planes(y.float(), m.dn.planes, fmt.hidden)  # [T, D]


def expert_matrices(blocks: Sequence[torch.Tensor], fmt: UnitFormat, backend: Int4Backend) -> ExpertMatrices:
    """An expert's kernel matrices from its parts' stored blocks (part order)."""
    mats = [fmt.split(b) for b in blocks]
    gu = QMatrix.cat_rows([g for g, _ in mats])
    dn = QMatrix.cat_cols([d for _, d in mats])
    return ExpertMatrices(backend.pack(gu), backend.pack(dn))


def dense_expert_matrices(gate: QMatrix, up: QMatrix, down: QMatrix, backend: Int4Backend) -> ExpertMatrices:
    """A plain (unsplit) expert: GU = [W_gate; W_up], DN = W_down [D, W] as stored."""
    return ExpertMatrices(backend.pack(QMatrix.cat_rows([gate, up])), backend.pack(down))
