"""The family table: the one place a new model family is added.

Each family turns a Hugging Face config dict into a ModelSpec and names its tensors.
Tensor names are the Hugging Face ones, so HF directories load as they are and other
loaders (GGUF) translate into them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from edge_prism.errors import CorruptCheckpointError, UnsupportedModelError
from edge_prism.spec import FFNSpec, ModelSpec


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
}


def get_family(model_type: str, *, where: str) -> Family:
    """The family for ``model_type``, or a clear error naming the file it came from."""
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"{where}: model_type '{model_type}' is not supported; "
            f"supported families: {', '.join(sorted(FAMILIES))}") from None


def _rope(cfg: dict, where: str) -> tuple[float, tuple]:
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
    raise UnsupportedModelError(f"{where}: rope scaling '{kind}' is not supported; "
                                "supported: default, linear, llama3")


def _eos_ids(cfg: dict) -> tuple[int, ...]:
    eos = cfg.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))


_POSITIVE = ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size", "intermediate_size",
             "num_key_value_heads", "head_dim", "max_position_embeddings", "moe_intermediate_size",
             "num_experts_per_tok", "num_local_experts", "decoder_sparse_step")
_NON_NEGATIVE = ("num_experts", "shared_expert_intermediate_size")
_NUMBERS = ("rms_norm_eps", "rope_theta")
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
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        theta, scaling = _rope(cfg, where)
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
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
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
        )
    except KeyError as missing:
        raise UnsupportedModelError(f"{where}: config has no {missing}; "
                                    "is this a complete Hugging Face config.json?") from None
    except (TypeError, ValueError) as e:  # a nested value (rope_scaling, mlp_only_layers...) of the wrong type
        raise CorruptCheckpointError(f"{where}: a config value has the wrong type ({e}); "
                                     "fix config.json or use the one that came with the weights") from None
