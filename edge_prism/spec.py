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
    # Always-on shared expert(s), 0: none. qwen2_moe gates it with a sigmoid; deepseek_v2's
    # (n_shared_experts x moe_intermediate_size wide) has no gate (FamilyNames.shared_gate).
    shared_width: int = 0
    routed_scaling_factor: float = 1.0  # deepseek_v2: routed experts' weights times this
    # Group-limited routing (deepseek_v2 'group_limited_greedy'): the experts are n_group
    # equal groups; a token's top-k is taken within its topk_group groups of highest best score.
    # n_group == topk_group (the default 1, 1) is plain top-k.
    n_group: int = 1
    topk_group: int = 1


@dataclass(frozen=True)
class MLASpec:
    """Multi-head latent attention (DeepSeek-V2): each position caches one latent vector
    (kv_lora_rank) and one rotary key (qk_rope_head_dim) shared by all heads; per-head keys
    and values are expanded from the latent by kv_b_proj (or absorbed into the query and the
    output at decode)."""

    q_lora_rank: int  # 0: q_proj straight from the hidden state (DeepSeek-V2-Lite)
    kv_lora_rank: int
    qk_nope_head_dim: int  # per-head key part without rotary embedding
    qk_rope_head_dim: int  # rotary part (pairwise, interleaved layout), shared key
    v_head_dim: int
    softmax_scale: float  # (nope + rope)^-0.5, times yarn's mscale^2 where the config sets mscale_all_dim

    @property
    def qk_head_dim(self) -> int:
        """Query and key width per head."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def cache_width(self) -> int:
        """Values cached per position per layer (latent + rotary key)."""
        return self.kv_lora_rank + self.qk_rope_head_dim


@dataclass(frozen=True)
class ModelSpec:
    """Everything the engine needs to know about a model's architecture."""

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int  # per-head q/k/v width; with MLA the value width (mla holds the others)
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
    attention: str = "gqa"  # "gqa" (grouped-query, incl. MHA) | "mla" (DeepSeek-V2: see mla)
    mla: MLASpec | None = None

    @property
    def is_moe(self) -> bool:
        """True when any layer routes tokens over several experts."""
        return any(f.routed for f in self.ffn)

    def expert_param_bytes(self, bytes_per_value: int) -> int:
        """Bytes of all experts' gate/up/down weights."""
        return sum(3 * f.num_experts * f.width * self.hidden_size for f in self.ffn) * bytes_per_value
