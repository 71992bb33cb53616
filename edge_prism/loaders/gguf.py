"""Load a llama.cpp GGUF file: HF-style config, tensors under HF names (kept quantized or
dequantized on demand), tokenizer.

GGUF file --GGUFReader (mmap)--> metadata -> config (from the file's keys, never guessed), tokenizer
                                 tensors  -> HF names: one GGUF expert tensor [E, rows, cols] becomes
                                             E per-expert entries (slices of whole quantization rows)
                                          -> quantized(name): QMatrix | get(name): float32 [HF shape]

Architectures: ``llama`` (dense, or Mixtral when ``llama.expert_count`` is set), ``qwen2moe``,
``qwen3moe``, ``olmoe``, ``deepseek2`` (DeepSeek-V2 / V2-Lite: multi-head latent attention,
the ``deepseek_v2`` family). What llama.cpp does not read from the file but fixes per
architecture (top-k weight normalisation, q/k permutation) follows llama.cpp's own model
builders (src/models/*.cpp), the reference for GGUF files: ARCHITECTURES below. Where the
file states a DeepSeek-V2 setting that llama.cpp computes differently from transformers
(group scoring, yarn without mscale_all_dim), the setting is run as transformers runs it;
where the file leaves a setting out (yarn's mscale, group keys of older files), it takes
the value llama.cpp assumes: see _deepseek2_routing and _deepseek2_rope_scaling.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import quants

from edge_prism.errors import (
    CorruptCheckpointError,
    ModelNotFoundError,
    ShapeMismatchError,
    UnsupportedModelError,
)
from edge_prism.loaders.base import RawCheckpoint
from edge_prism.loaders.gguf_meta import GgufMeta
from edge_prism.loaders.gguf_quant import is_quantized, to_qmatrix
from edge_prism.quant import QMatrix
from edge_prism.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class _Arch:
    """What one GGUF architecture means, as llama.cpp's model builder for it defines it."""

    permute_qk: bool  # the converter permuted q/k rows for llama.cpp's "normal" rope
    norm_topk: bool  # build_moe_ffn's norm_w: top-k router weights renormalised
    qk_norm: str  # "none" | "head" | "full"
    families: tuple[str, str]  # HF model_type of a dense file, of a MoE file
    attention: str = "gqa"  # "gqa" | "mla" (deepseek2's multi-head latent attention)


ARCHITECTURES: dict[str, _Arch] = {
    "llama": _Arch(permute_qk=True, norm_topk=True, qk_norm="none", families=("llama", "mixtral")),
    "qwen2moe": _Arch(permute_qk=False, norm_topk=False, qk_norm="none", families=("qwen2_moe", "qwen2_moe")),
    "qwen3moe": _Arch(permute_qk=False, norm_topk=True, qk_norm="head", families=("qwen3_moe", "qwen3_moe")),
    "olmoe": _Arch(permute_qk=False, norm_topk=False, qk_norm="full", families=("olmoe", "olmoe")),
    # Rope type NORM (adjacent pairs) in llama.cpp, the pairwise rotary of HF's deepseek_v2:
    # the converter permutes nothing. norm_topk is the file's expert_weights_norm (llama.cpp
    # reads it), which must be false: _deepseek2_routing.
    "deepseek2": _Arch(permute_qk=False, norm_topk=False, qk_norm="none", families=("deepseek_v2", "deepseek_v2"),
                       attention="mla"),
}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)

_GGUF_MAGIC = b"GGUF"

# GGUF name -> HF name; {i} is the layer.
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_NAMES.update({
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
})
_LAYER_BIASES = {
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
}
# deepseek2's multi-head latent attention (only for an "mla" architecture).
_MLA_NAMES = {
    "attn_q_a.weight": "self_attn.q_a_proj.weight",
    "attn_q_a_norm.weight": "self_attn.q_a_layernorm.weight",
    "attn_q_b.weight": "self_attn.q_b_proj.weight",
    "attn_kv_a_mqa.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn_kv_a_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attn_kv_b.weight": "self_attn.kv_b_proj.weight",
}
# Files converted since llama.cpp's MLA split hold kv_b_proj as these two (rejoined on read).
_MLA_SPLIT = ("attn_k_b.weight", "attn_v_b.weight")
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)$")
# Read into the config (llama 3 rope scaling), not a model weight.
_ROPE_FREQS = "rope_freqs.weight"


def load_gguf(path: Path) -> RawCheckpoint:
    """Open a GGUF checkpoint (memory-mapped): config, lazy tensors with HF names, tokenizer.

    Raises ModelNotFoundError, CorruptCheckpointError (truncated or damaged file) or
    UnsupportedModelError (architecture, quantization type or feature we cannot map).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"{path}: no such GGUF file")
    reader = _open_reader(path)
    meta = GgufMeta(reader, path)
    arch = meta.require("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{path}: GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)}); "
            "use the model's Hugging Face checkpoint directory instead"
        )
    by_name = {tensor.name: tensor for tensor in reader.tensors}
    config = _config(meta, by_name, path, arch)
    tensors = GgufTensors(path, by_name, config, ARCHITECTURES[arch])
    _check_shapes(path, config, tensors)
    tokenizer = Tokenizer.from_gguf(reader, path) if "tokenizer.ggml.model" in reader.fields else None
    if tokenizer is None:
        logger.warning("%s has no tokenizer metadata; only token ids can be used with it", path)
    return RawCheckpoint(path=path, config=config, tensors=tensors, tokenizer=tokenizer, files=[path])


@dataclass(frozen=True)
class _Entry:
    """Where an HF-named tensor lives: a GGUF tensor, one expert of it, some of its rows."""

    tensor: object  # gguf ReaderTensor
    expert: int | None = None  # index along a GGUF expert tensor's outer dimension
    rows: tuple[int, int] | None = None  # a row range (the halves of a merged gate/up tensor)
    shape: tuple[int, ...] | None = None  # the HF shape when it is not the GGUF shape reversed
    v_b: object | None = None  # kv_b_proj rejoined: ``tensor`` is attn_k_b, this attn_v_b


class GgufTensors:
    """The tensors of a GGUF file under Hugging Face names: dequantized on demand (``get``),
    or kept in their bits (``quantized``).

    ``get`` returns a new float32 tensor that owns its memory: quantized data has to be
    expanded anyway, and the reader's read-only mmap must never back a writable torch tensor.
    ``conversions`` records every tensor whose type had to be converted to a supported
    format (name -> (ggml type, relative error against the file's own values)).
    """

    def __init__(self, path: Path, by_name: dict, config: dict, arch: _Arch) -> None:
        from edge_prism.families import FAMILIES

        self._path = path
        self.conversions: dict[str, tuple[str, float]] = {}
        self._heads = {}
        if arch.permute_qk:
            self._heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
        names = FAMILIES[config["model_type"]].names
        mla = arch.attention == "mla"
        self._tensors: dict[str, _Entry] = {}
        split: dict[int, dict[str, object]] = {}  # layer -> attn_k_b / attn_v_b
        for gguf_name, tensor in by_name.items():
            if gguf_name == _ROPE_FREQS:
                continue
            match = _LAYER_RE.match(gguf_name)
            if mla and match and match.group(2) in _MLA_SPLIT:
                split.setdefault(int(match.group(1)), {})[match.group(2)] = tensor
                continue
            entries = _hf_entries(gguf_name, tensor, names, mla=mla)
            if entries is None:
                raise UnsupportedModelError(
                    f"{path}: tensor {gguf_name!r} has no counterpart in the {config['model_type']} family; "
                    "this GGUF holds something edge-prism does not run")
            self._tensors.update(entries)
        for layer, parts in split.items():
            self._join_kv_b(layer, parts, config)

    def _join_kv_b(self, layer: int, parts: dict, config: dict) -> None:
        """kv_b_proj of ``layer`` from llama.cpp's split form (convert_hf_to_gguf.py
        DeepseekV2Model: kv_b_proj viewed [H, dn+dv, C], k_b = its first dn rows per head
        transposed to [H, C, dn], v_b the other dv rows [H, dv, C])."""
        name = f"model.layers.{layer}.self_attn.kv_b_proj.weight"
        if name in self._tensors:  # both forms (ik_llama.cpp's converter): attn_kv_b is the exact one
            return
        missing = [t for t in _MLA_SPLIT if t not in parts]
        if missing:
            raise CorruptCheckpointError(f"{self._path}: blk.{layer}.{missing[0]} is missing (it comes in a pair "
                                         f"with blk.{layer}.{[t for t in _MLA_SPLIT if t in parts][0]}); "
                                         "re-convert the model")
        k_b, v_b = parts["attn_k_b.weight"], parts["attn_v_b.weight"]
        heads, dn, dv, c = (config["num_attention_heads"], config["qk_nope_head_dim"], config["v_head_dim"],
                            config["kv_lora_rank"])
        for tensor, want in ((k_b, (heads, c, dn)), (v_b, (heads, dv, c))):
            got = tuple(int(d) for d in reversed(tensor.shape.tolist()))
            if got != want:
                raise ShapeMismatchError(f"{self._path}: tensor {tensor.name} has shape {got}, but the metadata "
                                         f"implies {want} (heads, ...); re-convert the model")
        self._tensors[name] = _Entry(k_b, shape=(heads * (dn + dv), c), v_b=v_b)

    def names(self) -> list[str]:
        """All tensor names (HF convention)."""
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        """HF shape of ``name`` (GGUF lists dimensions innermost first, so reversed)."""
        e = self._entry(name)
        if e.shape is not None:
            return e.shape
        dims = tuple(int(d) for d in reversed(e.tensor.shape.tolist()))
        if e.expert is not None:
            dims = dims[1:]
        if e.rows is not None:
            dims = (e.rows[1] - e.rows[0], *dims[1:])
        return dims

    def _data(self, e: _Entry) -> tuple[np.ndarray, tuple[int, ...]]:
        """The raw data of an entry (one expert's slice) and the shape it dequantizes to."""
        dims = tuple(int(d) for d in reversed(e.tensor.shape.tolist()))
        data = e.tensor.data
        if e.expert is not None:
            data = data.reshape(dims[0], dims[1], -1)[e.expert]
            dims = dims[1:]
        return data, dims

    def _dequantized(self, tensor, data: np.ndarray, dims: tuple[int, ...]) -> np.ndarray:
        try:
            values = quants.dequantize(data, tensor.tensor_type)
        except NotImplementedError as exc:
            raise UnsupportedModelError(
                f"{self._path}: tensor {tensor.name!r} is stored as {tensor.tensor_type.name}, "
                "which cannot be dequantized here; re-quantize the model to Q8_0, Q4_K or another common type"
            ) from exc
        return np.asarray(values, dtype=np.float32).reshape(dims)

    def get(self, name: str) -> torch.Tensor:
        """``name`` dequantized to a float32 CPU tensor of its HF shape."""
        e = self._entry(name)
        if e.v_b is not None:
            return torch.from_numpy(self._rejoined(e))
        data, dims = self._data(e)
        values = self._dequantized(e.tensor, data, dims)
        if e.rows is not None:
            values = values[e.rows[0]:e.rows[1]]
        values = values.reshape(self.shape(name))
        projection = name.rsplit(".", 2)[-2]
        if projection in self._heads:
            values = _unpermute_rope(values, self._heads[projection])
        if not values.flags.writeable:  # F32 data is still a view of the read-only mmap
            values = values.copy()
        return torch.from_numpy(np.ascontiguousarray(values))

    def _rejoined(self, e: _Entry) -> np.ndarray:
        """kv_b_proj [H*(dn+dv), C] from attn_k_b [H, C, dn] and attn_v_b [H, dv, C]: each
        head's dn key rows (k_b transposed back), then its dv value rows. The file's own values."""
        k_dims = tuple(int(d) for d in reversed(e.tensor.shape.tolist()))  # (H, C, dn)
        v_dims = tuple(int(d) for d in reversed(e.v_b.shape.tolist()))  # (H, dv, C)
        k = self._dequantized(e.tensor, e.tensor.data, k_dims)
        v = self._dequantized(e.v_b, e.v_b.data, v_dims)
        return np.ascontiguousarray(np.concatenate([k.transpose(0, 2, 1), v], axis=1).reshape(e.shape))

    def quantized(self, name: str) -> QMatrix | None:
        """``name`` as a QMatrix of its HF shape, or None for float tensors (and 1-D ones)."""
        e = self._entry(name)
        shape = self.shape(name)
        if e.v_b is not None:
            # A quantized attn_k_b has its blocks along dn, across kv_b_proj's rows, so no
            # row-blocked form holds it exactly: kv_b_proj is read as float (the file's own
            # values, rejoined), and decode takes the absorbed path that layout was made for.
            if is_quantized(e.tensor.tensor_type) or is_quantized(e.v_b.tensor_type):
                logger.info("%s: %s rejoined from %s (%s) and %s (%s) as float", self._path, name, e.tensor.name,
                            e.tensor.tensor_type.name, e.v_b.name, e.v_b.tensor_type.name)
            return None
        if not is_quantized(e.tensor.tensor_type) or len(shape) != 2:
            return None
        data, dims = self._data(e)
        qm, err = to_qmatrix(data, e.tensor.tensor_type, dims)
        if err and name not in self.conversions:
            self.conversions[name] = (e.tensor.tensor_type.name, err)
            logger.info("%s: %s stored as %s, converted to %s (relative error %.2e)", self._path, name,
                        e.tensor.tensor_type.name, qm.kind, err)
        if e.rows is not None:
            qm = qm.take_rows(torch.arange(*e.rows))
        projection = name.rsplit(".", 2)[-2]
        if projection in self._heads:
            index = np.arange(shape[0])[:, None]
            qm = qm.take_rows(torch.from_numpy(_unpermute_rope(index, self._heads[projection])[:, 0].copy()))
        return qm

    def _entry(self, name: str) -> _Entry:
        try:
            return self._tensors[name]
        except KeyError:
            raise KeyError(f"{self._path}: no tensor {name!r}") from None


_EXPERT_PARTS = {"ffn_gate_exps": 0, "ffn_up_exps": 1, "ffn_down_exps": 2}
_LEGACY_EXPERT = re.compile(r"^ffn_(gate|up|down)\.(\d+)\.weight$")
_SHARED_PARTS = {"ffn_gate_shexp.weight": 0, "ffn_up_shexp.weight": 1, "ffn_down_shexp.weight": 2}


def _hf_entries(gguf_name: str, tensor, names, *, mla: bool = False) -> dict[str, _Entry] | None:
    """The HF-named entries one GGUF tensor provides (None: no counterpart)."""
    if gguf_name in _GLOBAL_NAMES:
        return {_GLOBAL_NAMES[gguf_name]: _Entry(tensor)}
    match = _LAYER_RE.match(gguf_name)
    if match is None:
        return None
    layer, rest = int(match.group(1)), match.group(2)
    if mla and rest in _MLA_NAMES:
        return {f"model.layers.{layer}.{_MLA_NAMES[rest]}": _Entry(tensor)}
    suffix = _LAYER_NAMES.get(rest) or _LAYER_BIASES.get(rest)
    if suffix is not None:
        if rest in ("ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"):  # a dense FFN layer
            part = ("ffn_gate.weight", "ffn_up.weight", "ffn_down.weight").index(rest)
            return {names.dense[part].format(l=layer): _Entry(tensor)}
        return {f"model.layers.{layer}.{suffix}": _Entry(tensor)}
    stem = rest.removesuffix(".weight")
    experts = int(tensor.shape.tolist()[-1]) if len(tensor.shape) == 3 else 0
    if stem in _EXPERT_PARTS and experts and names.router:
        part = names.expert[_EXPERT_PARTS[stem]]
        return {part.format(l=layer, e=e): _Entry(tensor, expert=e) for e in range(experts)}
    if stem == "ffn_gate_up_exps" and experts and names.router:
        width = int(tensor.shape.tolist()[1]) // 2  # [D, 2*W, E]: gate rows, then up rows
        out = {}
        for e in range(experts):
            out[names.expert[0].format(l=layer, e=e)] = _Entry(tensor, expert=e, rows=(0, width))
            out[names.expert[1].format(l=layer, e=e)] = _Entry(tensor, expert=e, rows=(width, 2 * width))
        return out
    legacy = _LEGACY_EXPERT.match(rest)
    if legacy and names.router:  # older files: one tensor per expert
        part = ("gate", "up", "down").index(legacy.group(1))
        return {names.expert[part].format(l=layer, e=int(legacy.group(2))): _Entry(tensor)}
    if rest == "ffn_gate_inp.weight" and names.router:
        return {names.router.format(l=layer): _Entry(tensor)}
    if rest in _SHARED_PARTS and names.shared:
        return {names.shared[_SHARED_PARTS[rest]].format(l=layer): _Entry(tensor)}
    if rest == "ffn_gate_inp_shexp.weight" and names.shared_gate:
        width = int(tensor.shape.tolist()[0])  # stored [D]: HF keeps it as a [1, D] linear
        return {names.shared_gate.format(l=layer): _Entry(tensor, shape=(1, width))}
    return None


def _unpermute_rope(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (convert_hf_to_gguf.py ``permute``).

    llama.cpp rotates adjacent pairs (x0, x1), (x2, x3)... while HF rotates halves
    (x0, x_{d/2})...; the converter reorders each head's rows to match, so we reorder back:
    rows [head, pair, 2] -> [head, 2, pair].
    """
    half = weights.shape[0] // n_head // 2
    return weights.reshape(n_head, half, 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


# -- reading the file ------------------------------------------------------------------


def _open_reader(path: Path) -> gguf.GGUFReader:
    """A GGUFReader over ``path``; any damage becomes a CorruptCheckpointError that names the file."""
    fix = "re-download or re-convert it"
    try:
        with path.open("rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise ModelNotFoundError(f"{path}: cannot read it ({exc.strerror})") from exc
    if magic != _GGUF_MAGIC:
        raise CorruptCheckpointError(f"{path}: not a GGUF file (it does not start with 'GGUF'); {fix}")
    try:
        reader = gguf.GGUFReader(path)
    except ValueError as exc:
        if "GGMLQuantizationType" in str(exc):
            # A tensor type this gguf package does not know: newer file, not damage.
            raise UnsupportedModelError(
                f"{path}: a tensor uses a quantization type unknown to the installed gguf package ({exc}); "
                "upgrade gguf or re-quantize the model to a common type (Q8_0, Q4_K)"
            ) from exc
        raise CorruptCheckpointError(f"{path}: the GGUF file is truncated or damaged ({exc}); {fix}") from exc
    except (IndexError, KeyError, TypeError, OverflowError, UnicodeDecodeError, MemoryError) as exc:
        raise CorruptCheckpointError(
            f"{path}: the GGUF file is truncated or damaged ({type(exc).__name__}: {exc}); {fix}"
        ) from exc
    size = path.stat().st_size
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size or tensor.data.nbytes != tensor.n_bytes:
            raise CorruptCheckpointError(f"{path}: tensor {tensor.name!r} runs past the end of the file; {fix}")
    return reader


# -- config ------------------------------------------------------------------------------


def _config(meta: GgufMeta, by_name: dict, path: Path, arch: str) -> dict:
    """A Hugging Face config dict from the file's ``{arch}.*`` metadata and tensor shapes."""
    a, spec = arch, ARCHITECTURES[arch]
    mla = spec.attention == "mla"
    hidden = int(meta.require(f"{a}.embedding_length"))
    heads = int(meta.require(f"{a}.attention.head_count"))
    attention = _mla_config(meta, by_name, path, a, heads) if mla else _gqa_config(meta, path, a, hidden, heads)
    tokens = meta.get("tokenizer.ggml.tokens")
    embed = by_name.get("token_embd.weight")
    vocab = meta.get(f"{a}.vocab_size") or (len(tokens) if tokens else None)
    if vocab is None and embed is not None:
        vocab = int(embed.shape[-1])
    rope_theta = float(meta.get(f"{a}.rope.freq_base", 10000.0))
    layers = int(meta.require(f"{a}.block_count"))
    moe = _moe_config(meta, by_name, path, a, spec, layers)
    # llama.cpp's deepseek2 requires the epsilon; the others default it.
    eps = meta.require(f"{a}.attention.layer_norm_rms_epsilon") if mla else \
        meta.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)
    config = {
        "model_type": spec.families[1 if moe else 0],
        "vocab_size": int(vocab) if vocab is not None else None,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        **attention,
        "hidden_act": "silu",
        "rms_norm_eps": float(eps),
        "rope_theta": rope_theta,
        "max_position_embeddings": int(meta.require(f"{a}.context_length")),
        "tie_word_embeddings": "output.weight" not in by_name,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }
    bias = any(name.endswith(".attn_q.bias") for name in by_name)
    if config["model_type"] == "qwen2_moe":
        config["qkv_bias"] = bias
    else:
        config["attention_bias"] = bias
    if config["model_type"] == "llama":
        config.update(intermediate_size=int(meta.require(f"{a}.feed_forward_length")), mlp_bias=False)
    config.update(moe or {})
    if config["vocab_size"] is None:
        raise CorruptCheckpointError(
            f"{path}: cannot tell the vocabulary size (no {a}.vocab_size, tokens or embedding); re-convert the model"
        )
    if mla:
        rope_scaling = _deepseek2_rope_scaling(meta, by_name, path, a)
    else:
        rope_scaling = _rope_scaling(meta, by_name, path, head_dim=attention["head_dim"], theta=rope_theta, arch=a)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    return config


def _gqa_config(meta: GgufMeta, path: Path, a: str, hidden: int, heads: int) -> dict:
    """Key/value heads and head width of a (grouped-query) attention file."""
    kv_heads = _per_layer_constant(meta, f"{a}.attention.head_count_kv", heads, path)
    head_dim = int(meta.get(f"{a}.attention.key_length", hidden // heads))
    rope_dims = meta.get(f"{a}.rope.dimension_count")
    if rope_dims is not None and int(rope_dims) != head_dim:
        raise UnsupportedModelError(
            f"{path}: partial rotary embedding ({a}.rope.dimension_count={rope_dims}, head_dim={head_dim}) "
            f"is not part of the {a} architecture"
        )
    return {"num_key_value_heads": kv_heads, "head_dim": head_dim}


def _mla_config(meta: GgufMeta, by_name: dict, path: Path, a: str, heads: int) -> dict:
    """deepseek2's multi-head latent attention dimensions, read as llama.cpp reads them
    (llama_model_deepseek2::load_arch_hparams, llama_hparams::is_mla).

    Files converted since llama.cpp split kv_b (attn_k_b/attn_v_b) describe the absorbed form,
    one shared latent "head": key_length = C + R, value_length = C, head_count_kv = 1, and the
    real head widths in key_length_mla (dn + R) and value_length_mla (dv). Older files
    (attn_kv_b) have the real widths in key_length / value_length and head_count_kv = heads.
    """
    def bad(key: str, value, want: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{path}: {key}={value} but {want}; re-convert the model")

    rope = int(meta.require(f"{a}.rope.dimension_count"))
    latent = int(meta.require(f"{a}.attention.kv_lora_rank"))
    kv_heads = _per_layer_constant(meta, f"{a}.attention.head_count_kv", heads, path)
    if meta.get(f"{a}.attention.key_length_mla") is not None or meta.get(f"{a}.attention.value_length_mla") is not None:
        qk = int(meta.require(f"{a}.attention.key_length_mla"))
        v = int(meta.require(f"{a}.attention.value_length_mla"))
        key_length, value_length = meta.get(f"{a}.attention.key_length"), meta.get(f"{a}.attention.value_length")
        if key_length is not None and int(key_length) != latent + rope:
            raise bad(f"{a}.attention.key_length", key_length,
                      f"the latent attention's key is kv_lora_rank + rope.dimension_count = {latent + rope}")
        if value_length is not None and int(value_length) != latent:
            raise bad(f"{a}.attention.value_length", value_length, f"the latent attention's value is "
                      f"{a}.attention.kv_lora_rank = {latent}")
        if kv_heads != 1:
            raise bad(f"{a}.attention.head_count_kv", kv_heads, "the latent attention shares one key/value head (1)")
    else:
        qk = int(meta.require(f"{a}.attention.key_length"))
        v = int(meta.require(f"{a}.attention.value_length"))
        if kv_heads != heads:
            raise bad(f"{a}.attention.head_count_kv", kv_heads, f"a file without key_length_mla expands keys and "
                      f"values per head ({a}.attention.head_count = {heads})")
    if qk <= rope:
        raise bad(f"{a}.rope.dimension_count", rope, f"the key head width is {qk} "
                  f"({a}.attention.key_length{'_mla' if meta.get(f'{a}.attention.key_length_mla') else ''}); "
                  "the rotary part must leave a non-rotary part")
    q_lora = int(meta.get(f"{a}.attention.q_lora_rank", 0) or 0)
    has_q_a = any(name.endswith(".attn_q_a.weight") for name in by_name)
    if q_lora and not has_q_a:
        raise bad(f"{a}.attention.q_lora_rank", q_lora, "the file has no attn_q_a tensors (a low-rank query)")
    if not q_lora and has_q_a:
        raise CorruptCheckpointError(f"{path}: attn_q_a tensors (a low-rank query) but no {a}.attention.q_lora_rank; "
                                     "re-convert the model")
    if any(name.endswith((".attn_q.bias", ".attn_q_a.bias", ".attn_kv_a_mqa.bias", ".attn_output.bias"))
           for name in by_name):
        raise UnsupportedModelError(f"{path}: attention biases in a {a} file (llama.cpp's {a} has none); "
                                    "cannot map them")
    # transformers writes head_dim = qk_rope_head_dim for deepseek_v2; the family ignores it.
    return {"num_key_value_heads": heads, "head_dim": rope, "q_lora_rank": q_lora or None, "kv_lora_rank": latent,
            "qk_nope_head_dim": qk - rope, "qk_rope_head_dim": rope, "v_head_dim": v}


# ggml's expert gating functions (llama.cpp: LLAMA_EXPERT_GATING_FUNC_TYPE_*): the families here route by softmax.
_GATING_SOFTMAX = 1


def _moe_config(meta: GgufMeta, by_name: dict, path: Path, a: str, spec: _Arch, layers: int) -> dict | None:
    """The MoE part of the HF config (None for a dense file), checked against the tensors."""
    experts = int(meta.get(f"{a}.expert_count", 0) or 0)
    has_experts = [any(f"blk.{i}.{t}" in by_name for t in ("ffn_gate_exps.weight", "ffn_gate_up_exps.weight",
                                                           "ffn_gate.0.weight")) for i in range(layers)]
    if not experts:
        if any(has_experts):
            raise CorruptCheckpointError(f"{path}: expert tensors but no {a}.expert_count; re-convert the model")
        if a != "llama":
            raise UnsupportedModelError(f"{path}: {a} file without {a}.expert_count; edge-prism reads {a} as MoE")
        return None
    if not any(has_experts):
        raise CorruptCheckpointError(f"{path}: {a}.expert_count={experts} but no expert tensors (ffn_gate_exps); "
                                     "re-convert the model")
    used = int(meta.require(f"{a}.expert_used_count"))
    if not 1 <= used <= experts:
        raise CorruptCheckpointError(f"{path}: {a}.expert_used_count={used} is not in 1..{a}.expert_count={experts}")
    family = spec.families[1]
    if family == "deepseek_v2":
        routing = _deepseek2_routing(meta, by_name, path, a, experts=experts, layers=layers)
    else:
        routing = {}
        gating = meta.get(f"{a}.expert_gating_func")
        if gating is not None and int(gating) != _GATING_SOFTMAX:
            raise UnsupportedModelError(f"{path}: {a}.expert_gating_func={gating}: the {a} family routes by softmax "
                                        f"({_GATING_SOFTMAX}) only")
        scale = meta.get(f"{a}.expert_weights_scale")
        if scale is not None and not math.isclose(float(scale), 1.0):
            raise UnsupportedModelError(f"{path}: {a}.expert_weights_scale={scale}: the {a} family has no routed "
                                        "weight scale")
        norm = meta.get(f"{a}.expert_weights_norm")
        if norm is not None and bool(norm) != spec.norm_topk:
            raise UnsupportedModelError(f"{path}: {a}.expert_weights_norm={norm} disagrees with the {a} architecture "
                                        f"(llama.cpp renormalises its top-k weights: {spec.norm_topk})")
    widths = set()
    for i in range(layers):
        for name in (f"blk.{i}.ffn_gate_exps.weight", f"blk.{i}.ffn_gate.0.weight"):
            if name in by_name:
                widths.add(int(by_name[name].shape.tolist()[1]))
        if f"blk.{i}.ffn_gate_up_exps.weight" in by_name:
            widths.add(int(by_name[f"blk.{i}.ffn_gate_up_exps.weight"].shape.tolist()[1]) // 2)
    declared = meta.get(f"{a}.expert_feed_forward_length")
    if declared is not None:
        widths.add(int(declared))
    if len(widths) != 1:
        raise CorruptCheckpointError(f"{path}: expert widths disagree ({a}.expert_feed_forward_length and the "
                                     f"expert tensors: {sorted(widths)}); re-convert the model")
    width = widths.pop()
    dense = [i for i, e in enumerate(has_experts) if not e]
    leading = meta.get(f"{a}.leading_dense_block_count")
    if leading is not None and dense != list(range(int(leading))):
        raise CorruptCheckpointError(f"{path}: {a}.leading_dense_block_count={leading} but the layers without "
                                     f"expert tensors are {dense}; re-convert the model")
    if dense and family in ("mixtral", "olmoe"):
        raise UnsupportedModelError(f"{path}: layers {dense} have no expert tensors; the {family} family has none")
    out = {"num_experts_per_tok": used, "norm_topk_prob": spec.norm_topk, **routing}
    if family == "mixtral":
        out.update(num_local_experts=experts, intermediate_size=width)
    elif family == "olmoe":
        out.update(num_experts=experts, intermediate_size=width, clip_qkv=None)
    elif family == "deepseek_v2":
        out.update(_deepseek2_ffn(meta, by_name, path, a, experts=experts, width=width, dense=dense))
    else:  # qwen2_moe, qwen3_moe: dense layers are mlp_only_layers of their own width
        shared = int(meta.get(f"{a}.expert_shared_feed_forward_length", 0) or 0)
        if shared and f"blk.{next(i for i, e in enumerate(has_experts) if e)}.ffn_gate_shexp.weight" not in by_name:
            raise CorruptCheckpointError(f"{path}: {a}.expert_shared_feed_forward_length={shared} but no "
                                         "ffn_gate_shexp tensor; re-convert the model")
        out.update(num_experts=experts, moe_intermediate_size=width, shared_expert_intermediate_size=shared,
                   mlp_only_layers=dense, decoder_sparse_step=1,
                   intermediate_size=int(meta.get(f"{a}.feed_forward_length", width) or width))
    return out


def _deepseek2_ffn(meta: GgufMeta, by_name: dict, path: Path, a: str, *, experts: int, width: int,
                   dense: list[int]) -> dict:
    """deepseek_v2's FFN layout: leading dense layers, routed experts, ungated shared experts."""
    leading = int(meta.get(f"{a}.leading_dense_block_count", 0) or 0)  # llama.cpp's default: 0
    if dense != list(range(leading)):
        raise CorruptCheckpointError(f"{path}: {a}.leading_dense_block_count={leading} but the layers without expert "
                                     f"tensors are {dense}; re-convert the model")
    shared = int(meta.require(f"{a}.expert_shared_count"))  # llama.cpp requires it too
    first_moe = f"blk.{leading}.ffn_gate_shexp.weight"
    rows = int(by_name[first_moe].shape.tolist()[1]) if first_moe in by_name else 0
    if rows != shared * width:
        raise CorruptCheckpointError(f"{path}: {a}.expert_shared_count={shared} x {a}.expert_feed_forward_length="
                                     f"{width} but the shared expert (ffn_gate_shexp) has {rows} rows; "
                                     "re-convert the model")
    declared = meta.get(f"{a}.expert_shared_feed_forward_length")
    if declared is not None and int(declared) != shared * width:
        raise CorruptCheckpointError(f"{path}: {a}.expert_shared_feed_forward_length={declared} but "
                                     f"{a}.expert_shared_count x expert width = {shared * width}; re-convert the model")
    dense_width = meta.get(f"{a}.feed_forward_length")
    if dense and dense_width is None:
        raise CorruptCheckpointError(f"{path}: dense layers {dense} but no {a}.feed_forward_length; "
                                     "re-convert the model")
    return {"n_routed_experts": experts, "moe_intermediate_size": width, "n_shared_experts": shared,
            "first_k_dense_replace": leading, "moe_layer_freq": 1,
            "intermediate_size": int(dense_width) if dense_width is not None else width}


# Layer counts and vocabulary of GLM-4.7 Lite, a deepseek2 file that llama.cpp routes by sigmoid
# when it carries no expert_gating_func (llama_model_deepseek2::load_arch_hparams).
_SIGMOID_BY_DEFAULT = ((47, 48), 154880)


def _deepseek2_routing(meta: GgufMeta, by_name: dict, path: Path, a: str, *, experts: int, layers: int) -> dict:
    """deepseek_v2's router settings from a deepseek2 file, or a refusal naming the key.

    Read as llama.cpp reads them, run as transformers' deepseek_v2 runs them: softmax scores,
    top-k after an optional group limit, x routed_scaling_factor, no renormalisation.
    Group limit: llama.cpp applies one only when expert_group_count > 1, and ranks groups by
    the sum of their two best scores (DeepSeek-V3's rule); DeepSeek-V2 and transformers rank
    them by the best score, which edge-prism follows. Older V2/V2.5 files carry no group keys:
    they route without a group limit, as llama.cpp routes them (transformers would limit the
    236B V2's 160 experts to 3 of 8 groups: its config says so, the file does not).
    """
    gating = int(meta.get(f"{a}.expert_gating_func", 0) or 0)  # 0 is llama.cpp's "not set"
    vocab = meta.get(f"{a}.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or [])
    if gating == 0 and layers in _SIGMOID_BY_DEFAULT[0] and int(vocab) == _SIGMOID_BY_DEFAULT[1]:
        raise UnsupportedModelError(f"{path}: no {a}.expert_gating_func on a {layers}-layer file with a "
                                    f"{vocab}-token vocabulary: llama.cpp routes it by sigmoid (GLM-4.7); "
                                    "deepseek_v2 routes by softmax only")
    if gating not in (0, _GATING_SOFTMAX):
        raise UnsupportedModelError(f"{path}: {a}.expert_gating_func={gating}: deepseek_v2 routes by softmax "
                                    f"({_GATING_SOFTMAX}) only (2, sigmoid, is DeepSeek-V3's router)")
    if any(name.endswith(".exp_probs_b.bias") for name in by_name):
        raise UnsupportedModelError(f"{path}: exp_probs_b tensors (DeepSeek-V3's expert selection bias): not a "
                                    "DeepSeek-V2 router; edge-prism runs deepseek_v2 only")
    if meta.get(f"{a}.expert_weights_norm"):
        raise UnsupportedModelError(f"{path}: {a}.expert_weights_norm=true: llama.cpp renormalises the top-k "
                                    "weights of such a file, transformers' deepseek_v2 never does; cannot run it")
    for key in (f"{a}.attention.temperature_scale", f"{a}.nextn_predict_layers"):
        if meta.get(key):
            raise UnsupportedModelError(f"{path}: {key}={meta.get(key)} is not part of DeepSeek-V2 (a later model "
                                        "stored as deepseek2); edge-prism cannot run it")
    scale = float(meta.get(f"{a}.expert_weights_scale", 0.0) or 0.0)
    if scale < 0:
        raise CorruptCheckpointError(f"{path}: {a}.expert_weights_scale={scale} is negative; re-convert the model")
    groups = int(meta.get(f"{a}.expert_group_count", 0) or 0)
    used_groups = meta.get(f"{a}.expert_group_used_count")
    out = {"routed_scaling_factor": scale or 1.0,  # 0 (or absent): llama.cpp does not scale
           "topk_method": "greedy", "n_group": None, "topk_group": None}
    if groups <= 1:
        if used_groups is not None and int(used_groups) > max(groups, 1):
            raise CorruptCheckpointError(f"{path}: {a}.expert_group_used_count={used_groups} but "
                                         f"{a}.expert_group_count={groups or 'absent'}; re-convert the model")
        return out
    if used_groups is None:
        raise CorruptCheckpointError(f"{path}: {a}.expert_group_count={groups} without "
                                     f"{a}.expert_group_used_count; re-convert the model")
    if experts % groups or not 1 <= int(used_groups) <= groups:
        raise CorruptCheckpointError(f"{path}: {a}.expert_group_count={groups} and {a}.expert_group_used_count="
                                     f"{used_groups} do not split {a}.expert_count={experts} experts into groups "
                                     "and keep 1..all of them; re-convert the model")
    out.update(topk_method="group_limited_greedy", n_group=groups, topk_group=int(used_groups))
    return out


def _per_layer_constant(meta: GgufMeta, key: str, default: int, path: Path) -> int:
    value = meta.get(key, default)
    if isinstance(value, list):  # some converters write one value per layer
        if len(set(value)) != 1:
            raise UnsupportedModelError(
                f"{path}: {key} differs between layers ({sorted(set(value))}); not a plain Llama model"
            )
        value = value[0]
    return int(value)


def _rope_scaling(meta: GgufMeta, by_name: dict, path: Path, *, head_dim: int, theta: float,
                  arch: str = "llama") -> dict | None:
    """HF ``rope_scaling`` for the file's rope scaling metadata (or its llama 3 ``rope_freqs`` tensor)."""
    kind = meta.get(f"{arch}.rope.scaling.type")
    factor = meta.get(f"{arch}.rope.scaling.factor")
    original = meta.get(f"{arch}.rope.scaling.original_context_length")
    if _ROPE_FREQS in by_name:
        if kind not in (None, "none"):
            raise UnsupportedModelError(f"{path}: both rope_freqs and rope scaling type {kind!r}; cannot map that")
        return _llama3_rope_scaling(by_name[_ROPE_FREQS], path, head_dim=head_dim, theta=theta, original=original)
    if kind in (None, "none"):
        return None
    if factor is None:
        raise CorruptCheckpointError(f"{path}: rope scaling type {kind!r} without {arch}.rope.scaling.factor")
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        return _yarn_scaling(meta, path, factor=float(factor), original=original, arch=arch)
    raise UnsupportedModelError(f"{path}: rope scaling type {kind!r} is not supported (supported: linear, yarn)")


def _yarn_scaling(meta: GgufMeta, path: Path, *, factor: float, original, arch: str = "llama") -> dict:
    """HF YaRN parameters; llama.cpp knobs that HF's YaRN has no counterpart for must be at their defaults."""
    # key suffix -> (is this value HF's behaviour?); ext_factor < 0 means "1.0 for YaRN" in llama.cpp.
    neutral = {
        "attn_factor": lambda v: math.isclose(v, 1.0),
        "yarn_attn_factor": lambda v: math.isclose(v, 1.0),
        "yarn_log_multiplier": lambda v: math.isclose(v, 0.0),
        "yarn_ext_factor": lambda v: v < 0 or math.isclose(v, 1.0),
    }
    for suffix, is_neutral in neutral.items():
        value = meta.get(f"{arch}.rope.scaling.{suffix}")
        if value is not None and not is_neutral(float(value)):
            raise UnsupportedModelError(
                f"{path}: YaRN with {arch}.rope.scaling.{suffix}={value} has no Hugging Face equivalent; cannot map it"
            )
    scaling = {"rope_type": "yarn", "factor": factor}
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    for suffix in ("beta_fast", "beta_slow"):
        value = meta.get(f"{arch}.rope.scaling.yarn_{suffix}")
        if value is not None:
            scaling[suffix] = float(value)
    return scaling


def _deepseek2_rope_scaling(meta: GgufMeta, by_name: dict, path: Path, a: str) -> dict | None:
    """deepseek_v2's ``rope_scaling`` from a deepseek2 file's rope keys.

    The converter writes yarn's factor, original context and betas, and
    ``rope.scaling.yarn_log_multiplier`` = 0.1 x mscale_all_dim (llama.cpp divides it by 0.1 on
    load: [TAG_DEEPSEEK2_YARN_LOG_MUL_FIX]), but not ``mscale``. llama.cpp then takes mscale =
    mscale_all_dim (llama_context, the deepseek2 special case): rotary factor
    mscale(f, mscale) / mscale(f, mscale_all_dim) = 1, softmax scale x mscale(f, mscale_all_dim)^2,
    which is transformers' deepseek_v2 with those two equal (every DeepSeek-V2 release: 0.707).
    Without the multiplier (a config without mscale_all_dim) transformers keeps the softmax scale
    and multiplies the rotary by mscale(f, 1); llama.cpp multiplies the softmax scale by
    mscale(f, 1)^2 as well. edge-prism follows transformers there.
    """
    kind = meta.get(f"{a}.rope.scaling.type")
    if _ROPE_FREQS in by_name:
        raise UnsupportedModelError(f"{path}: a rope_freqs tensor in a {a} file; cannot map it")
    if kind in (None, "none"):
        return None
    factor = meta.get(f"{a}.rope.scaling.factor")
    if factor is None:
        raise CorruptCheckpointError(f"{path}: rope scaling type {kind!r} without {a}.rope.scaling.factor")
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind != "yarn":
        raise UnsupportedModelError(f"{path}: rope scaling type {kind!r} is not supported for {a} "
                                    "(supported: linear, yarn)")
    # Knobs without a deepseek_v2 counterpart: only their defaults. (llama.cpp scales the rotary
    # and the softmax by attn_factor; its deepseek2 ignores yarn_ext_factor.)
    neutral = {"attn_factor": lambda v: math.isclose(v, 1.0),
               "yarn_ext_factor": lambda v: v < 0 or math.isclose(v, 1.0)}
    for suffix, is_neutral in neutral.items():
        value = meta.get(f"{a}.rope.scaling.{suffix}")
        if value is not None and not is_neutral(float(value)):
            raise UnsupportedModelError(f"{path}: YaRN with {a}.rope.scaling.{suffix}={value} has no deepseek_v2 "
                                        "equivalent; cannot map it")
    scaling = {"rope_type": "yarn", "factor": float(factor)}
    original = meta.get(f"{a}.rope.scaling.original_context_length")
    if original is not None:  # else transformers and llama.cpp both take the context length
        scaling["original_max_position_embeddings"] = int(original)
    # llama.cpp's deepseek2 reads neither the betas (it uses 32 and 1, the defaults) nor the
    # attention factor (the converter writes a config's attention_factor there); transformers
    # uses all three, and so does edge-prism.
    for suffix, key in (("beta_fast", "beta_fast"), ("beta_slow", "beta_slow"), ("attn_factor", "attention_factor")):
        value = meta.get(f"{a}.rope.scaling.yarn_{suffix}")
        if value is not None:
            scaling[key] = float(value)
    log_mul = float(meta.get(f"{a}.rope.scaling.yarn_log_multiplier", 0.0) or 0.0)
    if log_mul < 0:
        raise CorruptCheckpointError(f"{path}: {a}.rope.scaling.yarn_log_multiplier={log_mul} is negative")
    if log_mul:
        mscale_all_dim = log_mul / 0.1
        scaling.update(mscale=mscale_all_dim, mscale_all_dim=mscale_all_dim)
    return scaling


def _llama3_rope_scaling(tensor, path: Path, *, head_dim: int, theta: float, original) -> dict | None:
    """Recover llama 3's rope_scaling parameters from the per-frequency factors llama.cpp stores.

    The converter writes only the factors, not the parameters that produced them, so try the
    values Llama 3.x uses and accept one only if it reproduces every factor.
    """
    factors = np.asarray(quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float64).reshape(-1)
    if np.allclose(factors, 1.0):
        return None
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if factors.shape != freqs.shape:
        raise CorruptCheckpointError(f"{path}: rope_freqs has {factors.size} values, expected {freqs.size}")
    factor = float(factors.max())
    contexts = [int(original)] if original is not None else [8192, 4096, 16384, 32768, 131072]
    for context in contexts:
        for low in (1.0, 2.0):
            for high in (2.0, 4.0, 8.0):
                if high > low and np.allclose(_llama3_factors(freqs, factor, low, high, context), factors, rtol=1e-4):
                    return {
                        "rope_type": "llama3",
                        "factor": factor,
                        "low_freq_factor": low,
                        "high_freq_factor": high,
                        "original_max_position_embeddings": context,
                    }
    raise UnsupportedModelError(
        f"{path}: the rope_freqs tensor does not match llama 3 rope scaling with any usual parameters; cannot map it"
    )


def _llama3_factors(freqs: np.ndarray, factor: float, low: float, high: float, context: int) -> np.ndarray:
    """The divisor llama 3 applies to each rotary frequency (as convert_hf_to_gguf.py computes it)."""
    wavelen = 2 * math.pi / freqs
    smooth = (context / wavelen - low) / (high - low)
    blended = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < context / high, 1.0, np.where(wavelen > context / low, factor, blended))


def _check_shapes(path: Path, config: dict, tensors: GgufTensors) -> None:
    """Every tensor the family needs is there with the shape the metadata implies."""
    from edge_prism.build import expected_shapes
    from edge_prism.families import build_spec

    try:
        spec = build_spec(config, where=str(path))
    except UnsupportedModelError:
        return  # a feature the engine does not run (yarn rope...): load() says so when it builds the model
    expected = expected_shapes(spec)
    present = set(tensors.names())
    missing = [name for name in expected if name not in present]
    if missing:
        raise CorruptCheckpointError(
            f"{path}: {len(missing)} tensors missing (first: {missing[0]}); re-download or re-convert the model"
        )
    for name, shape in expected.items():
        if tensors.shape(name) != tuple(shape):
            raise ShapeMismatchError(
                f"{path}: tensor {name} has shape {tensors.shape(name)}, but the config implies {tuple(shape)}; "
                "re-convert the model"
            )
