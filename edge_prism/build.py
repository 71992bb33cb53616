"""Checkpoint tensors -> always-resident Weights and packed sub-expert blocks.

Every tensor's shape is checked against the ModelSpec first, so a config that disagrees
with its weights fails with the tensor's name, both shapes and the file.
"""

from __future__ import annotations

from pathlib import Path

import torch

from edge_prism.errors import CorruptCheckpointError, ShapeMismatchError
from edge_prism.families import FAMILIES
from edge_prism.kernels import (ExpertMatrices, FFNKernel, FloatEmbedding, FloatLinear, FloatUnits, Linear,
                                QuantEmbedding, QuantExperts, QuantHead, QuantLinear, dense_expert_matrices)
from edge_prism.loaders.base import TensorSource
from edge_prism.model import LayerWeights, MLAWeights, Weights, tied_head, transposed
from edge_prism.quant import Int4Backend, QMatrix, UnitFormat
from edge_prism.spec import ModelSpec

_ATTN = "model.layers.{l}.self_attn.{p}_proj.{kind}"


class TensorReader:
    """Reads named tensors, checking presence and shape, converting dtype and device.

    With a ``backend``, tensors the source holds quantized stay quantized (``linear``,
    ``quantized``); without one every tensor is read as ``dtype`` floats.
    """

    def __init__(self, source: TensorSource, where: Path, *, dtype: torch.dtype, device: torch.device,
                 backend: Int4Backend | None = None):
        self.source, self.where, self.dtype, self.device = source, where, dtype, device
        self.backend = backend
        self._names = set(source.names())

    def has(self, name: str) -> bool:
        """Whether the checkpoint holds ``name``."""
        return name in self._names

    def shape(self, name: str, expected: tuple[int, ...]) -> None:
        """Fail clearly unless ``name`` exists with ``expected`` shape."""
        if name not in self._names:
            raise CorruptCheckpointError(f"{self.where}: tensor '{name}' is missing; the checkpoint "
                                         "is incomplete or its config.json belongs to another model")
        got = tuple(self.source.shape(name))
        if got != tuple(expected):
            raise ShapeMismatchError(f"{self.where}: tensor '{name}' has shape {list(got)} but the "
                                     f"config implies {list(expected)}; config.json and the weights "
                                     "disagree, use the config that came with these weights")

    def get(self, name: str, expected: tuple[int, ...], *, device: torch.device | None = None) -> torch.Tensor:
        """The tensor ``name`` as ``dtype`` on the target device (checked first)."""
        self.shape(name, expected)
        return self.source.get(name).to(device=device or self.device, dtype=self.dtype)

    def quantized(self, name: str, expected: tuple[int, ...]) -> QMatrix | None:
        """``name`` in quantized storage form when the source holds it so and a backend is
        set, else None (checked first)."""
        self.shape(name, expected)
        if self.backend is None or not hasattr(self.source, "quantized"):
            return None
        return self.source.quantized(name)

    def linear(self, names: list[str], shapes: list[tuple[int, int]]) -> Linear:
        """The rows of ``names`` stacked into one linear: quantized when every part is
        (whole rows join exactly), else float, stored transposed."""
        qs = [self.quantized(n, shape) for n, shape in zip(names, shapes)]
        if all(q is not None for q in qs):
            qm = qs[0] if len(qs) == 1 else QMatrix.cat_rows(qs)
            return QuantLinear(self.backend.pack(qm), self.backend)
        return FloatLinear(transposed(torch.cat([self.get(n, shape) for n, shape in zip(names, shapes)])))


def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor name the family needs, with its shape."""
    s, names = spec, FAMILIES[spec.family].names
    D, hd = s.hidden_size, s.head_dim
    out = {"model.embed_tokens.weight": (s.vocab_size, D), "model.norm.weight": (D,)}
    if not s.tie_word_embeddings:
        out["lm_head.weight"] = (s.vocab_size, D)
    for layer, f in enumerate(s.ffn):
        if s.mla is not None:
            out.update(_mla_shapes(s, layer))
        else:
            dims = {"q": s.num_heads * hd, "k": s.num_kv_heads * hd, "v": s.num_kv_heads * hd}
            for p, rows in dims.items():
                out[_ATTN.format(l=layer, p=p, kind="weight")] = (rows, D)
                if s.attention_bias:
                    out[_ATTN.format(l=layer, p=p, kind="bias")] = (rows,)
            out[_ATTN.format(l=layer, p="o", kind="weight")] = (D, s.num_heads * hd)
        out[f"model.layers.{layer}.input_layernorm.weight"] = (D,)
        out[f"model.layers.{layer}.post_attention_layernorm.weight"] = (D,)
        if s.qk_norm != "none":
            width = {"head": (hd, hd), "full": (s.num_heads * hd, s.num_kv_heads * hd)}[s.qk_norm]
            out[f"model.layers.{layer}.self_attn.q_norm.weight"] = (width[0],)
            out[f"model.layers.{layer}.self_attn.k_norm.weight"] = (width[1],)
        if f.routed:
            out[names.router.format(l=layer)] = (f.num_experts, D)
        if f.shared_width:
            g, u, d = names.shared
            out[g.format(l=layer)] = out[u.format(l=layer)] = (f.shared_width, D)
            out[d.format(l=layer)] = (D, f.shared_width)
            if names.shared_gate:
                out[names.shared_gate.format(l=layer)] = (1, D)
        out.update(expert_names_shapes(spec, layer))
    return out


def _mla_shapes(s: ModelSpec, layer: int) -> dict[str, tuple[int, ...]]:
    """Multi-head latent attention's tensors (DeepSeek-V2's names; q_a_* only with q_lora_rank)."""
    m, D, H = s.mla, s.hidden_size, s.num_heads
    a = f"model.layers.{layer}.self_attn."
    out: dict[str, tuple[int, ...]] = {}
    if m.q_lora_rank:
        out[a + "q_a_proj.weight"] = (m.q_lora_rank, D)
        if s.attention_bias:
            out[a + "q_a_proj.bias"] = (m.q_lora_rank,)
        out[a + "q_a_layernorm.weight"] = (m.q_lora_rank,)
        out[a + "q_b_proj.weight"] = (H * m.qk_head_dim, m.q_lora_rank)
    else:
        out[a + "q_proj.weight"] = (H * m.qk_head_dim, D)  # no bias, whatever attention_bias says
    out[a + "kv_a_proj_with_mqa.weight"] = (m.cache_width, D)
    if s.attention_bias:
        out[a + "kv_a_proj_with_mqa.bias"] = (m.cache_width,)
    out[a + "kv_a_layernorm.weight"] = (m.kv_lora_rank,)
    out[a + "kv_b_proj.weight"] = (H * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank)
    out[a + "o_proj.weight"] = (D, H * m.v_head_dim)
    if s.attention_bias:
        out[a + "o_proj.bias"] = (D,)
    return out


def expert_names_shapes(spec: ModelSpec, layer: int) -> dict[str, tuple[int, ...]]:
    """Names and shapes of one layer's expert (or dense FFN) weights."""
    f, names = spec.ffn[layer], FAMILIES[spec.family].names
    g, u, d = names.expert if f.routed else names.dense
    out = {}
    for e in range(f.num_experts):
        out[g.format(l=layer, e=e)] = out[u.format(l=layer, e=e)] = (f.width, spec.hidden_size)
        out[d.format(l=layer, e=e)] = (spec.hidden_size, f.width)
    return out


def check_shapes(spec: ModelSpec, reader: TensorReader, *, experts: bool = True) -> None:
    """Check every tensor before reading any, so errors come before slow work.

    ``experts=False`` checks only the always-resident tensors (a prism checkpoint keeps
    experts as packed blocks elsewhere).
    """
    skip = set() if experts else {n for layer in range(spec.num_layers)
                                  for n in expert_names_shapes(spec, layer)}
    for name, shape in expected_shapes(spec).items():
        if name not in skip:
            reader.shape(name, shape)
    extra = [n for n in reader.source.names() if _layer_of(n) is not None and _layer_of(n) >= spec.num_layers]
    if extra:
        raise ShapeMismatchError(f"{reader.where}: tensor '{extra[0]}' belongs to a layer beyond the "
                                 f"config's num_hidden_layers={spec.num_layers}; config.json and the "
                                 "weights disagree, use the config that came with these weights")


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
        return int(parts[2])
    return None


def build_weights(spec: ModelSpec, reader: TensorReader) -> Weights:
    """The always-resident weights, on the reader's device and dtype (quantized ones stay so)."""
    shapes = expected_shapes(spec)
    embed, lm_head = _embedding_and_head(spec, reader, shapes)
    layers = [build_layer(spec, reader, layer, shapes) for layer in range(spec.num_layers)]
    return Weights(embed=embed, norm=reader.get("model.norm.weight", shapes["model.norm.weight"]),
                   lm_head=lm_head, layers=layers)


def build_layer(spec: ModelSpec, reader: TensorReader, layer: int, shapes: dict | None = None) -> LayerWeights:
    """One decoder layer's always-resident weights (a refactoring of a model larger than
    memory builds them one layer at a time)."""
    s, names, f = spec, FAMILIES[spec.family].names, spec.ffn[layer]
    shapes = shapes or expected_shapes(spec)

    def get(name: str) -> torch.Tensor:
        return reader.get(name, shapes[name])

    def linear(*parts: str) -> Linear:
        return reader.linear(list(parts), [shapes[p] for p in parts])

    if s.mla is not None:
        lw = _mla_layer(s, layer, reader, get, linear)
    else:
        bias = None
        if s.attention_bias:
            bias = torch.cat([get(_ATTN.format(l=layer, p=p, kind="bias")) for p in "qkv"])
        lw = LayerWeights(
            attn_norm=get(f"model.layers.{layer}.input_layernorm.weight"),
            ffn_norm=get(f"model.layers.{layer}.post_attention_layernorm.weight"),
            wqkv=linear(*(_ATTN.format(l=layer, p=p, kind="weight") for p in "qkv")), bqkv=bias,
            wo=linear(_ATTN.format(l=layer, p="o", kind="weight")),
            q_norm=get(f"model.layers.{layer}.self_attn.q_norm.weight") if s.qk_norm != "none" else None,
            k_norm=get(f"model.layers.{layer}.self_attn.k_norm.weight") if s.qk_norm != "none" else None,
            router=get(names.router.format(l=layer)) if f.routed else None,
        )
    if f.shared_width:
        g, u, d = (n.format(l=layer) for n in names.shared)
        lw.shared_gu = linear(g, u)
        lw.shared_down = linear(d)
        lw.shared_gate = get(names.shared_gate.format(l=layer)) if names.shared_gate else None
    return lw


def _mla_layer(s: ModelSpec, layer: int, reader: TensorReader, get, linear) -> LayerWeights:
    """One MLA layer: the two projections of the hidden state (the query's, or its low-rank
    q_a_proj, and kv_a_proj_with_mqa) joined into one linear, the rest in MLAWeights."""
    m, f, names = s.mla, s.ffn[layer], FAMILIES[s.family].names
    a = f"model.layers.{layer}.self_attn."
    kv_b_name = a + "kv_b_proj.weight"
    kv_b_shape = (s.num_heads * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank)
    if reader.quantized(kv_b_name, kv_b_shape) is None:
        # Float W kept [out, in] row-major (the holder takes its transposed view): absorbed
        # decode multiplies by per-head row blocks of W, which must be BLAS-ready views.
        kv_b = FloatLinear(get(kv_b_name).t())
    else:
        kv_b = linear(kv_b_name)
    q = a + ("q_a_proj" if m.q_lora_rank else "q_proj")
    bias = bo = None
    if s.attention_bias:
        q_bias = get(q + ".bias") if m.q_lora_rank else None
        kv_bias = get(a + "kv_a_proj_with_mqa.bias")
        if q_bias is None:  # q_proj has no bias: zeros over its rows
            q_bias = kv_bias.new_zeros(s.num_heads * m.qk_head_dim)
        bias, bo = torch.cat([q_bias, kv_bias]), get(a + "o_proj.bias")
    return LayerWeights(
        attn_norm=get(f"model.layers.{layer}.input_layernorm.weight"),
        ffn_norm=get(f"model.layers.{layer}.post_attention_layernorm.weight"),
        wqkv=linear(q + ".weight", a + "kv_a_proj_with_mqa.weight"), bqkv=bias,
        wo=linear(a + "o_proj.weight"), q_norm=None, k_norm=None,
        router=get(names.router.format(l=layer)) if f.routed else None,
        mla=MLAWeights(
            q_a_norm=get(a + "q_a_layernorm.weight") if m.q_lora_rank else None,
            wq_b=linear(a + "q_b_proj.weight") if m.q_lora_rank else None,
            kv_a_norm=get(a + "kv_a_layernorm.weight"),
            kv_b=kv_b, bo=bo),
    )


def _embedding_and_head(s: ModelSpec, reader: TensorReader, shapes: dict) -> tuple:
    name = "model.embed_tokens.weight"
    q = reader.quantized(name, shapes[name])
    head = q if s.tie_word_embeddings else reader.quantized("lm_head.weight", shapes.get("lm_head.weight"))
    embed = QuantEmbedding(q, dtype=reader.dtype, device=reader.device) if q is not None else None
    if head is not None:
        rows = embed.qm if s.tie_word_embeddings else head.to(reader.device)
        lm_head = QuantHead(reader.backend.pack(head), reader.backend, rows)
    if q is not None:
        if s.tie_word_embeddings:
            return embed, lm_head
        return embed, lm_head if head is not None else reader.linear(["lm_head.weight"], [shapes["lm_head.weight"]])
    if s.tie_word_embeddings:
        return tied_head(reader.get(name, shapes[name]))
    if head is not None:
        return FloatEmbedding(reader.get(name, shapes[name])), lm_head
    return (FloatEmbedding(reader.get(name, shapes[name])),
            reader.linear(["lm_head.weight"], [shapes["lm_head.weight"]]))


def expert_matrices(spec: ModelSpec, reader: TensorReader, layer: int,
                    expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One expert's W_gate [W, D], W_up [W, D] and W_down transposed [W, D] (CPU, reader dtype)."""
    f, names = spec.ffn[layer], FAMILIES[spec.family].names
    g, u, d = (n.format(l=layer, e=expert) for n in (names.expert if f.routed else names.dense))
    W, D = f.width, spec.hidden_size
    cpu = torch.device("cpu")
    return (reader.get(g, (W, D), device=cpu), reader.get(u, (W, D), device=cpu),
            reader.get(d, (D, W), device=cpu).t())


def pack_expert(wg: torch.Tensor, wu: torch.Tensor, wd_t: torch.Tensor, parts: int,
                perm: torch.Tensor | None = None) -> torch.Tensor:
    """One expert's sub-expert blocks [S, 3, n, D] from W_gate, W_up [W, D] and W_down^T [W, D].

    Block s holds neurons perm[s*n:(s+1)*n] (default: the checkpoint's order): its W_gate
    rows, its W_up rows, and its W_down columns as a row-major [D, n] matrix stored in the
    block's last [n, D] slot. Decode computes W_down[:, part] @ act with the output
    dimension walked row by row, the faster layout on CPU (see model.transposed).
    """
    W, D = wg.shape
    n = W // parts
    mats = torch.stack((wg, wu, wd_t))  # [3, W, D]
    if perm is not None:
        mats = mats[:, perm]
    out = torch.empty(parts, 3, n, D, dtype=mats.dtype)
    out[:, :2] = mats[:2].view(2, parts, n, D).transpose(0, 1)  # [S, 2, n, D]
    down = mats[2].view(parts, n, D).transpose(1, 2).contiguous()  # [S, D, n]
    out[:, 2] = down.view(parts, n, D)  # reinterpreted: the slot holds [D, n] row-major
    return out


def expert_qmatrices(spec: ModelSpec, reader: TensorReader, layer: int,
                     expert: int) -> tuple[QMatrix, QMatrix, QMatrix] | None:
    """One expert's W_gate [W, D], W_up [W, D], W_down [D, W] as the source stores them
    quantized, or None when any of them is not quantized (or the reader has no backend)."""
    f, names = spec.ffn[layer], FAMILIES[spec.family].names
    g, u, d = (n.format(l=layer, e=expert) for n in (names.expert if f.routed else names.dense))
    W, D = f.width, spec.hidden_size
    qs = (reader.quantized(g, (W, D)), reader.quantized(u, (W, D)), reader.quantized(d, (D, W)))
    return None if any(q is None for q in qs) else qs


def pack_layer(spec: ModelSpec, reader: TensorReader, layer: int, *, parts: int = 1) -> torch.Tensor:
    """A layer's float sub-expert blocks [E*S, 3, n, D], unit e*S+s = part s of expert e."""
    f = spec.ffn[layer]
    n = f.width // parts
    out = torch.empty(f.num_experts * parts, 3, n, spec.hidden_size, dtype=reader.dtype)
    for e in range(f.num_experts):
        out[e * parts:(e + 1) * parts] = pack_expert(*expert_matrices(spec, reader, layer, e), parts)
    return out


def plain_layer(spec: ModelSpec, reader: TensorReader, layer: int, *,
                float_parts: int) -> tuple[object, FFNKernel, int]:
    """(pool, kernel, parts) of a plain checkpoint's layer, resident on the reader's device.

    Quantized experts stay quantized, each one expert of one part (the int4 kernel runs a
    whole expert per call); float experts are cut into ``float_parts`` exact blocks.
    """
    f = spec.ffn[layer]
    q = expert_qmatrices(spec, reader, layer, 0)
    if q is not None and f.width % q[2].group == 0:
        experts: list[ExpertMatrices] = []
        for e in range(f.num_experts):
            gate, up, down = q if e == 0 else expert_qmatrices(spec, reader, layer, e)
            experts.append(dense_expert_matrices(gate, up, down, reader.backend))
        fmt = UnitFormat(n=f.width, hidden=spec.hidden_size, gu_planes=max(q[0].planes, q[1].planes),
                         dn_planes=q[2].planes, group=q[2].group)
        return experts, QuantExperts(fmt, 1, reader.backend), 1
    pool = pack_layer(spec, reader, layer, parts=float_parts).to(reader.device)
    return pool, FloatUnits(), float_parts


class ResidentStore:
    """Every sub-expert resident; slot = unit id. A layer's pool is a float block buffer
    [U, 3, n, D] or the list of its experts' quantized matrices."""

    streams = False  # nothing to prefetch

    def __init__(self, pools: list, units: list[int]):
        self.pools, self.units = pools, units

    def slots(self, layer: int, units: torch.Tensor) -> torch.Tensor:
        """Slots of ``units`` (identity)."""
        return units

    def pool(self, layer: int):
        """The layer's blocks or expert matrices."""
        return self.pools[layer]

    def done(self, layer: int) -> None:
        """Nothing to release: every block stays resident."""

    def capacity(self, layer: int) -> int:
        """Every unit of the layer fits."""
        return self.units[layer]

    def ready(self, layer: int, unit: int) -> bool:
        """Always: nothing is ever loaded."""
        return True

    def release_all(self) -> None:
        """Nothing is ever held."""

    def report(self) -> dict:
        """No counters: nothing moves."""
        return {}

    def reset_stats(self) -> None:
        """No counters to zero."""

    def close(self) -> None:
        """Nothing to give back early: the pools go with the store."""

    def layer_nbytes(self, layer: int) -> int:
        """Bytes of ``layer``'s sub-experts."""
        p = self.pools[layer]
        if isinstance(p, torch.Tensor):
            return p.numel() * p.element_size()
        return sum(m.nbytes() for m in p)

    def block_nbytes(self, layer: int) -> int:
        """Bytes of one sub-expert of ``layer``."""
        return self.layer_nbytes(layer) // max(self.units[layer], 1)

    def nbytes(self) -> int:
        """Bytes of all blocks."""
        return sum(self.layer_nbytes(layer) for layer in range(len(self.pools)))


class WholeBudgetStore(ResidentStore):
    """A memory budget that holds every sub-expert: resident, reported like a budget."""

    def __init__(self, pools: list, units: list[int], *, budget_bytes: int):
        super().__init__(pools, units)
        self.budget_bytes = budget_bytes
        self.hits = 0

    def slots(self, layer: int, units: torch.Tensor) -> torch.Tensor:
        """Slots of ``units`` (identity); every one a hit."""
        self.hits += units.numel()
        return units

    def report(self) -> dict:
        """The budgeted store's figures: all hits, nothing moved."""
        return {"memory_budget_bytes": self.budget_bytes, "resident_bytes": self.nbytes(), "hits": self.hits,
                "misses": 0, "hit_rate": 1.0, "bytes_to_device": 0, "transfer_wait_s": 0.0,
                "prefetch_issued": 0, "prefetch_used": 0, "prefetch_cancelled": 0,
                "prefetched_unused_bytes": 0, "prefetch_late": 0, "bytes_in_place": 0}

    def reset_stats(self) -> None:
        """Zero the counters."""
        self.hits = 0
