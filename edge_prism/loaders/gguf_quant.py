"""GGUF quantized tensors -> QMatrix, keeping their bits.

ggml block types whose groups are 32 values with an affine (scale, offset) map exactly
onto the int4 kernels' groups (edge_prism.quant), up to the bfloat16 rounding of scale
and zero that the kernels read:

    Q4_0  W = d (q - 8)            q in 0..15  -> int4
    Q4_1  W = d q + m              q in 0..15  -> int4
    Q4_K  W = (d sc_j) q - dmin m_j  per 32     -> int4
    Q5_0  W = d (q - 16)           q in 0..31  -> int8 (two 4-bit planes)
    Q5_1  W = d q + m              q in 0..31  -> int8
    Q8_0  W = d q                  q in -128..127 -> int8

Every other type gguf can dequantize (Q2_K, Q3_K, Q5_K, Q6_K, IQ*, ...) is converted once,
at load or refactor time, to the nearest supported format: int8 for types of 5 bits or
more, int4 below, groups of 32; the conversion's relative error is returned so callers
can report it. F32 / F16 / BF16 tensors are not quantized (the caller reads them as floats).
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants

from edge_prism.quant import QMatrix

FLOAT_TYPES = frozenset({T.F32, T.F16, T.BF16, T.F64})
EXACT_TYPES = frozenset({T.Q4_0, T.Q4_1, T.Q4_K, T.Q5_0, T.Q5_1, T.Q8_0})
# Bits per value of the converted types: >= 5 become int8, the rest int4.
_WIDE = frozenset({T.Q5_K, T.Q6_K, T.Q8_1, T.Q8_K})


def is_quantized(qtype: T) -> bool:
    """Whether a tensor of this type is kept quantized (not a plain float type)."""
    return qtype not in FLOAT_TYPES and qtype not in (T.I8, T.I16, T.I32, T.I64)


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)[..., 0]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., 16] bytes -> [..., 32] values: low nibbles first, then high (ggml's order)."""
    return np.concatenate((qs & 0x0F, qs >> 4), axis=-1)


def _affine(data: np.ndarray, qtype: T, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(q [N, K], scale [N, K/32], offset [N, K/32], bits) of an exactly mappable type."""
    g = cols // 32
    if qtype == T.Q4_K:
        b = data.reshape(rows, cols // 256, 144)
        d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        sc, mn = quants.Q4_K.get_scale_min(b[..., 4:16].reshape(-1, 12))
        sc = sc.reshape(rows, -1, 8).astype(np.float32)
        mn = mn.reshape(rows, -1, 8).astype(np.float32)
        qs = b[..., 16:].reshape(rows, -1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 1, 2, 1)
        q = (qs & 0x0F).reshape(rows, cols)
        scale = (d[..., None] * sc).reshape(rows, g)
        offset = -(dmin[..., None] * mn).reshape(rows, g)
        return q, scale, offset, 4
    size = {T.Q4_0: 18, T.Q4_1: 20, T.Q5_0: 22, T.Q5_1: 24, T.Q8_0: 34}[qtype]
    b = data.reshape(rows, g, size)
    d = _f16(b[..., 0:2])
    if qtype == T.Q8_0:
        q = b[..., 2:].view(np.int8).astype(np.int16) + 128
        return q.reshape(rows, cols), d, -128 * d, 8
    if qtype in (T.Q4_0, T.Q4_1):
        m = _f16(b[..., 2:4]) if qtype == T.Q4_1 else -8 * d
        q = _nibbles(b[..., -16:])
        return q.reshape(rows, cols), d, m, 4
    m = _f16(b[..., 2:4]) if qtype == T.Q5_1 else -16 * d
    qh = np.ascontiguousarray(b[..., -20:-16]).view(np.uint32)  # [N, g, 1]: bit j is value j's 5th bit
    high = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)  # [N, g, 32]
    q = _nibbles(b[..., -16:]) | (high << 4)
    return q.reshape(rows, cols), d, m, 8


def to_qmatrix(data: np.ndarray, qtype: T, shape: tuple[int, int]) -> tuple[QMatrix, float]:
    """A GGUF tensor's raw blocks as a QMatrix [rows, cols] and the conversion's relative
    error against the file's own dequantization (0.0 for the exact types)."""
    rows, cols = shape
    if qtype in EXACT_TYPES and cols % (256 if qtype == T.Q4_K else 32) == 0:
        q, scale, offset, bits = _affine(np.asarray(data), qtype, rows, cols)
        qm = QMatrix.from_affine(torch.from_numpy(np.ascontiguousarray(q)).to(torch.int32),
                                 torch.from_numpy(np.ascontiguousarray(scale)),
                                 torch.from_numpy(np.ascontiguousarray(offset)), bits=bits)
        return qm, 0.0
    w = torch.from_numpy(np.asarray(quants.dequantize(data, qtype), dtype=np.float32).reshape(rows, cols))
    kind = "int8" if qtype in _WIDE else "int4"
    return QMatrix.quantize_measured(w, kind)  # a vocabulary-sized matrix: measured per row chunk


def dequantized(data: np.ndarray, qtype: T, shape: tuple[int, ...]) -> torch.Tensor:
    """The file's own float32 values of a tensor (the reference every conversion is judged by)."""
    return torch.from_numpy(np.asarray(quants.dequantize(data, qtype), dtype=np.float32).reshape(shape))
