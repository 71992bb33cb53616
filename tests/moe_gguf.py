"""Write a Hugging Face checkpoint directory as a GGUF file the way llama.cpp's converter
(convert_hf_to_gguf.py) lays it out, for tests that must run without the converter: expert
tensors merged into one [E, rows, cols] tensor per projection (or kept per expert, the
older layout, or gate and up merged), q/k rows permuted for the llama architecture, shared
experts and their gate, the architecture's metadata keys; deepseek_v2 as ``deepseek2``
(DeepseekV2Model: multi-head latent attention with kv_b_proj split into attn_k_b/attn_v_b,
or whole in older files, yarn's mscale_all_dim as 0.1 x it in yarn_log_multiplier).

The real converter is used where it is available (tests/test_moe_gguf.py); this writer
pins the same conventions so that CI covers the loader without a 15-minute build.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants

from edge_prism.families import FAMILIES, build_spec
from edge_prism.loaders.hf import load_hf_dir

ARCH = {"llama": "llama", "mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "olmoe": "olmoe",
        "deepseek_v2": "deepseek2"}
_ATTN = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
_MLA = {"q_proj": "attn_q", "q_a_proj": "attn_q_a", "q_b_proj": "attn_q_b", "kv_a_proj_with_mqa": "attn_kv_a_mqa",
        "o_proj": "attn_output"}
_MLA_NORMS = {"q_a_layernorm": "attn_q_a_norm", "kv_a_layernorm": "attn_kv_a_norm"}


# Tiny checkpoints for llama.cpp's own converter and llama.cpp (TINY_FAMILIES key, overrides),
# shared by tests/test_moe_gguf.py and scripts/moe_gguf_parity.py.
_V2_YARN = dict(type="yarn", factor=4.0, original_max_position_embeddings=64, mscale=0.8, mscale_all_dim=0.8,
                beta_fast=32, beta_slow=1)
CONVERTED = {
    "mixtral": ("mixtral", {}),
    "qwen2_moe": ("qwen2_moe", {}),
    "qwen3_moe": ("qwen3_moe", {}),
    # llama.cpp's olmoe sizes k_norm by the hidden size: no grouped kv heads (real OLMoE has none).
    "olmoe": ("olmoe", {"num_key_value_heads": 4}),
    # llama.cpp reads a deepseek2 file without q_lora_rank only at 26 or 27 layers (its
    # "lite" test); dn = 32 so that Q8_0 reaches attn_k_b (blocks along dn) as in real files.
    "deepseek_v2": ("deepseek_v2", {"num_hidden_layers": 27, "qk_nope_head_dim": 32, "v_head_dim": 16}),
    # V2's shape; mscale = mscale_all_dim, as every release (a GGUF cannot say mscale).
    "deepseek_v2-grouped": ("deepseek_v2-grouped", {"qk_nope_head_dim": 32, "v_head_dim": 16, "q_lora_rank": 64,
                                                    "rope_scaling": _V2_YARN}),
}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _add(writer: gguf.GGUFWriter, name: str, w: np.ndarray, qtype: Q) -> None:
    if w.ndim < 2 or qtype == Q.F32:
        writer.add_tensor(name, np.ascontiguousarray(w, dtype=np.float32))
        return
    if qtype != Q.F16:
        try:
            data = quants.quantize(np.ascontiguousarray(w, dtype=np.float32), qtype)
        except quants.QuantError:  # rows not a whole number of blocks: the converter writes F16
            qtype = Q.F16
        else:
            writer.add_tensor(name, data, raw_dtype=qtype)
            return
    writer.add_tensor(name, w.astype(np.float16))


def copy_tokenizer(writer: gguf.GGUFWriter, source: Path) -> None:
    """Every ``tokenizer.*`` key of GGUF file ``source`` (the default model's: a tokenizer
    llama.cpp knows) into ``writer``."""
    for key, field in gguf.GGUFReader(source).fields.items():
        if key.startswith("tokenizer."):
            sub = field.types[1] if len(field.types) > 1 else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)


def hf_to_gguf(src: Path, out: Path, *, expert_type: Q = Q.F32, other_type: Q = Q.F32,
               layout: str = "merged", tokenizer_from: Path | None = None, kv_b: str = "split",
               k_b_type: Q | None = None) -> Path:
    """Write checkpoint ``src`` as GGUF ``out``; ``layout``: 'merged' (ffn_*_exps), 'legacy'
    (ffn_gate.E.weight per expert) or 'gate_up' (ffn_gate_up_exps + ffn_down_exps);
    ``tokenizer_from``: a GGUF file whose tokenizer metadata to copy. deepseek_v2 only:
    ``kv_b`` 'split' (attn_k_b + attn_v_b, llama.cpp's converter since its MLA split) or
    'whole' (attn_kv_b, older files); ``k_b_type`` the type of attn_k_b (default other_type)."""
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
    writer.add_layer_norm_rms_eps(spec.rms_norm_eps)
    writer.add_rope_freq_base(spec.rope_theta)
    writer.add_vocab_size(spec.vocab_size)
    if tokenizer_from is not None:
        copy_tokenizer(writer, tokenizer_from)
    if spec.mla is not None:
        _deepseek2(writer, raw, spec, expert_type=expert_type, other_type=other_type, kv_b=kv_b,
                   k_b_type=other_type if k_b_type is None else k_b_type)
        return _finish(writer, out)
    writer.add_head_count_kv(spec.num_kv_heads)
    writer.add_key_length(spec.head_dim)
    writer.add_value_length(spec.head_dim)
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
    return _finish(writer, out)


def _finish(writer: gguf.GGUFWriter, out: Path) -> Path:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def _deepseek2(writer: gguf.GGUFWriter, raw, spec, *, expert_type: Q, other_type: Q, kv_b: str, k_b_type: Q) -> None:
    """The rest of a deepseek2 file, as DeepseekV2Model.set_gguf_parameters / modify_tensors write it."""
    cfg, t, m, names = raw.config, raw.tensors, spec.mla, FAMILIES[spec.family].names
    H, C, R, dn, dv = spec.num_heads, m.kv_lora_rank, m.qk_rope_head_dim, m.qk_nope_head_dim, m.v_head_dim

    def w(name: str) -> np.ndarray:
        return t.get(name).float().numpy()

    moe = [f for f in spec.ffn if f.routed]
    writer.add_feed_forward_length(int(cfg["intermediate_size"]))
    writer.add_expert_count(moe[0].num_experts)
    writer.add_expert_used_count(moe[0].top_k)
    if cfg.get("n_group") is not None:  # written whatever topk_method says, as the converter does
        writer.add_expert_group_count(int(cfg["n_group"]))
    if cfg.get("topk_group") is not None:
        writer.add_expert_group_used_count(int(cfg["topk_group"]))
    writer.add_leading_dense_block_count(int(cfg.get("first_k_dense_replace") or 0))
    if m.q_lora_rank:
        writer.add_q_lora_rank(m.q_lora_rank)
    writer.add_kv_lora_rank(C)
    if kv_b == "split":  # MQA over the latent, real head widths in the *_mla keys
        writer.add_head_count_kv(1)
        writer.add_key_length(C + R)
        writer.add_value_length(C)
        writer.add_key_length_mla(dn + R)
        writer.add_value_length_mla(dv)
    else:
        writer.add_head_count_kv(H)
        writer.add_key_length(dn + R)
        writer.add_value_length(dv)
    writer.add_expert_feed_forward_length(moe[0].width)
    writer.add_expert_shared_count(int(cfg.get("n_shared_experts") or 0))
    if cfg.get("routed_scaling_factor") is not None:
        writer.add_expert_weights_scale(float(cfg["routed_scaling_factor"]))
    if cfg.get("norm_topk_prob"):
        writer.add_expert_weights_norm(True)
    writer.add_rope_dimension_count(R)
    rope = {**(cfg.get("rope_scaling") or {}), **(cfg.get("rope_parameters") or {})}
    if (rope.get("rope_type") or rope.get("type")) == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        for key, add in (("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", writer.add_rope_scaling_yarn_beta_slow)):
            if rope.get(key) is not None:
                add(float(rope[key]))
        if rope.get("mscale_all_dim") is not None:  # [TAG_DEEPSEEK2_YARN_LOG_MUL_FIX]; mscale is not written
            writer.add_rope_scaling_yarn_log_mul(0.1 * float(rope["mscale_all_dim"]))
    _add(writer, "token_embd.weight", w("model.embed_tokens.weight"), other_type)
    _add(writer, "output_norm.weight", w("model.norm.weight"), Q.F32)
    if not spec.tie_word_embeddings:
        _add(writer, "output.weight", w("lm_head.weight"), other_type)
    for layer, f in enumerate(spec.ffn):
        blk, a = f"blk.{layer}", f"model.layers.{layer}.self_attn."
        _add(writer, f"{blk}.attn_norm.weight", w(f"model.layers.{layer}.input_layernorm.weight"), Q.F32)
        _add(writer, f"{blk}.ffn_norm.weight", w(f"model.layers.{layer}.post_attention_layernorm.weight"), Q.F32)
        for hf, gg in _MLA.items():
            if a + hf + ".weight" in t.names():
                _add(writer, f"{blk}.{gg}.weight", w(a + hf + ".weight"), other_type)
        for hf, gg in _MLA_NORMS.items():
            if a + hf + ".weight" in t.names():
                _add(writer, f"{blk}.{gg}.weight", w(a + hf + ".weight"), Q.F32)
        whole = w(a + "kv_b_proj.weight")  # [H*(dn+dv), C]
        if kv_b == "split":
            per_head = whole.reshape(H, dn + dv, C)
            _add(writer, f"{blk}.attn_k_b.weight", per_head[:, :dn].transpose(0, 2, 1), k_b_type)  # [H, C, dn]
            _add(writer, f"{blk}.attn_v_b.weight", per_head[:, dn:], other_type)  # [H, dv, C]
        else:
            _add(writer, f"{blk}.attn_kv_b.weight", whole, other_type)
        if not f.routed:
            for part, gg in zip(names.dense, ("ffn_gate", "ffn_up", "ffn_down")):
                _add(writer, f"{blk}.{gg}.weight", w(part.format(l=layer)), expert_type)
            continue
        _add(writer, f"{blk}.ffn_gate_inp.weight", w(names.router.format(l=layer)), Q.F32)
        for part, gg in zip(names.expert, ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")):
            _add(writer, f"{blk}.{gg}.weight",
                 np.stack([w(part.format(l=layer, e=e)) for e in range(f.num_experts)]), expert_type)
        for part, gg in zip(names.shared, ("ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp")):
            _add(writer, f"{blk}.{gg}.weight", w(part.format(l=layer)), expert_type)


def config_of(src: Path) -> dict:
    """The checkpoint's config.json."""
    return json.loads((Path(src) / "config.json").read_text())


def top2_sum_groups(probs: torch.Tensor, groups: int, keep: int) -> torch.Tensor:
    """llama.cpp's group limit (build_moe_ffn, DeepSeek-V3's rule), a drop-in for
    edge_prism.model._group_limited in diagnostics: groups ranked by the sum of their two best
    scores, not by the best one (DeepSeek-V2, transformers, edge-prism)."""
    T, E = probs.shape
    score = probs.view(T, groups, E // groups).topk(2, dim=-1).values.sum(-1)  # [T, G]
    top = torch.topk(score, keep, dim=-1).indices  # [T, keep]
    kept = torch.zeros_like(score, dtype=torch.bool).scatter_(1, top, True)  # [T, G]
    return probs.masked_fill(~kept.repeat_interleave(E // groups, dim=1), 0.0)  # [T, E]
