"""Calibration one decoder layer at a time, from the source files: refactoring a model
larger than memory.

calibration ids -> [embedding rows] -> hidden states of every calibration token [T, D]
-> per layer: [that layer's attention weights, read now] attention over each chunk (causal
within it) -> router over all tokens -> observer (routed inputs) -> each routed expert read
from the source, applied to its tokens, dropped -> the caller partitions this layer -> next

Peak memory: the hidden states of the calibration tokens, one layer's attention weights,
one expert at a time, and the observer's samples of the layer being partitioned; never
the whole model. The forward is the engine's own (Transformer._attention, route, _ffn),
so every family computes exactly as it does when it runs.

Tensors of a safetensors source are read into private buffers (ReadSource: pread, not
views on the mapping), so what a pass holds is what it uses: pages of a mapping, once
touched, stay in the process's resident set until it is unmapped, and a refactoring reads
every byte of the model. The calibration-text generation runs the source model the same
way (source_engine): attention, norms and routers held in the source's 16-bit precision,
every selected expert read from the files when a token uses it.
"""

from __future__ import annotations

import os
import threading
import weakref
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from edge_prism.build import TensorReader, build_layer, check_shapes, expected_shapes, expert_matrices
from edge_prism.engine import Engine
from edge_prism.families import FAMILIES, build_spec
from edge_prism.kernels import FloatLinear, RowLinear
from edge_prism.loaders import open_checkpoint
from edge_prism.model import Transformer, Weights, _rms
from edge_prism.plain import build_plain
from edge_prism.quant import backend_for
from edge_prism.runtime.transfer import open_binary, read_fully
from edge_prism.spec import ModelSpec

# A source whose weights, as a fully resident engine holds them, take at most this many
# bytes generates its calibration text with that engine (fast, and the text it wrote before
# the streamed engine existed); a larger one streams its experts from the files.
RESIDENT_GENERATION_BYTES = 1 << 30


class ReadSource:
    """A safetensors TensorSource whose tensors are read from the files into private
    buffers (positional reads, safe across threads) instead of viewed on the mapping.

    A buffer is freed when its last tensor is; the page cache keeps the bytes for the next
    read. ``rows`` reads only the rows asked for (embedding lookups).
    """

    def __init__(self, source):
        self.source = source
        self._fds: dict[Path, int] = {}
        self._seek_lock = threading.Lock()  # platforms without positioned reads (Windows)
        self._close = weakref.finalize(self, _close_all, self._fds)

    def names(self) -> list[str]:
        """All tensor names."""
        return self.source.names()

    def __contains__(self, name: str) -> bool:
        return name in self.source

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of ``name``."""
        return self.source.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        """Stored dtype of ``name`` (nothing read)."""
        return self.source.file_of(name).dtype(name)

    def get(self, name: str) -> torch.Tensor:
        """``name`` read into a new tensor of its stored dtype."""
        f = self.source.file_of(name)
        offset, nbytes = f.byte_range(name)
        dtype, shape = f.dtype(name), f.shape(name)
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        buf = torch.empty(nbytes, dtype=torch.uint8)
        self._read(f.path, buf, offset)
        return buf.view(dtype).view(shape)

    def rows(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` [T] of the matrix ``name`` [V, D] -> [T, D], reading only those rows."""
        f = self.source.file_of(name)
        offset, _ = f.byte_range(name)
        dtype, (_, D) = f.dtype(name), f.shape(name)
        uniq, inverse = torch.unique(ids, return_inverse=True)
        row = D * dtype.itemsize
        buf = torch.empty(uniq.numel(), row, dtype=torch.uint8)
        for i, r in enumerate(uniq.tolist()):
            self._read(f.path, buf[i], offset + r * row)
        return buf.view(dtype)[inverse]  # [T, D]

    def _read(self, path: Path, buf: torch.Tensor, offset: int) -> None:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = open_binary(path)
        view = memoryview(buf.numpy()).cast("B")
        got = read_fully(fd, view, offset, self._seek_lock)
        if got < len(view):
            raise OSError(f"{path}: short read at offset {offset + got}")


def _close_all(fds: dict) -> None:
    for fd in fds.values():
        os.close(fd)
    fds.clear()


def read_source(source):
    """``source`` read through ReadSource where it is a safetensors source; another source
    (a GGUF file's quantized tensors) as it is."""
    if hasattr(source, "file_of") and not hasattr(source, "quantized"):
        return ReadSource(source)
    return source


class _LazyExperts:
    """The FFN kernel of a calibration pass: every selected expert (one part each) is read
    from the source when it is used and dropped after (a model.FFNKernel over a pool that is
    the layer number)."""

    reads_whole_experts = False  # it reads the selected experts only

    def __init__(self, spec: ModelSpec, reader: TensorReader):
        self.spec, self.reader = spec, reader

    def __call__(self, x: torch.Tensor, layer: int, slots: torch.Tensor, wt: torch.Tensor | None) -> torch.Tensor:
        out = torch.zeros_like(x)  # [T, D]
        for p, e in enumerate(slots.tolist()):
            wg, wu, wd_t = expert_matrices(self.spec, self.reader, layer, e)  # [W, D] each
            if wt is None:
                rows, w = slice(None), None
            else:
                rows = (wt[p] != 0).nonzero().squeeze(1)  # tokens routed to e
                w = wt[p, rows][:, None]  # [R, 1]
            xe = x[rows]  # [R, D]
            # F.linear on the row-major matrices: in float32 the same products as xe @ wg.t();
            # in bfloat16, xe @ w.t() on a matrix not in cache took ~17x as long (8 ms against
            # 0.47 ms for one 768 x 2048 expert matrix, one token, torch 2.13 here).
            act = F.silu(F.linear(xe, wg)) * F.linear(xe, wu)  # [R, W]
            y = F.linear(act, wd_t.t())  # [R, D]
            out[rows] += y if w is None else y * w
        return out


class _RowReader(TensorReader):
    """A TensorReader whose float linears are RowLinear (quantized ones as TensorReader makes them)."""

    def linear(self, names: list[str], shapes: list[tuple[int, int]]):
        qs = [self.quantized(n, shape) for n, shape in zip(names, shapes)]
        if all(q is not None for q in qs):
            return super().linear(names, shapes)
        ws = [self.get(n, shape) for n, shape in zip(names, shapes)]
        return RowLinear(ws[0] if len(ws) == 1 else torch.cat(ws))


class _LayerStore:
    """Every expert "resident" (read on use by _LazyExperts); a slot is an expert id."""

    streams = False

    def __init__(self, spec: ModelSpec):
        self.spec = spec

    def slots(self, layer: int, units: torch.Tensor) -> torch.Tensor:
        return units

    def pool(self, layer: int) -> int:
        return layer

    def done(self, layer: int) -> None:
        pass

    def capacity(self, layer: int) -> int:
        return self.spec.ffn[layer].num_experts

    def release_all(self) -> None:
        pass

    def report(self) -> dict:
        return {}

    def reset_stats(self) -> None:
        pass

    def close(self) -> None:
        pass


def embedding_rows(source, ids: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Rows ``ids`` of the embedding table as float32 [T, D], without expanding the table
    (quantized rows are dequantized one by one; a ReadSource reads just those rows; another
    float table is a memory-mapped view)."""
    return _rows(source, "model.embed_tokens.weight", ids).float()


def _rows(source, name: str, ids: torch.Tensor) -> torch.Tensor:
    q = source.quantized(name) if hasattr(source, "quantized") else None
    if q is not None:
        return q.rows_dequantized(ids)
    if hasattr(source, "rows"):
        return source.rows(name, ids)
    return source.get(name)[ids]


class SourceEmbedding:
    """The embedding of a streamed model: each lookup reads its rows from the source."""

    def __init__(self, source, dtype: torch.dtype):
        self.source, self.dtype = source, dtype

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        return _rows(self.source, "model.embed_tokens.weight", ids).to(self.dtype)  # [T, D]

    def nbytes(self) -> int:
        return 0


def stream_dtype(spec: ModelSpec, source) -> torch.dtype:
    """The compute dtype of a streamed model: bfloat16 over 16-bit float weights (they are
    held and read as they are stored, without float32 copies; the CPU runs bfloat16
    matmuls natively where it has AVX512-BF16, and they were faster than float32 here), else
    float32 (float32 or quantized weights)."""
    if hasattr(source, "quantized") or not hasattr(source, "dtype"):
        return torch.float32
    name = next(iter(_first_expert(spec)))
    return torch.bfloat16 if source.dtype(name) in (torch.bfloat16, torch.float16) else torch.float32


def _first_expert(spec: ModelSpec) -> list[str]:
    f, names = spec.ffn[0], FAMILIES[spec.family].names
    return [n.format(l=0, e=0) for n in (names.expert if f.routed else names.dense)]


def streamed_model(spec: ModelSpec, source, where: Path, *, dtype: torch.dtype | None = None) -> Transformer:
    """The source model with bounded memory: its always-resident weights held (attention,
    norms, routers, shared experts, lm_head; in ``dtype``, quantized ones as they are), the
    embedding's rows and every selected routed expert read from ``source`` when used.

    Holds the always-resident weights (no embedding table unless lm_head is tied to it), one
    token step's selected experts and the KV cache; decode reads top_k experts per layer per
    token from the files (the page cache, when they fit there).
    """
    cpu = torch.device("cpu")
    dtype = dtype or stream_dtype(spec, source)
    backend = backend_for(cpu) if hasattr(source, "quantized") else None
    # float32 keeps the engine's own linears (W^T stored: faster there); 16-bit ones RowLinear.
    cls = TensorReader if dtype == torch.float32 else _RowReader
    reader = cls(source, where, dtype=dtype, device=cpu, backend=backend)
    check_shapes(spec, reader)
    shapes = expected_shapes(spec)
    head = "model.embed_tokens.weight" if spec.tie_word_embeddings else "lm_head.weight"
    if reader.quantized(head, shapes[head]) is not None:
        lm_head = reader.linear([head], [shapes[head]])
    elif dtype == torch.float32:
        lm_head = FloatLinear(reader.get(head, shapes[head]).t())  # [D, V] view of the rows read
    else:
        lm_head = RowLinear(reader.get(head, shapes[head]))  # the rows read, no copy
    L = spec.num_layers
    weights = Weights(embed=SourceEmbedding(source, dtype),
                      norm=reader.get("model.norm.weight", shapes["model.norm.weight"]), lm_head=lm_head,
                      layers=[build_layer(spec, reader, layer, shapes) for layer in range(L)])
    return Transformer(spec, weights, _LayerStore(spec), parts=[1] * L, kernels=[_LazyExperts(spec, reader)] * L,
                       dtype=dtype, device=cpu)


def held_bytes(raw) -> int:
    """Bytes of a plain checkpoint's weights as a fully resident CPU engine holds them: float
    tensors as float32, quantized ones as stored (a GGUF file's size)."""
    src = raw.tensors
    if not hasattr(src, "file_of"):
        return sum(Path(f).stat().st_size for f in raw.files if Path(f).suffix == ".gguf")
    total = 0
    for name in src.names():
        f = src.file_of(name)
        n = f.byte_range(name)[1]
        total += n * 4 // f.dtype(name).itemsize if f.dtype(name).is_floating_point else n
    return total


def source_engine(path: Path) -> Engine:
    """An Engine over the plain checkpoint at ``path`` for the refactoring's own use (writing
    calibration text): fully resident (float32, quantized weights kept so: what load() builds)
    when that holds at most RESIDENT_GENERATION_BYTES, else streamed_model."""
    raw = open_checkpoint(path)
    spec = build_spec(raw.config, where=str(path / "config.json" if path.is_dir() else path))
    cpu = torch.device("cpu")
    if held_bytes(raw) <= RESIDENT_GENERATION_BYTES:
        reader = TensorReader(raw.tensors, path, dtype=torch.float32, device=cpu, backend=backend_for(cpu))
        model = build_plain(spec, reader, dtype=torch.float32, device=cpu)
    else:
        model = streamed_model(spec, read_source(raw.tensors), path)
    return Engine(model, raw.tokenizer, source=path, max_context=spec.max_position)


def calibrate_layers(spec: ModelSpec, source, reader: TensorReader, chunks: Sequence[torch.Tensor],
                     observer: Callable, *, progress: Callable[[int], None] | None = None) -> Iterator[int]:
    """Run the calibration ``chunks`` through the model layer by layer, calling ``observer``
    (layer, resid, x, topv, topi) once per layer with every token; yields each layer number
    after its pass, so that the caller partitions it before the next one is read."""
    L = spec.num_layers
    model = Transformer(spec, Weights(embed=None, norm=None, lm_head=None, layers=[None] * L),
                        _LayerStore(spec), parts=[1] * L, kernels=[_LazyExperts(spec, reader)] * L,
                        dtype=torch.float32, device=torch.device("cpu"), ffn_observer=observer)
    shapes = expected_shapes(spec)
    lengths = [int(c.numel()) for c in chunks]
    longest = max(lengths)
    model.cache.reserve(longest)
    model._ensure_rope(longest)
    with torch.inference_mode():
        h = embedding_rows(source, torch.cat(list(chunks)), shapes["model.embed_tokens.weight"])  # [T, D]
        eps = spec.rms_norm_eps
        for layer in range(L):
            lw = build_layer(spec, reader, layer, shapes)
            model.w.layers[layer] = lw
            attention = model._attention if spec.mla is None else model._mla_attention
            start = 0
            for n in lengths:  # each chunk is its own sequence: causal attention within it
                cos = model.cos[:n, None, :]
                sin = model.sin_signed[:n, None, :]
                h[start:start + n] += attention(layer, lw, _rms(h[start:start + n], lw.attn_norm, eps), cos, sin, 0)
                start += n
            h = h + model._ffn(layer, lw, _rms(h, lw.ffn_norm, eps), h)
            model.w.layers[layer] = None
            if progress is not None:
                progress(layer)
            yield layer
