"""Write a Hugging Face checkpoint directory as a GGUF file the way llama.cpp's converter
(convert_hf_to_gguf.py) lays it out, for tests that must run without the converter: expert
tensors merged into one [E, rows, cols] tensor per projection (or kept per expert, the
older layout, or gate and up merged), q/k rows permuted for the llama architecture, shared
experts and their gate, the architecture's metadata keys.

The real converter is used where it is available (tests/test_moe_gguf.py); this writer
pins the same conventions so that CI covers the loader without a 15-minute build.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import quants

from edge_prism.families import FAMILIES, build_spec
from edge_prism.loaders.hf import load_hf_dir

ARCH = {"llama": "llama", "mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "olmoe": "olmoe"}
_ATTN = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _add(writer: gguf.GGUFWriter, name: str, w: np.ndarray, qtype: Q) -> None:
    if w.ndim < 2 or qtype == Q.F32:
        writer.add_tensor(name, np.ascontiguousarray(w, dtype=np.float32))
    elif qtype == Q.F16:
        writer.add_tensor(name, w.astype(np.float16))
    else:
        writer.add_tensor(name, quants.quantize(np.ascontiguousarray(w, dtype=np.float32), qtype), raw_dtype=qtype)


def copy_tokenizer(writer: gguf.GGUFWriter, source: Path) -> None:
    """Every ``tokenizer.*`` key of GGUF file ``source`` (the default model's: a tokenizer
    llama.cpp knows) into ``writer``."""
    for key, field in gguf.GGUFReader(source).fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[1] if len(field.types) > 1 else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)


def hf_to_gguf(src: Path, out: Path, *, expert_type: Q = Q.F32, other_type: Q = Q.F32,
               layout: str = "merged", tokenizer_from: Path | None = None) -> Path:
    """Write checkpoint ``src`` as GGUF ``out``; ``layout``: 'merged' (ffn_*_exps), 'legacy'
    (ffn_gate.E.weight per expert) or 'gate_up' (ffn_gate_up_exps + ffn_down_exps);
    ``tokenizer_from``: a GGUF file whose tokenizer metadata to copy."""
    raw = load_hf_dir(Path(src))
    cfg = raw.config
    spec = build_spec(cfg, where=str(src))
    names = FAMILIES[spec.family].names
    arch = ARCH[spec.family]
    t = raw.tensors

    def w(name: str) -> np.ndarray:
        return t.get(name).float().numpy()

    writer = gguf.GGUFWriter(out, arch)
    writer.add_block_count(spec.num_layers)
    writer.add_context_length(spec.max_position)
    writer.add_embedding_length(spec.hidden_size)
    writer.add_head_count(spec.num_heads)
    writer.add_head_count_kv(spec.num_kv_heads)
    writer.add_key_length(spec.head_dim)
    writer.add_value_length(spec.head_dim)
    writer.add_layer_norm_rms_eps(spec.rms_norm_eps)
    writer.add_rope_freq_base(spec.rope_theta)
    writer.add_vocab_size(spec.vocab_size)
    if tokenizer_from is not None:
        copy_tokenizer(writer, tokenizer_from)
    dense_width = int(cfg.get("intermediate_size") or 0)
    moe = [f for f in spec.ffn if f.routed]
    if moe:
        writer.add_expert_count(moe[0].num_experts)
        writer.add_expert_used_count(moe[0].top_k)
        if arch != "llama":
            writer.add_expert_feed_forward_length(moe[0].width)
        if moe[0].shared_width:
            writer.add_expert_shared_feed_forward_length(moe[0].shared_width)
        writer.add_feed_forward_length(moe[0].width if arch == "llama" else dense_width)
    else:
        writer.add_feed_forward_length(dense_width)
    _add(writer, "token_embd.weight", w("model.embed_tokens.weight"), other_type)
    _add(writer, "output_norm.weight", w("model.norm.weight"), Q.F32)
    if not spec.tie_word_embeddings:
        _add(writer, "output.weight", w("lm_head.weight"), other_type)
    for layer, f in enumerate(spec.ffn):
        blk = f"blk.{layer}"
        _add(writer, f"{blk}.attn_norm.weight", w(f"model.layers.{layer}.input_layernorm.weight"), Q.F32)
        _add(writer, f"{blk}.ffn_norm.weight", w(f"model.layers.{layer}.post_attention_layernorm.weight"), Q.F32)
        for hf, gg in _ATTN.items():
            m = w(f"model.layers.{layer}.self_attn.{hf}.weight")
            if arch == "llama" and hf in ("q_proj", "k_proj"):
                m = _permute(m, spec.num_heads if hf == "q_proj" else spec.num_kv_heads)
            _add(writer, f"{blk}.{gg}.weight", m, other_type)
            bias = f"model.layers.{layer}.self_attn.{hf}.bias"
            if bias in t.names():
                _add(writer, f"{blk}.{gg}.bias", w(bias), Q.F32)
        if spec.qk_norm != "none":
            _add(writer, f"{blk}.attn_q_norm.weight", w(f"model.layers.{layer}.self_attn.q_norm.weight"), Q.F32)
            _add(writer, f"{blk}.attn_k_norm.weight", w(f"model.layers.{layer}.self_attn.k_norm.weight"), Q.F32)
        if not f.routed:
            for part, gg in zip(names.dense, ("ffn_gate", "ffn_up", "ffn_down")):
                _add(writer, f"{blk}.{gg}.weight", w(part.format(l=layer)), expert_type)
            continue
        _add(writer, f"{blk}.ffn_gate_inp.weight", w(names.router.format(l=layer)), Q.F32)
        mats = [np.stack([w(part.format(l=layer, e=e)) for e in range(f.num_experts)]) for part in names.expert]
        if layout == "legacy":
            for gg, m in zip(("ffn_gate", "ffn_up", "ffn_down"), mats):
                for e in range(f.num_experts):
                    _add(writer, f"{blk}.{gg}.{e}.weight", m[e], expert_type)
        elif layout == "gate_up":
            _add(writer, f"{blk}.ffn_gate_up_exps.weight", np.concatenate(mats[:2], axis=1), expert_type)
            _add(writer, f"{blk}.ffn_down_exps.weight", mats[2], expert_type)
        else:
            for gg, m in zip(("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"), mats):
                _add(writer, f"{blk}.{gg}.weight", m, expert_type)
        if f.shared_width:
            for part, gg in zip(names.shared, ("ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp")):
                _add(writer, f"{blk}.{gg}.weight", w(part.format(l=layer)), expert_type)
            _add(writer, f"{blk}.ffn_gate_inp_shexp.weight", w(names.shared_gate.format(l=layer))[0], Q.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def config_of(src: Path) -> dict:
    """The checkpoint's config.json."""
    return json.loads((Path(src) / "config.json").read_text())
