"""Quantized weights: the form they are stored in, how they get there, and the kernels that use them.

W [N, K] (GGUF Q4_0 / Q4_1 / Q8_0 / Q5_x / K-quants, or float quantized at refactor time)
    -> QMatrix: 4-bit codes in 64-row pair tiles + bfloat16 (scale, zero) per group of K
    -> Int4Backend.pack: the running kernel's own layout, made at load, never stored
    -> Int4Backend.mm(x, KMatrix) = x @ W^T, expanded only inside the kernel

One kernel family serves every precision: torch's weight-only int4 matmul computes
``x @ W^T`` with ``W = (c - 8) * scale + zero`` per group of ``group`` values along K
(``torch._weight_int4pack_mm_for_cpu`` on CPUs, ``torch._weight_int4pack_mm`` on CUDA
sm80+). Any affine 4-bit group ``W = d * q + m`` (Q4_0, Q4_1, Q4_K, int4) maps onto it
exactly: scale = d, zero = m + 8d. An 8-bit group ``W = d * q + m`` (Q8_0, Q5_x, int8) is
the sum of two 4-bit *planes* of the same code, ``q = 16 h + l``: a high plane with scale
16d and a low plane with scale d, their zeros adding to m + 136d; both planes are rows of
one matrix, so one kernel call reads each weight byte once and the two halves of the
output are added.

The kernels take bfloat16 activations and bfloat16 scales (torch 2.13's float32 and
float16 CPU paths are 30-50x slower: 1.37 ms and 2.3 ms against 45 us for a 3072 x 576
int4 matrix, measured on a 2-core AVX-512 Xeon), so a quantized model computes its
matmuls with bfloat16 inputs and outputs and keeps norms, softmax and the residual
stream in the engine's dtype. Scales and zeros are stored as bfloat16, the form both
kernels read.

Storage layout of the codes (``QMatrix.codes``, uint8 [R/64, 32, K]): rows are grouped
in tiles of 64; byte (t, j, k) holds row 64t+j in its low nibble and row 64t+32+j in its
high nibble. Rows are whole, so a matrix's rows (a sub-expert's W_gate / W_up rows)
are a byte range and tiles concatenate along rows and along K without re-quantizing.
This is a portable format, not a kernel's: ``pack`` turns it into whatever the running
kernel wants, which on AVX-512 CPUs happens to be a transpose of each tile, and elsewhere
is a full repack.

Inside a sub-expert block (``UnitFormat``: what the prism's experts file holds and what
streams into a slot) each tile is stored transposed, bytes [R/64, K, 32]: the same portable
bits in k-major order. That order is fixed by this format, whatever the CPU; where the
running kernel's packing is exactly it (``Int4Backend.native_blocks``, probed: AVX-512
CPUs) a streamed block is copied from the file straight into its slot with no conversion.
Measured on the default model's 104 KB blocks (2-core AVX-512 EPYC): 7 us per block from
the memory-mapped page cache (runtime.transfer.MappedFileTier), against a 22 us read plus
74 us of re-tiling when every miss was converted on its way in.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from edge_prism.errors import ConfigError

log = logging.getLogger(__name__)

TILE = 64  # rows per code tile
QUANT_KINDS = ("none", "int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)  # what the int4 kernels accept
DEFAULT_GROUP = 32
_PLANES = {"int4": 1, "int8": 2}
_BITS = {"int4": 4, "int8": 8}


def planes_of(kind: str) -> int:
    """4-bit planes a quantization kind takes (int4: 1, int8: 2)."""
    return _PLANES[kind]


def kind_of(planes: int) -> str:
    """The quantization kind of a matrix with ``planes`` 4-bit planes."""
    return {1: "int4", 2: "int8"}[planes]


def padded_rows(n: int) -> int:
    """``n`` rounded up to whole 64-row tiles."""
    return -(-n // TILE) * TILE


def check_group(group: int, cols: int, *, what: str) -> None:
    """A clear error unless ``group`` is a kernel group size dividing ``cols``."""
    if group not in GROUP_SIZES:
        raise ConfigError(f"invalid group size {group}: use one of {', '.join(map(str, GROUP_SIZES))}")
    if cols % group:
        raise ConfigError(f"{what} has {cols} columns, not a multiple of the quantization group {group}; "
                          f"use --quant none or a group size that divides {cols}")


def _plane_zeros(scale: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeros of the two planes of W = scale * q + offset, q = 16 h + l.

    The planes give (h - 8) * 16 scale + z_hi and (l - 8) * scale + z_lo, so z_hi + z_lo
    must be offset + 136 scale. Each zero is rounded to bfloat16; per group, put the offset
    where it rounds best: (128 scale + offset, 8 scale) is exact for symmetric groups
    (Q8_0: offset = -128 scale), (128 scale, 8 scale + offset) for narrow codes (Q5_x).
    """
    def bf(t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.bfloat16).float()

    a_hi, b_lo = 128 * scale + offset, 8 * scale + offset
    a_err, b_err = (bf(a_hi) - a_hi).abs(), (bf(b_lo) - b_lo).abs()
    use_a = a_err <= b_err
    return torch.where(use_a, a_hi, 128 * scale), torch.where(use_a, 8 * scale, b_lo)


# -- codes <-> tiles -------------------------------------------------------------------------
def tile_codes(c: torch.Tensor) -> torch.Tensor:
    """Codes [R, K] (uint8, 0..15, R a multiple of 64) -> pair tiles [R/64, 32, K]."""
    R, K = c.shape
    t = c.reshape(R // TILE, 2, TILE // 2, K)
    return t[:, 0] | (t[:, 1] << 4)


def untile_codes(t: torch.Tensor) -> torch.Tensor:
    """Pair tiles [R/64, 32, K] -> codes [R, K] (uint8, 0..15)."""
    T, half, K = t.shape
    return torch.stack((t & 15, t >> 4), dim=1).reshape(T * 2 * half, K)


@dataclass
class QMatrix:
    """A quantized weight W [rows, cols] in storage form (see the module docstring).

    ``planes`` 4-bit planes of ``padded_rows(rows)`` rows each are stacked plane-major;
    W = sum over planes of (c - 8) * scale + zero, cut to ``rows``.
    """

    codes: torch.Tensor  # uint8 [R/64, 32, K], R = planes * padded_rows(rows)
    sz: torch.Tensor  # bfloat16 [K/group, R, 2]: (scale, zero) per group and row
    rows: int
    planes: int

    @property
    def cols(self) -> int:
        """K: the input dimension."""
        return self.codes.shape[2]

    @property
    def group(self) -> int:
        """Values of K sharing one (scale, zero)."""
        return self.cols // self.sz.shape[0]

    @property
    def kind(self) -> str:
        """'int4' or 'int8'."""
        return kind_of(self.planes)

    @property
    def plane_rows(self) -> int:
        """Rows of one plane (``rows`` padded to whole tiles)."""
        return padded_rows(self.rows)

    def nbytes(self) -> int:
        """Bytes of codes and scales."""
        return self.codes.numel() + self.sz.numel() * 2

    # -- construction --------------------------------------------------------------------
    @classmethod
    def from_affine(cls, q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, *, bits: int,
                    rows: int | None = None) -> "QMatrix":
        """W = scale * q + offset per group: q [N, K] integer codes in [0, 2**bits), scale and
        offset [N, K/g] float. ``bits`` <= 4 gives one plane, <= 8 two."""
        N, K = q.shape
        g = K // scale.shape[1]
        scale, offset = scale.float(), offset.float()
        if bits <= 4:
            planes = [(q, scale, offset + 8 * scale)]
        elif bits <= 8:
            q = q.to(torch.int32)
            z_hi, z_lo = _plane_zeros(scale, offset)
            planes = [(q >> 4, 16 * scale, z_hi), (q & 15, scale, z_lo)]
        else:
            raise ValueError(f"cannot store {bits}-bit codes")
        Np = padded_rows(N)
        codes = torch.full((len(planes) * Np, K), 8, dtype=torch.uint8)
        sz = torch.zeros(K // g, len(planes) * Np, 2, dtype=torch.bfloat16)
        for p, (c, s, z) in enumerate(planes):
            codes[p * Np:p * Np + N] = c.to(torch.uint8)
            sz[:, p * Np:p * Np + N, 0] = s.t().to(torch.bfloat16)
            sz[:, p * Np:p * Np + N, 1] = z.t().to(torch.bfloat16)
        return cls(tile_codes(codes), sz, N if rows is None else rows, len(planes))

    @classmethod
    def quantize(cls, w: torch.Tensor, kind: str, group: int = DEFAULT_GROUP, *,
                 chunk_rows: int = 8192) -> "QMatrix":
        """Round float W [N, K] to ``kind`` ('int4' | 'int8'), asymmetric min-max per group.

        The bfloat16 rounding of scale and zero is taken into account when the codes are
        chosen, so the stored matrix is the nearest one the kernels can represent. Rows are
        done ``chunk_rows`` at a time, so a vocabulary-sized matrix never has several float
        copies alive at once.
        """
        if w.shape[0] > chunk_rows:
            return cls._join_row_chunks([cls.quantize(w[i:i + chunk_rows], kind, group, chunk_rows=chunk_rows)
                                         for i in range(0, w.shape[0], chunk_rows)])
        w = w.float()
        N, K = w.shape
        check_group(group, K, what="a weight")
        levels = (1 << _BITS[kind]) - 1
        wg = w.reshape(N, K // group, group)
        lo, hi = wg.amin(-1), wg.amax(-1)  # [N, K/g]
        scale = ((hi - lo) / levels).to(torch.bfloat16).float()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        if kind == "int4":
            zero = (lo + 8 * scale).to(torch.bfloat16).float()
            offset = zero - 8 * scale  # what the kernel adds back
        else:
            z_lo = (lo + 8 * scale).to(torch.bfloat16).float()
            offset = z_lo - 8 * scale  # the low plane's zero carries the offset (see _plane_zeros)
        q = torch.round((wg - offset[..., None]) / scale[..., None]).clamp(0, levels)
        return cls.from_affine(q.reshape(N, K), scale, offset, bits=_BITS[kind])

    @classmethod
    def quantize_measured(cls, w: torch.Tensor, kind: str, group: int = DEFAULT_GROUP, *,
                          chunk_rows: int = 8192) -> tuple["QMatrix", float]:
        """quantize() and its relative_error against ``w``, measured chunk by chunk.

        Dequantizing a vocabulary-sized matrix whole to measure the error kept several float
        copies of it alive (refactoring a Qwen3-30B-A3B-shaped checkpoint peaked at 18 GiB in
        that step, against 4.3 GiB for calibrating its layers).
        """
        chunks, num, den = [], 0.0, 0.0
        for i in range(0, w.shape[0], chunk_rows):
            part = w[i:i + chunk_rows].float()
            q = cls.quantize(part, kind, group, chunk_rows=chunk_rows)
            num += float((q.dequantize().double() - part.double()).square().sum())
            den += float(part.double().square().sum())
            chunks.append(q)
        q = chunks[0] if len(chunks) == 1 else cls._join_row_chunks(chunks)
        return q, (num ** 0.5 / den ** 0.5 if den > 0 else 0.0)

    @staticmethod
    def _join_row_chunks(chunks: Sequence["QMatrix"]) -> "QMatrix":
        """Row chunks (all but the last a whole number of tiles, one kind) as one matrix."""
        planes = chunks[0].planes
        codes, sz = [], []
        for p in range(planes):
            for c in chunks:
                t = c.plane_rows // TILE
                codes.append(c.codes[p * t:(p + 1) * t])
                sz.append(c.sz[:, p * c.plane_rows:(p + 1) * c.plane_rows])
        return QMatrix(torch.cat(codes), torch.cat(sz, dim=1), sum(c.rows for c in chunks), planes)

    # -- views of the values -------------------------------------------------------------
    def plane_codes(self) -> torch.Tensor:
        """Codes [planes, padded rows, K] (uint8, 0..15)."""
        return untile_codes(self.codes).view(self.planes, self.plane_rows, self.cols)

    def dequantize(self) -> torch.Tensor:
        """W [rows, K] in float32, exactly what the kernels compute with."""
        c = self.plane_codes().float()  # [p, Np, K]
        s = self.sz.float().view(self.sz.shape[0], self.planes, self.plane_rows, 2)  # [K/g, p, Np, 2]
        g = self.group
        scale = s[..., 0].permute(1, 2, 0).repeat_interleave(g, dim=-1)  # [p, Np, K]
        zero = s[..., 1].permute(1, 2, 0).repeat_interleave(g, dim=-1)
        return ((c - 8) * scale + zero).sum(0)[: self.rows]

    def rows_dequantized(self, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` [M] of W as float32 [M, K], read from the tiles (no full unpacking):
        exactly dequantize()[index]. Every plane in one pass, scales broadcast over their
        groups, no repeat or transposed operand: the lm_head's 64 refined rows of the default
        model's int8 head take ~0.3-0.4 ms per decode token instead of ~1.06 ms (2-core EPYC)."""
        Np, g, P, K = self.plane_rows, self.group, self.planes, self.cols
        M = index.shape[0]
        r = index if P == 1 else torch.cat([index + p * Np for p in range(P)])  # [P*M]
        byte = self.codes[r // TILE, r % (TILE // 2)]  # [P*M, K]
        shift = (r % TILE >= TILE // 2).to(torch.uint8)[:, None] * 4  # high nibble: the tile's second half
        c = ((byte >> shift) & 15).float().view(P * M, K // g, g)
        s = self.sz.index_select(1, r).float().transpose(0, 1)  # [P*M, K/g, 2]
        w = ((c - 8) * s[..., :1] + s[..., 1:]).view(P, M, K)
        return w[0] if P == 1 else w.sum(0)

    def to(self, device: torch.device) -> "QMatrix":
        """The same matrix on ``device``."""
        return QMatrix(self.codes.to(device), self.sz.to(device), self.rows, self.planes)

    def _parts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Codes [p, Np, K] and sz [K/g, p, Np, 2]."""
        return self.plane_codes(), self.sz.view(self.sz.shape[0], self.planes, self.plane_rows, 2)

    @classmethod
    def _from_parts(cls, c: torch.Tensor, sz: torch.Tensor, rows: int) -> "QMatrix":
        p, Np, K = c.shape
        return cls(tile_codes(c.reshape(p * Np, K)), sz.reshape(sz.shape[0], p * Np, 2).contiguous(), rows, p)

    def with_planes(self, planes: int) -> "QMatrix":
        """The same W with ``planes`` planes (an int4 matrix as int8: an empty high plane)."""
        if planes == self.planes:
            return self
        if (self.planes, planes) != (1, 2):
            raise ValueError(f"cannot turn {self.planes} planes into {planes}")
        c, sz = self._parts()
        c = torch.cat((torch.full_like(c, 8), c))  # high plane: (8 - 8) * 0 + 0 = 0
        sz = torch.cat((torch.zeros_like(sz), sz), dim=1)
        return QMatrix._from_parts(c, sz, self.rows)

    def take_rows(self, index: torch.Tensor | Sequence[int]) -> "QMatrix":
        """Rows ``index`` of W, in that order (whole rows move: exact)."""
        index = torch.as_tensor(index, dtype=torch.long)
        c, sz = self._parts()
        rows = index.numel()
        Np = padded_rows(rows)
        out_c = torch.full((self.planes, Np, self.cols), 8, dtype=torch.uint8)
        out_sz = torch.zeros(sz.shape[0], self.planes, Np, 2, dtype=sz.dtype)
        out_c[:, :rows] = c[:, index]
        out_sz[:, :, :rows] = sz[:, :, index]
        return QMatrix._from_parts(out_c, out_sz, rows)

    def take_col_groups(self, groups: torch.Tensor | Sequence[int]) -> "QMatrix":
        """Whole quantization groups of columns (group ``j``: columns j*g .. j*g+g-1), in that
        order: codes and their (scale, zero) pairs move together, so the values are exact."""
        groups = torch.as_tensor(groups, dtype=torch.long)
        cols = (groups[:, None] * self.group + torch.arange(self.group)).reshape(-1)
        return QMatrix(self.codes[:, :, cols].contiguous(), self.sz[groups].contiguous(), self.rows, self.planes)

    @staticmethod
    def cat_rows(mats: Sequence["QMatrix"]) -> "QMatrix":
        """Rows of ``mats`` stacked (same K and group; planes are unified)."""
        planes = max(m.planes for m in mats)
        mats = [m.with_planes(planes) for m in mats]
        if len({(m.cols, m.group) for m in mats}) != 1:
            raise ValueError("cat_rows needs matrices of one K and group size")
        if all(m.rows == m.plane_rows for m in mats) and planes == 1:
            return QMatrix(torch.cat([m.codes for m in mats]), torch.cat([m.sz for m in mats], dim=1),
                           sum(m.rows for m in mats), 1)
        parts = [m._parts() for m in mats]
        c = torch.cat([p[0][:, : m.rows] for p, m in zip(parts, mats)], dim=1)
        sz = torch.cat([p[1][:, :, : m.rows] for p, m in zip(parts, mats)], dim=2)
        rows = c.shape[1]
        Np = padded_rows(rows)
        c = torch.cat((c, torch.full((planes, Np - rows, c.shape[2]), 8, dtype=torch.uint8)), dim=1)
        sz = torch.cat((sz, torch.zeros(sz.shape[0], planes, Np - rows, 2, dtype=sz.dtype)), dim=2)
        return QMatrix._from_parts(c, sz, rows)

    @staticmethod
    def cat_cols(mats: Sequence["QMatrix"]) -> "QMatrix":
        """Columns of ``mats`` side by side (same rows, planes and group): tiles join along K."""
        m0 = mats[0]
        if any((m.rows, m.planes, m.group) != (m0.rows, m0.planes, m0.group) for m in mats):
            raise ValueError("cat_cols needs matrices of equal rows, planes and group size")
        return QMatrix(torch.cat([m.codes for m in mats], dim=2), torch.cat([m.sz for m in mats], dim=0),
                       m0.rows, m0.planes)

    # -- bytes -------------------------------------------------------------------------
    def to_bytes(self) -> torch.Tensor:
        """codes (tiles transposed, [R/64, K, 32]: the block order, see the module docstring)
        then sz, as one uint8 tensor (a sub-expert block's part)."""
        codes = self.codes.transpose(1, 2).contiguous().reshape(-1)
        return torch.cat((codes, self.sz.contiguous().view(torch.uint8).reshape(-1)))


@dataclass(frozen=True)
class MatrixLayout:
    """Shape of a QMatrix inside a byte block: what ``QMatrix.to_bytes`` writes."""

    rows: int
    cols: int
    planes: int
    group: int

    @property
    def R(self) -> int:
        """Stored rows: planes x padded rows."""
        return self.planes * padded_rows(self.rows)

    @property
    def code_bytes(self) -> int:
        """Bytes of the codes."""
        return self.R * self.cols // 2

    @property
    def nbytes(self) -> int:
        """Bytes of codes and scales."""
        return self.code_bytes + (self.cols // self.group) * self.R * 4

    def codes_view(self, b: torch.Tensor) -> torch.Tensor:
        """Storage tiles [R/64, 32, K] (a strided view) of the block-order codes at the start of ``b``."""
        return b[: self.code_bytes].view(self.R // TILE, self.cols, TILE // 2).transpose(1, 2)

    def view(self, b: torch.Tensor) -> QMatrix:
        """The QMatrix stored in bytes ``b`` (views, no copy)."""
        codes = self.codes_view(b)
        sz = b[self.code_bytes:self.nbytes].view(torch.bfloat16).view(self.cols // self.group, self.R, 2)
        return QMatrix(codes, sz, self.rows, self.planes)


@dataclass(frozen=True)
class UnitFormat:
    """Byte layout of one quantized sub-expert block: GU [2n, D] (W_gate rows then W_up
    rows of its n neurons) followed by DN [D, n] (W_down's columns for those neurons)."""

    n: int
    hidden: int
    gu_planes: int
    dn_planes: int
    group: int

    @property
    def gu(self) -> MatrixLayout:
        """Layout of the gate/up matrix [2n, D]."""
        return MatrixLayout(2 * self.n, self.hidden, self.gu_planes, self.group)

    @property
    def dn(self) -> MatrixLayout:
        """Layout of the down matrix [D, n]."""
        return MatrixLayout(self.hidden, self.n, self.dn_planes, self.group)

    @property
    def nbytes(self) -> int:
        """Bytes of one block."""
        return self.gu.nbytes + self.dn.nbytes

    def split(self, block: torch.Tensor) -> tuple[QMatrix, QMatrix]:
        """(GU, DN) stored in one block's bytes (views)."""
        g = self.gu.nbytes
        return self.gu.view(block[:g]), self.dn.view(block[g:])

    def pack_block(self, gu: QMatrix, dn: QMatrix) -> torch.Tensor:
        """One block's bytes [nbytes] from its two matrices."""
        out = torch.cat((gu.to_bytes(), dn.to_bytes()))
        assert out.numel() == self.nbytes, (out.numel(), self.nbytes)
        return out

    def to_kernel(self, src: torch.Tensor, dst: torch.Tensor, backend: "Int4Backend") -> None:
        """Write block ``src`` (storage form, host bytes) into ``dst`` in ``backend``'s layout."""
        if backend.native_blocks:
            dst.copy_(src)
            return
        off = 0
        for layout in (self.gu, self.dn):
            s, d = src[off:off + layout.nbytes], dst[off:off + layout.nbytes]
            backend.pack_codes_into(layout.codes_view(s), d[: layout.code_bytes], layout)
            d[layout.code_bytes:].copy_(s[layout.code_bytes:])
            off += layout.nbytes

    def record(self) -> dict:
        """JSON form for manifests."""
        return {"n": self.n, "hidden": self.hidden, "gu": kind_of(self.gu_planes),
                "dn": kind_of(self.dn_planes), "group": self.group}

    @classmethod
    def from_record(cls, rec: dict) -> "UnitFormat":
        """Inverse of record()."""
        return cls(int(rec["n"]), int(rec["hidden"]), planes_of(rec["gu"]), planes_of(rec["dn"]), int(rec["group"]))


def unit_check(n: int, group: int, *, what: str) -> None:
    """A clear error unless sub-experts of ``n`` neurons can be quantized in groups of ``group``."""
    if n % group:
        raise ConfigError(f"{what}: sub-experts of {n} neurons do not split into quantization groups of "
                          f"{group}; use --quant none, a smaller --group-size, or fewer --sub-experts")


# -- kernels -----------------------------------------------------------------------------------
@dataclass
class KMatrix:
    """A QMatrix in the running kernel's layout, on the compute device."""

    packed: torch.Tensor  # the kernel's weight tensor
    sz: torch.Tensor  # bfloat16 [K/g, R, 2]
    rows: int
    planes: int
    group: int

    @property
    def plane_rows(self) -> int:
        """Rows of one plane."""
        return self.sz.shape[1] // self.planes

    def nbytes(self) -> int:
        """Bytes held on the device."""
        return self.packed.numel() * self.packed.element_size() + self.sz.numel() * 2


class Int4Backend:
    """The int4 matmul of one device: packing to its layout and ``x @ W^T``.

    ``name`` says which path runs ('cpu-int4pack', 'cuda-int4pack' or 'dequant': expand
    each weight to the compute dtype in a scratch buffer and use a plain matmul, for devices
    without an int4 kernel).
    """

    name = "dequant"
    native_blocks = False  # whether the kernel reads a stored sub-expert block as it is

    def __init__(self, device: torch.device):
        self.device = torch.device(device)

    # Layout of a packed matrix: how many bytes and which view of a block's bytes.
    def packed_view(self, b: torch.Tensor, layout: MatrixLayout) -> torch.Tensor:
        """The kernel weight tensor stored in bytes ``b`` (a slot's view)."""
        return b.view(layout.R // TILE, TILE // 2, layout.cols)

    def pack_codes(self, codes: torch.Tensor, layout: MatrixLayout) -> torch.Tensor:
        """Storage tiles [R/64, 32, K] (any device) -> this kernel's weight tensor (new)."""
        return codes.to(self.device)

    def pack_codes_into(self, codes: torch.Tensor, dst: torch.Tensor, layout: MatrixLayout) -> None:
        """Write the packed form of storage tiles ``codes`` into ``dst`` (the uint8 bytes of a
        block's codes, on any device)."""
        dst.copy_(self.pack_codes(codes, layout).contiguous().view(torch.uint8).reshape(dst.shape))

    def pack(self, qm: QMatrix) -> KMatrix:
        """``qm`` on this device in the kernel's layout."""
        layout = MatrixLayout(qm.rows, qm.cols, qm.planes, qm.group)
        return KMatrix(self.pack_codes(qm.codes, layout), qm.sz.to(self.device).contiguous(), qm.rows,
                       qm.planes, qm.group)

    def view(self, b: torch.Tensor, layout: MatrixLayout) -> KMatrix:
        """A KMatrix over bytes ``b`` holding the packed form (views, no copy)."""
        sz = b[layout.code_bytes:layout.nbytes].view(torch.bfloat16).view(layout.cols // layout.group, layout.R, 2)
        return KMatrix(self.packed_view(b[: layout.code_bytes], layout), sz, layout.rows, layout.planes,
                       layout.group)

    def raw(self, x: torch.Tensor, km: KMatrix) -> torch.Tensor:
        """x [T, K] (bfloat16) @ W_planes^T -> [T, R] (bfloat16): every plane's rows."""
        c = untile_codes(km.packed).float()  # [R, K]
        s = km.sz.float().repeat_interleave(km.group, dim=0)  # [K, R, 2]
        w = (c - 8) * s[..., 0].t() + s[..., 1].t()  # [R, K]
        return torch.matmul(x.float(), w.t()).to(torch.bfloat16)

    def mm(self, x: torch.Tensor, km: KMatrix) -> torch.Tensor:
        """x [T, K] @ W^T -> [T, rows] in x's dtype."""
        y = self.raw(x.to(torch.bfloat16), km)  # [T, R]
        return fold_planes(y, km.planes, km.rows).to(x.dtype)


def fold_planes(y: torch.Tensor, planes: int, rows: int) -> torch.Tensor:
    """Kernel output [T, planes * Np] -> W x [T, rows]: planes added, padding cut."""
    if planes == 1:
        return y if y.shape[-1] == rows else y[..., :rows]
    T = y.shape[0]
    return y.view(T, planes, -1).sum(1)[:, :rows]


class CpuInt4Backend(Int4Backend):
    """torch._weight_int4pack_mm_for_cpu: bfloat16 activations, weights packed per CPU."""

    name = "cpu-int4pack"

    def __init__(self, device: torch.device):
        super().__init__(device)
        self.tile_transpose = _cpu_layout_is_tile_transpose()
        self.native_blocks = self.tile_transpose  # block order = this CPU's packing

    def packed_view(self, b: torch.Tensor, layout: MatrixLayout) -> torch.Tensor:
        return b.view(layout.R, layout.cols // 2)

    def pack_codes(self, codes: torch.Tensor, layout: MatrixLayout) -> torch.Tensor:
        R, K = layout.R, layout.cols
        if self.tile_transpose:
            return codes.transpose(1, 2).contiguous().view(R, K // 2)
        return torch._convert_weight_to_int4pack_for_cpu(untile_codes(codes).to(torch.int32), 1)

    def pack_codes_into(self, codes: torch.Tensor, dst: torch.Tensor, layout: MatrixLayout) -> None:
        if self.tile_transpose:  # one strided copy, no temporary
            # numpy's byte transpose: 42 vs 57 us per default-model block (torch's copy_)
            out = dst.view(layout.R // TILE, layout.cols, TILE // 2)
            np.copyto(out.numpy(), codes.numpy().transpose(0, 2, 1))
        else:
            dst.copy_(self.pack_codes(codes, layout).reshape(dst.shape))

    def raw(self, x: torch.Tensor, km: KMatrix) -> torch.Tensor:
        return torch._weight_int4pack_mm_for_cpu(x, km.packed, km.group, km.sz)


class CudaInt4Backend(Int4Backend):
    """torch._weight_int4pack_mm (tinygemm): CUDA sm80+ (Ampere, Jetson Orin, Ada, Hopper).

    Packed layout [R/8, K/(16*inner), 32, inner/2] int32, made on the device.
    """

    name = "cuda-int4pack"

    @staticmethod
    def inner_k_tiles(cols: int) -> int:
        """The widest inner tiling K allows (8, 4 or 2)."""
        for inner in (8, 4, 2):
            if cols % (16 * inner) == 0:
                return inner
        raise ConfigError(f"the CUDA int4 kernel needs K divisible by 32, got {cols}")

    def packed_view(self, b: torch.Tensor, layout: MatrixLayout) -> torch.Tensor:
        inner = self.inner_k_tiles(layout.cols)
        return b.view(torch.int32).view(layout.R // 8, layout.cols // (16 * inner), 32, inner // 2)

    def pack_codes(self, codes: torch.Tensor, layout: MatrixLayout) -> torch.Tensor:
        c = untile_codes(codes.to(self.device))  # [R, K]
        # The CUDA packer takes two codes per byte, the even column in the high nibble.
        pairs = ((c[:, 0::2] << 4) | c[:, 1::2]).contiguous()
        return torch._convert_weight_to_int4pack(pairs, self.inner_k_tiles(layout.cols))

    def raw(self, x: torch.Tensor, km: KMatrix) -> torch.Tensor:
        return torch._weight_int4pack_mm(x, km.packed, km.group, km.sz)


@functools.lru_cache(maxsize=None)
def _cpu_layout_is_tile_transpose() -> bool:
    """Whether this CPU's int4 packing is our storage tiles transposed (AVX-512: 64-row
    blocks holding rows j and j+32 per byte). Probed once with a random matrix."""
    gen = torch.Generator().manual_seed(0)
    c = torch.randint(0, 16, (2 * TILE, 3 * DEFAULT_GROUP), dtype=torch.uint8, generator=gen)
    try:
        packed = torch._convert_weight_to_int4pack_for_cpu(c.to(torch.int32), 1)
    except RuntimeError:
        return False
    mine = tile_codes(c).transpose(1, 2).contiguous().view(packed.shape)
    return packed.dtype == torch.uint8 and torch.equal(packed, mine)


@functools.lru_cache(maxsize=None)
def _probe(device_type: str, index: int | None) -> str:
    """Which int4 path works on a device: tried once on a small matrix against a reference."""
    device = torch.device(device_type, index) if index is not None else torch.device(device_type)
    candidates: list[type[Int4Backend]] = []
    if device.type == "cpu" and hasattr(torch, "_weight_int4pack_mm_for_cpu"):
        candidates.append(CpuInt4Backend)
    if device.type == "cuda" and hasattr(torch, "_weight_int4pack_mm"):
        candidates.append(CudaInt4Backend)
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(TILE, 2 * DEFAULT_GROUP, generator=gen)
    qm = QMatrix.quantize(w, "int4")
    x = torch.randn(2, w.shape[1], generator=gen).to(torch.bfloat16)
    want = x.float() @ qm.dequantize().t()
    for cls in candidates:
        try:
            b = cls(device)
            got = b.raw(x.to(device), b.pack(qm)).float().cpu()
        except (RuntimeError, NotImplementedError, ConfigError) as e:
            log.info("int4 kernel %s unavailable on %s: %s", cls.name, device, e)
            continue
        if torch.allclose(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max())):
            return cls.name
        log.warning("int4 kernel %s gave wrong results on %s; falling back", cls.name, device)
    return Int4Backend.name


def backend_for(device: torch.device) -> Int4Backend:
    """The int4 backend that works on ``device`` (probed once; 'dequant' when no kernel does)."""
    device = torch.device(device)
    name = _probe(device.type, device.index)
    cls = {c.name: c for c in (CpuInt4Backend, CudaInt4Backend, Int4Backend)}[name]
    return cls(device)


# -- measuring conversions ---------------------------------------------------------------------
def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """||approx - exact|| / ||exact|| (0 for an all-zero ``exact``)."""
    denom = float(exact.float().norm())
    return float((approx.float() - exact.float()).norm()) / denom if denom > 0 else 0.0


def bits_per_weight(qm: QMatrix | MatrixLayout) -> float:
    """Stored bits per weight value, scales included."""
    rows, cols = qm.rows, qm.cols
    nbytes = qm.nbytes() if isinstance(qm, QMatrix) else qm.nbytes
    return 8 * nbytes / (rows * cols) if rows * cols else math.nan
