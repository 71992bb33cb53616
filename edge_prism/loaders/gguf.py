"""Load a llama.cpp GGUF file: HF-style config, lazily dequantized tensors under HF names, tokenizer.

GGUF file --GGUFReader (mmap)--> metadata -> config, tokenizer
                                 tensors  -> get(name): dequantize -> un-permute q/k -> float32 [HF shape]
"""

from __future__ import annotations

import logging
import math
import re
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

SUPPORTED_ARCHITECTURES = ("llama",)

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
_LAYER_BIASES = {
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.bias": "self_attn.o_proj.bias",
}
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
    if meta.get(f"{arch}.expert_count", 0):
        raise UnsupportedModelError(
            f"{path}: MoE GGUF files ({arch}.expert_count={meta.get(f'{arch}.expert_count')}) are not supported "
            "by the GGUF loader yet; use the model's Hugging Face checkpoint directory"
        )
    by_name = {tensor.name: tensor for tensor in reader.tensors}
    config = _llama_config(meta, by_name, path)
    tensors = GgufTensors(path, by_name, config)
    tokenizer = Tokenizer.from_gguf(reader, path) if "tokenizer.ggml.model" in reader.fields else None
    if tokenizer is None:
        logger.warning("%s has no tokenizer metadata; only token ids can be used with it", path)
    return RawCheckpoint(path=path, config=config, tensors=tensors, tokenizer=tokenizer, files=[path])


class GgufTensors:
    """The tensors of a GGUF file under Hugging Face names: dequantized on demand (``get``),
    or kept in their bits (``quantized``).

    ``get`` returns a new float32 tensor that owns its memory: quantized data has to be
    expanded anyway, and the reader's read-only mmap must never back a writable torch tensor.
    ``conversions`` records every tensor whose type had to be converted to a supported
    format (name -> (ggml type, relative error against the file's own values)).
    """

    def __init__(self, path: Path, by_name: dict, config: dict) -> None:
        self._path = path
        self.conversions: dict[str, tuple[str, float]] = {}
        self._heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
        self._tensors = {}
        for gguf_name, tensor in by_name.items():
            if gguf_name == _ROPE_FREQS:
                continue
            hf_name = _hf_name(gguf_name)
            if hf_name is None:
                raise UnsupportedModelError(
                    f"{path}: tensor {gguf_name!r} has no Llama counterpart; this GGUF is not a plain Llama model"
                )
            self._tensors[hf_name] = tensor
        _check_shapes(path, config, self)

    def names(self) -> list[str]:
        """All tensor names (HF convention)."""
        return list(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        """HF shape of ``name`` (GGUF lists dimensions innermost first, so reversed)."""
        return tuple(int(d) for d in reversed(self._reader_tensor(name).shape.tolist()))

    def get(self, name: str) -> torch.Tensor:
        """``name`` dequantized to a float32 CPU tensor of its HF shape."""
        tensor = self._reader_tensor(name)
        try:
            values = quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as exc:
            raise UnsupportedModelError(
                f"{self._path}: tensor {tensor.name!r} is stored as {tensor.tensor_type.name}, "
                "which cannot be dequantized here; re-quantize the model to Q8_0, Q4_K or another common type"
            ) from exc
        values = np.asarray(values, dtype=np.float32).reshape(self.shape(name))
        projection = name.rsplit(".", 2)[-2]
        if projection in self._heads:
            values = _unpermute_rope(values, self._heads[projection])
        if not values.flags.writeable:  # F32 data is still a view of the read-only mmap
            values = values.copy()
        return torch.from_numpy(np.ascontiguousarray(values))

    def quantized(self, name: str) -> QMatrix | None:
        """``name`` as a QMatrix of its HF shape, or None for float tensors (and 1-D ones)."""
        tensor = self._reader_tensor(name)
        shape = self.shape(name)
        if not is_quantized(tensor.tensor_type) or len(shape) != 2:
            return None
        qm, err = to_qmatrix(tensor.data, tensor.tensor_type, shape)
        if err and name not in self.conversions:
            self.conversions[name] = (tensor.tensor_type.name, err)
            logger.info("%s: %s stored as %s, converted to %s (relative error %.2e)", self._path, name,
                        tensor.tensor_type.name, qm.kind, err)
        projection = name.rsplit(".", 2)[-2]
        if projection in self._heads:
            index = np.arange(shape[0])[:, None]
            qm = qm.take_rows(torch.from_numpy(_unpermute_rope(index, self._heads[projection])[:, 0].copy()))
        return qm

    def _reader_tensor(self, name: str):
        try:
            return self._tensors[name]
        except KeyError:
            raise KeyError(f"{self._path}: no tensor {name!r}") from None


def _unpermute_rope(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (convert_hf_to_gguf.py ``permute``).

    llama.cpp rotates adjacent pairs (x0, x1), (x2, x3)... while HF rotates halves
    (x0, x_{d/2})...; the converter reorders each head's rows to match, so we reorder back:
    rows [head, pair, 2] -> [head, 2, pair].
    """
    half = weights.shape[0] // n_head // 2
    return weights.reshape(n_head, half, 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_RE.match(gguf_name)
    if match is None:
        return None
    layer, rest = match.groups()
    suffix = _LAYER_NAMES.get(rest) or _LAYER_BIASES.get(rest)
    return f"model.layers.{layer}.{suffix}" if suffix else None


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


def _llama_config(meta: GgufMeta, by_name: dict, path: Path) -> dict:
    """A Hugging Face LlamaConfig-style dict from ``llama.*`` metadata."""
    hidden = int(meta.require("llama.embedding_length"))
    heads = int(meta.require("llama.attention.head_count"))
    kv_heads = _per_layer_constant(meta, "llama.attention.head_count_kv", heads, path)
    head_dim = int(meta.get("llama.attention.key_length", hidden // heads))
    rope_dims = meta.get("llama.rope.dimension_count")
    if rope_dims is not None and int(rope_dims) != head_dim:
        raise UnsupportedModelError(
            f"{path}: partial rotary embedding (rope.dimension_count={rope_dims}, head_dim={head_dim}) "
            "is not part of the Llama architecture"
        )
    tokens = meta.get("tokenizer.ggml.tokens")
    embed = by_name.get("token_embd.weight")
    vocab = meta.get("llama.vocab_size") or (len(tokens) if tokens else None)
    if vocab is None and embed is not None:
        vocab = int(embed.shape[-1])
    rope_theta = float(meta.get("llama.rope.freq_base", 10000.0))
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": int(vocab) if vocab is not None else None,
        "hidden_size": hidden,
        "intermediate_size": int(meta.require("llama.feed_forward_length")),
        "num_hidden_layers": int(meta.require("llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": rope_theta,
        "max_position_embeddings": int(meta.require("llama.context_length")),
        "tie_word_embeddings": "output.weight" not in by_name,
        "attention_bias": any(name.endswith(".attn_q.bias") for name in by_name),
        "mlp_bias": False,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
    }
    if config["vocab_size"] is None:
        raise CorruptCheckpointError(
            f"{path}: cannot tell the vocabulary size (no llama.vocab_size, tokens or embedding); re-convert the model"
        )
    rope_scaling = _rope_scaling(meta, by_name, path, head_dim=head_dim, theta=rope_theta)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    return config


def _per_layer_constant(meta: GgufMeta, key: str, default: int, path: Path) -> int:
    value = meta.get(key, default)
    if isinstance(value, list):  # some converters write one value per layer
        if len(set(value)) != 1:
            raise UnsupportedModelError(
                f"{path}: {key} differs between layers ({sorted(set(value))}); not a plain Llama model"
            )
        value = value[0]
    return int(value)


def _rope_scaling(meta: GgufMeta, by_name: dict, path: Path, *, head_dim: int, theta: float) -> dict | None:
    """HF ``rope_scaling`` for the file's rope scaling metadata (or its llama 3 ``rope_freqs`` tensor)."""
    kind = meta.get("llama.rope.scaling.type")
    factor = meta.get("llama.rope.scaling.factor")
    original = meta.get("llama.rope.scaling.original_context_length")
    if _ROPE_FREQS in by_name:
        if kind not in (None, "none"):
            raise UnsupportedModelError(f"{path}: both rope_freqs and rope scaling type {kind!r}; cannot map that")
        return _llama3_rope_scaling(by_name[_ROPE_FREQS], path, head_dim=head_dim, theta=theta, original=original)
    if kind in (None, "none"):
        return None
    if factor is None:
        raise CorruptCheckpointError(f"{path}: rope scaling type {kind!r} without llama.rope.scaling.factor")
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        return _yarn_scaling(meta, path, factor=float(factor), original=original)
    raise UnsupportedModelError(f"{path}: rope scaling type {kind!r} is not supported (supported: linear, yarn)")


def _yarn_scaling(meta: GgufMeta, path: Path, *, factor: float, original) -> dict:
    """HF YaRN parameters; llama.cpp knobs that HF's YaRN has no counterpart for must be at their defaults."""
    # key suffix -> (is this value HF's behaviour?); ext_factor < 0 means "1.0 for YaRN" in llama.cpp.
    neutral = {
        "attn_factor": lambda v: math.isclose(v, 1.0),
        "yarn_attn_factor": lambda v: math.isclose(v, 1.0),
        "yarn_log_multiplier": lambda v: math.isclose(v, 0.0),
        "yarn_ext_factor": lambda v: v < 0 or math.isclose(v, 1.0),
    }
    for suffix, is_neutral in neutral.items():
        value = meta.get(f"llama.rope.scaling.{suffix}")
        if value is not None and not is_neutral(float(value)):
            raise UnsupportedModelError(
                f"{path}: YaRN with llama.rope.scaling.{suffix}={value} has no Hugging Face equivalent; cannot map it"
            )
    scaling = {"rope_type": "yarn", "factor": factor}
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    for suffix in ("beta_fast", "beta_slow"):
        value = meta.get(f"llama.rope.scaling.yarn_{suffix}")
        if value is not None:
            scaling[suffix] = float(value)
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
    """Every expected tensor is there with the shape the config implies."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    q_rows = config["num_attention_heads"] * config["head_dim"]
    kv_rows = config["num_key_value_heads"] * config["head_dim"]
    expected = {
        "model.embed_tokens.weight": (config["vocab_size"], hidden),
        "model.norm.weight": (hidden,),
    }
    if not config["tie_word_embeddings"]:
        expected["lm_head.weight"] = (config["vocab_size"], hidden)
    layer_shapes = {
        "input_layernorm.weight": (hidden,),
        "post_attention_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (q_rows, hidden),
        "self_attn.k_proj.weight": (kv_rows, hidden),
        "self_attn.v_proj.weight": (kv_rows, hidden),
        "self_attn.o_proj.weight": (hidden, q_rows),
        "mlp.gate_proj.weight": (inter, hidden),
        "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
    }
    for layer in range(config["num_hidden_layers"]):
        expected.update({f"model.layers.{layer}.{name}": shape for name, shape in layer_shapes.items()})
    present = set(tensors.names())
    missing = [name for name in expected if name not in present]
    if missing:
        raise CorruptCheckpointError(
            f"{path}: {len(missing)} tensors missing (first: {missing[0]}); re-download or re-convert the model"
        )
    for name, shape in expected.items():
        if tensors.shape(name) != shape:
            raise ShapeMismatchError(
                f"{path}: tensor {name} has shape {tensors.shape(name)}, but the config implies {shape}; "
                "re-convert the model"
            )
