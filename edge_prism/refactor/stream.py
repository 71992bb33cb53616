"""Calibration one decoder layer at a time, from the memory-mapped source: refactoring a
model larger than memory.

calibration ids -> [embedding rows] -> hidden states of every calibration token [T, D]
-> per layer: [that layer's attention weights, read now] attention over each chunk (causal
within it) -> router over all tokens -> observer (routed inputs) -> each routed expert read
from the source, applied to its tokens, dropped -> the caller partitions this layer -> next

Peak memory: the hidden states of the calibration tokens, one layer's attention weights,
one expert at a time, and the observer's samples of the layer being partitioned; never
the whole model. The forward is the engine's own (Transformer._attention, route, _ffn),
so every family computes exactly as it does when it runs.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from edge_prism.build import TensorReader, build_layer, expected_shapes, expert_matrices
from edge_prism.model import Transformer, Weights, _rms
from edge_prism.spec import ModelSpec


class _LazyExperts:
    """The FFN kernel of a calibration pass: every selected expert (one part each) is read
    from the source when it is used and dropped after (a model.FFNKernel over a pool that is
    the layer number)."""

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
            act = F.silu(xe @ wg.t()) * (xe @ wu.t())  # [R, W]
            y = act @ wd_t  # [R, D]
            out[rows] += y if w is None else y * w
        return out


class _LayerStore:
    """Every expert "resident" (read on use by _LazyExperts); a slot is an expert id."""

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


def embedding_rows(source, ids: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Rows ``ids`` of the embedding table as float32 [T, D], without expanding the table
    (quantized rows are dequantized one by one; a float table is a memory-mapped view)."""
    name = "model.embed_tokens.weight"
    q = source.quantized(name) if hasattr(source, "quantized") else None
    if q is not None:
        return q.rows_dequantized(ids).float()
    return source.get(name)[ids].float()


def calibrate_layers(spec: ModelSpec, source, reader: TensorReader, chunks: Sequence[torch.Tensor],
                     observer: Callable, *, progress: Callable[[int], None] | None = None) -> Iterator[int]:
    """Run the calibration ``chunks`` through the model layer by layer, calling ``observer``
    (layer, resid, x, topv, topi) once per layer with every token; yields each layer number
    after its pass, so that the caller partitions it before the next one is read."""
    L = spec.num_layers
    model = Transformer(spec, Weights(embed=None, norm=None, lm_head=None, layers=[None] * L),
                        _LayerStore(spec), parts=[1] * L, kernels=[_LazyExperts(spec, reader)] * L,
                        dtype=torch.float32, device=torch.device("cpu"))
    model.ffn_observer = observer
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
