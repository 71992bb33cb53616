"""The family table: the one place a new model family is added.

Each family turns a Hugging Face config dict into a ModelSpec and names its tensors.
Tensor names are the Hugging Face ones, so HF directories load as they are and other
loaders (GGUF) translate into them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

from edge_prism.errors import CorruptCheckpointError, UnsupportedModelError
from edge_prism.spec import FFNSpec, MLASpec, ModelSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FamilyNames:
    """Where a family keeps its FFN tensors (``{l}`` layer, ``{e}`` expert)."""

    router: str  # "" for dense-only families
    expert: tuple[str, str, str]  # gate, up, down (routed experts)
    dense: tuple[str, str, str]  # gate, up, down (a dense FFN layer)
    shared: tuple[str, str, str] | None = None
    shared_gate: str | None = None


@dataclass(frozen=True)
class Family:
    """How to read one model family."""

    name: str
    names: FamilyNames
    ffn: Callable[[dict, int], FFNSpec]
    qk_norm: str = "none"
    default_bias: bool = False
    bias_key: str = "attention_bias"
    attention: str = "gqa"  # "gqa" | "mla" (multi-head latent attention, see spec.MLASpec)
    check: Callable[[dict, str], None] | None = None  # refuses what the family cannot run


_MLP = ("model.layers.{l}.mlp.gate_proj.weight", "model.layers.{l}.mlp.up_proj.weight",
        "model.layers.{l}.mlp.down_proj.weight")
_EXPERTS = ("model.layers.{l}.mlp.experts.{e}.gate_proj.weight",
            "model.layers.{l}.mlp.experts.{e}.up_proj.weight",
            "model.layers.{l}.mlp.experts.{e}.down_proj.weight")


def _dense(cfg: dict, layer: int) -> FFNSpec:
    return FFNSpec(num_experts=1, top_k=1, width=int(cfg["intermediate_size"]), routed=False)


def _qwen_ffn(cfg: dict, layer: int) -> FFNSpec:
    # Qwen MoE configs may interleave dense layers: mlp_only_layers and decoder_sparse_step.
    experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0)
    step = int(cfg.get("decoder_sparse_step") or 1)
    if layer in (cfg.get("mlp_only_layers") or []) or experts == 0 or (layer + 1) % step != 0:
        return _dense(cfg, layer)
    return FFNSpec(num_experts=experts, top_k=int(cfg["num_experts_per_tok"]),
                   width=int(cfg["moe_intermediate_size"]), routed=True,
                   norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
                   shared_width=int(cfg.get("shared_expert_intermediate_size") or 0))


def _mixtral_ffn(cfg: dict, layer: int) -> FFNSpec:
    return FFNSpec(num_experts=int(cfg["num_local_experts"]), top_k=int(cfg["num_experts_per_tok"]),
                   width=int(cfg["intermediate_size"]), routed=True, norm_topk_prob=True)


def _olmoe_ffn(cfg: dict, layer: int) -> FFNSpec:
    return FFNSpec(num_experts=int(cfg["num_experts"]), top_k=int(cfg["num_experts_per_tok"]),
                   width=int(cfg["intermediate_size"]), routed=True,
                   norm_topk_prob=bool(cfg.get("norm_topk_prob", False)))


def _deepseek_ffn(cfg: dict, layer: int) -> FFNSpec:
    # DeepSeek's own code: dense below first_k_dense_replace and where layer % moe_layer_freq
    # != 0 (transformers reads only the former; every DeepSeek-V2 release has freq 1).
    experts = int(cfg.get("n_routed_experts") or 0)
    freq = int(cfg.get("moe_layer_freq") or 1)
    if experts == 0 or layer < int(cfg.get("first_k_dense_replace") or 0) or layer % freq != 0:
        return _dense(cfg, layer)
    width = int(cfg["moe_intermediate_size"])
    grouped = cfg.get("topk_method") == "group_limited_greedy"
    # norm_topk_prob stays False: transformers' deepseek_v2 router never renormalises (it
    # scales by routed_scaling_factor); _deepseek_check says so when a config sets it.
    return FFNSpec(num_experts=experts, top_k=int(cfg["num_experts_per_tok"]), width=width, routed=True,
                   shared_width=int(cfg.get("n_shared_experts") or 0) * width,
                   routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
                   n_group=int(cfg["n_group"]) if grouped else 1,
                   topk_group=int(cfg["topk_group"]) if grouped else 1)


_DEEPSEEK_TOPK = ("greedy", "group_limited_greedy")


def _deepseek_check(cfg: dict, where: str) -> None:
    """What transformers' deepseek_v2 computes, and nothing else (a DeepSeek-V3 config, say)."""
    def refuse(what: str) -> UnsupportedModelError:
        return UnsupportedModelError(f"{where}: {what} is not supported for model_type 'deepseek_v2'")

    method = cfg.get("topk_method") or "greedy"
    if method not in _DEEPSEEK_TOPK:
        raise refuse(f"topk_method '{method}' (supported: {', '.join(_DEEPSEEK_TOPK)}; "
                     "'noaux_tc' is DeepSeek-V3's router)")
    scoring = cfg.get("scoring_func") or "softmax"
    if scoring != "softmax":
        raise refuse(f"scoring_func '{scoring}' (deepseek_v2 routes by softmax only)")
    if cfg.get("mlp_bias"):
        raise refuse("mlp_bias true (expert weights without biases only)")
    if cfg.get("norm_topk_prob"):
        log.warning("%s: norm_topk_prob is true, but deepseek_v2 routing (as transformers computes it) "
                    "does not renormalise the top-k weights; neither does edge-prism", where)
    rope = int(cfg.get("qk_rope_head_dim", 64))
    if rope % 2:
        raise CorruptCheckpointError(f"{where}: qk_rope_head_dim is {rope}; rotary dimensions come in "
                                     "pairs, so it must be even; fix config.json")
    experts = int(cfg.get("n_routed_experts") or 0)
    if method == "group_limited_greedy" and experts:
        groups, top = cfg.get("n_group"), cfg.get("topk_group")
        if not groups or not top or experts % int(groups) or int(top) > int(groups):
            raise CorruptCheckpointError(
                f"{where}: topk_method 'group_limited_greedy' needs n_group dividing n_routed_experts "
                f"({experts}) and 1 <= topk_group <= n_group; got n_group={groups}, topk_group={top}; "
                "fix config.json")


def _mla_spec(cfg: dict, scaling: tuple) -> MLASpec:
    nope, rope = int(cfg.get("qk_nope_head_dim", 128)), int(cfg.get("qk_rope_head_dim", 64))
    scale = (nope + rope) ** -0.5
    # transformers (yarn_apply_mscale): a non-default rope type with mscale_all_dim set
    # sharpens the softmax by mscale(factor, mscale_all_dim)^2 (DeepSeek-V2-Lite: yarn, factor
    # 40, mscale_all_dim 0.707 -> x1.59).
    sc = dict(scaling)
    src = {**(cfg.get("rope_scaling") or {}), **(cfg.get("rope_parameters") or {})}
    if sc and src.get("mscale_all_dim"):
        scale *= _yarn_mscale(float(sc["factor"]), float(src["mscale_all_dim"])) ** 2
    return MLASpec(q_lora_rank=int(cfg.get("q_lora_rank") or 0), kv_lora_rank=int(cfg.get("kv_lora_rank", 512)),
                   qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=int(cfg.get("v_head_dim", 128)),
                   softmax_scale=scale)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


_QWEN_ROUTED = FamilyNames(router="model.layers.{l}.mlp.gate.weight", expert=_EXPERTS, dense=_MLP)

FAMILIES: dict[str, Family] = {
    "llama": Family("llama", FamilyNames(router="", expert=_MLP, dense=_MLP), _dense),
    "qwen2_moe": Family(
        "qwen2_moe",
        FamilyNames(router="model.layers.{l}.mlp.gate.weight", expert=_EXPERTS, dense=_MLP,
                    shared=("model.layers.{l}.mlp.shared_expert.gate_proj.weight",
                            "model.layers.{l}.mlp.shared_expert.up_proj.weight",
                            "model.layers.{l}.mlp.shared_expert.down_proj.weight"),
                    shared_gate="model.layers.{l}.mlp.shared_expert_gate.weight"),
        _qwen_ffn, default_bias=True, bias_key="qkv_bias"),
    "qwen3_moe": Family("qwen3_moe", _QWEN_ROUTED, _qwen_ffn, qk_norm="head"),
    "mixtral": Family(
        "mixtral",
        FamilyNames(router="model.layers.{l}.block_sparse_moe.gate.weight",
                    expert=("model.layers.{l}.block_sparse_moe.experts.{e}.w1.weight",
                            "model.layers.{l}.block_sparse_moe.experts.{e}.w3.weight",
                            "model.layers.{l}.block_sparse_moe.experts.{e}.w2.weight"),
                    dense=_MLP),
        _mixtral_ffn),
    "olmoe": Family("olmoe", _QWEN_ROUTED, _olmoe_ffn, qk_norm="full"),
    "deepseek_v2": Family(
        "deepseek_v2",
        FamilyNames(router="model.layers.{l}.mlp.gate.weight", expert=_EXPERTS, dense=_MLP,
                    shared=("model.layers.{l}.mlp.shared_experts.gate_proj.weight",
                            "model.layers.{l}.mlp.shared_experts.up_proj.weight",
                            "model.layers.{l}.mlp.shared_experts.down_proj.weight")),
        _deepseek_ffn, attention="mla", check=_deepseek_check),
}


def get_family(model_type: str, *, where: str) -> Family:
    """The family for ``model_type``, or a clear error naming the file it came from."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"{where}: model_type '{model_type}' is not supported; "
            f"supported families: {', '.join(sorted(FAMILIES))}") from None


def _rope(cfg: dict, where: str, *, yarn: bool = False) -> tuple[float, tuple]:
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind == "default":
        return theta, ()
    if kind == "linear":
        factor = float(params.get("factor", scaling.get("factor", 1.0)))
        return theta, (("rope_type", "linear"), ("factor", factor))
    if kind == "llama3":
        src = params if "factor" in params else scaling
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        return theta, (("rope_type", "llama3"),) + tuple((k, float(src[k])) for k in keys)
    if kind == "yarn" and yarn:
        return theta, _yarn(cfg, {**scaling, **params})
    raise UnsupportedModelError(f"{where}: rope scaling '{kind}' is not supported; "
                                f"supported: default, linear, llama3{', yarn' if yarn else ''}")


def _yarn(cfg: dict, src: dict) -> tuple:
    """YaRN parameters as transformers resolves them (_compute_yarn_parameters)."""
    original = float(cfg.get("original_max_position_embeddings") or src.get("original_max_position_embeddings")
                     or cfg.get("max_position_embeddings", 2048))
    factor = src.get("factor")
    factor = float(cfg.get("max_position_embeddings", 2048)) / original if factor is None else float(factor)
    attention = src.get("attention_factor")
    if attention is None:
        mscale, mscale_all = src.get("mscale"), src.get("mscale_all_dim")
        attention = (_yarn_mscale(factor, float(mscale)) / _yarn_mscale(factor, float(mscale_all))
                     if mscale and mscale_all else _yarn_mscale(factor))
    return (("rope_type", "yarn"), ("factor", factor), ("original_max_position_embeddings", original),
            ("beta_fast", float(src.get("beta_fast") or 32)), ("beta_slow", float(src.get("beta_slow") or 1)),
            ("truncate", 1.0 if src.get("truncate", True) else 0.0), ("attention_factor", float(attention)))


def _eos_ids(cfg: dict) -> tuple[int, ...]:
    eos = cfg.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))


_POSITIVE = ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "intermediate_size",
             "num_key_value_heads", "head_dim", "max_position_embeddings", "moe_intermediate_size",
             "num_experts_per_tok", "num_local_experts", "decoder_sparse_step",
             "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "moe_layer_freq",
             "n_group", "topk_group")
_NON_NEGATIVE = ("num_experts", "shared_expert_intermediate_size", "q_lora_rank", "n_routed_experts",
                 "n_shared_experts", "first_k_dense_replace")
_NUMBERS = ("rms_norm_eps", "rope_theta", "routed_scaling_factor")
_REQUIRED = ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size")


def _check_types(cfg: dict, where: str) -> None:
    """Refuse wrongly typed config values with the key's name, before any arithmetic."""
    def bad(key: str, want: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{where}: '{key}' is {cfg[key]!r}, expected {want}; "
                                      "fix config.json or use the one that came with the weights")

    for key in _POSITIVE + _NON_NEGATIVE:
        v = cfg.get(key)
        if v is None and key in _REQUIRED and key in cfg:
            raise bad(key, "a positive whole number")
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < (1 if key in _POSITIVE else 0):
            raise bad(key, "a positive whole number" if key in _POSITIVE else "a whole number >= 0")
    for key in _NUMBERS:
        v = cfg.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise bad(key, "a number")
    for key in ("bos_token_id", "eos_token_id"):
        v = cfg.get(key)
        items = v if isinstance(v, list) else [v]
        if v is not None and any(isinstance(i, bool) or not isinstance(i, int) for i in items):
            raise bad(key, "a token id or a list of token ids")


def build_spec(cfg: dict, *, where: str) -> ModelSpec:
    """A ModelSpec from a Hugging Face config dict; ``where`` names the file for errors."""
    family = get_family(str(cfg.get("model_type")), where=where)
    _check_types(cfg, where)
    try:
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        layers = int(cfg["num_hidden_layers"])
        if family.check is not None:
            family.check(cfg, where)
        mla = family.attention == "mla"
        theta, scaling = _rope(cfg, where, yarn=mla)
        mla_spec = _mla_spec(cfg, scaling) if mla else None
        # MLA: config.json's head_dim is the rotary width (transformers sets it so); the spec's
        # is the value width, the one o_proj takes per head.
        head_dim = mla_spec.v_head_dim if mla else int(cfg.get("head_dim") or hidden // heads)
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"{where}: hidden_act '{act}' is not supported; only silu")
        bos = cfg.get("bos_token_id")
        return ModelSpec(
            family=family.name,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=heads if mla else int(cfg.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            max_position=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get(family.bias_key, family.default_bias)),
            qk_norm=family.qk_norm,
            clip_qkv=cfg.get("clip_qkv"),
            ffn=tuple(family.ffn(cfg, layer) for layer in range(layers)),
            rope_scaling=scaling,
            bos_token_id=None if bos is None else int(bos),
            eos_token_ids=_eos_ids(cfg),
            attention=family.attention,
            mla=mla_spec,
        )
    except KeyError as missing:
        raise UnsupportedModelError(f"{where}: config has no {missing}; "
                                    "is this a complete Hugging Face config.json?") from None
    except (TypeError, ValueError) as e:  # a nested value (rope_scaling, mlp_only_layers...) of the wrong type
        raise CorruptCheckpointError(f"{where}: a config value has the wrong type ({e}); "
                                     "fix config.json or use the one that came with the weights") from None
