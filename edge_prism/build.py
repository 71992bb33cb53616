"""Checkpoint tensors -> always-resident Weights and packed sub-expert blocks.

Every tensor's shape is checked against the ModelSpec first, so a config that disagrees
with its weights fails with the tensor's name, both shapes and the file.
"""

from __future__ import annotations

from pathlib import Path

import torch

from edge_prism.errors import CorruptCheckpointError, ShapeMismatchError
from edge_prism.families import FAMILIES
from edge_prism.loaders.base import TensorSource
from edge_prism.model import LayerWeights, Weights, tied_head, transposed
from edge_prism.spec import ModelSpec

_ATTN = "model.layers.{l}.self_attn.{p}_proj.{kind}"


class TensorReader:
    """Reads named tensors, checking presence and shape, converting dtype and device."""

    def __init__(self, source: TensorSource, where: Path, *, dtype: torch.dtype, device: torch.device):
        self.source, self.where, self.dtype, self.device = source, where, dtype, device
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


def expected_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every tensor name the family needs, with its shape."""
    s, names = spec, FAMILIES[spec.family].names
    D, hd = s.hidden_size, s.head_dim
    out = {"model.embed_tokens.weight": (s.vocab_size, D), "model.norm.weight": (D,)}
    if not s.tie_word_embeddings:
        out["lm_head.weight"] = (s.vocab_size, D)
    for layer, f in enumerate(s.ffn):
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
            out[names.shared_gate.format(l=layer)] = (1, D)
        out.update(expert_names_shapes(spec, layer))
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
    """The always-resident weights, on the reader's device and dtype."""
    s, names = spec, FAMILIES[spec.family].names
    D, hd = s.hidden_size, s.head_dim
    shapes = expected_shapes(spec)

    def get(name: str) -> torch.Tensor:
        return reader.get(name, shapes[name])

    embed = get("model.embed_tokens.weight")
    if s.tie_word_embeddings:
        embed, lm_head_t = tied_head(embed)
    else:
        lm_head_t = transposed(get("lm_head.weight"))
    layers = []
    for layer, f in enumerate(s.ffn):
        qkv = [get(_ATTN.format(l=layer, p=p, kind="weight")) for p in "qkv"]
        bias = None
        if s.attention_bias:
            bias = torch.cat([get(_ATTN.format(l=layer, p=p, kind="bias")) for p in "qkv"])
        lw = LayerWeights(
            attn_norm=get(f"model.layers.{layer}.input_layernorm.weight"),
            ffn_norm=get(f"model.layers.{layer}.post_attention_layernorm.weight"),
            wqkv_t=transposed(torch.cat(qkv)), bqkv=bias,
            wo_t=transposed(get(_ATTN.format(l=layer, p="o", kind="weight"))),
            q_norm=get(f"model.layers.{layer}.self_attn.q_norm.weight") if s.qk_norm != "none" else None,
            k_norm=get(f"model.layers.{layer}.self_attn.k_norm.weight") if s.qk_norm != "none" else None,
            router=get(names.router.format(l=layer)) if f.routed else None,
        )
        if f.shared_width:
            g, u, d = (n.format(l=layer) for n in names.shared)
            lw.shared_gu = torch.cat([get(g), get(u)])
            lw.shared_down = get(d)
            lw.shared_gate = get(names.shared_gate.format(l=layer))
        layers.append(lw)
    del D, hd
    return Weights(embed=embed, norm=get("model.norm.weight"), lm_head_t=lm_head_t, layers=layers)


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


def pack_layer(spec: ModelSpec, reader: TensorReader, layer: int, *, parts: int = 1) -> torch.Tensor:
    """A layer's sub-expert blocks [E*S, 3, n, D], unit e*S+s = part s of expert e."""
    f = spec.ffn[layer]
    n = f.width // parts
    out = torch.empty(f.num_experts * parts, 3, n, spec.hidden_size, dtype=reader.dtype)
    for e in range(f.num_experts):
        out[e * parts:(e + 1) * parts] = pack_expert(*expert_matrices(spec, reader, layer, e), parts)
    return out


class ResidentStore:
    """Every sub-expert resident in one buffer per layer; slot = unit id."""

    def __init__(self, pools: list[torch.Tensor]):
        self.pools = pools

    def slots(self, layer: int, units: torch.Tensor) -> torch.Tensor:
        """Slots of ``units`` (identity)."""
        return units

    def pool(self, layer: int) -> torch.Tensor:
        """The layer's block buffer."""
        return self.pools[layer]

    def done(self, layer: int) -> None:
        """Nothing to release: every block stays resident."""

    def capacity(self, layer: int) -> int:
        """Every unit of the layer fits."""
        return self.pools[layer].shape[0]

    def ready(self, layer: int, unit: int) -> bool:
        """Always: nothing is ever loaded."""
        return True

    def block_nbytes(self, layer: int) -> int:
        """Bytes of one sub-expert block of ``layer``."""
        b = self.pools[layer][0]
        return b.numel() * b.element_size()

    def nbytes(self) -> int:
        """Bytes of all blocks."""
        return sum(p.numel() * p.element_size() for p in self.pools)


class WholeBudgetStore(ResidentStore):
    """A memory budget that holds every sub-expert: resident, reported like a budget."""

    def __init__(self, pools: list[torch.Tensor], *, budget_bytes: int):
        super().__init__(pools)
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
                "prefetched_unused_bytes": 0, "prefetch_late": 0}

    def reset_stats(self) -> None:
        """Zero the counters."""
        self.hits = 0
