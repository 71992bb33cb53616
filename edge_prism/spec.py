"""ModelSpec: the shapes and switches of one decoder-only model, built once from a config."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FFNSpec:
    """One decoder layer's feed-forward block, seen as experts of equal width.

    A dense FFN is one expert with ``top_k=1`` and no router.
    """

    num_experts: int
    top_k: int
    width: int  # intermediate neurons per expert
    routed: bool
    norm_topk_prob: bool = False
    shared_width: int = 0  # qwen2_moe's always-on shared expert (0: none)


@dataclass(frozen=True)
class ModelSpec:
    """Everything the engine needs to know about a model's architecture."""

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position: int
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: str  # "none" | "head" (qwen3_moe: per head) | "full" (olmoe: over all heads)
    clip_qkv: float | None
    ffn: tuple[FFNSpec, ...]
    rope_scaling: tuple[tuple[str, float | str], ...] = ()
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def is_moe(self) -> bool:
        """True when any layer routes tokens over several experts."""
        return any(f.routed for f in self.ffn)

    def expert_param_bytes(self, bytes_per_value: int) -> int:
        """Bytes of all experts' gate/up/down weights."""
        return sum(3 * f.num_experts * f.width * self.hidden_size for f in self.ffn) * bytes_per_value
