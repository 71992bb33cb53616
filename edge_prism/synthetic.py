"""Synthetic models: real MoE shapes with seeded random weights, so no download is needed.

preset name | config.json -> ModelSpec (optionally fewer layers) -> [always-resident weights:
random, made on the device] + [sub-expert blocks: random, made in a host MemoryTier, never a
file] -> ResidentStore | BudgetedStore -> Engine (labelled synthetic)

Weights are random (std 0.02, RMSNorm weights 1), so every figure measured on such a model
says something about speed and memory traffic at the real shapes, nothing about quality:
it is labelled synthetic wherever it is printed or written.

Routing skew: expert e of every layer gets router bias ``-skew * ln(1 + e)``, so the routing
probability of expert e is scaled by ``(1 + e) ** -skew`` (Zipf-like, expert 0 hottest).
``skew=0`` leaves the random routers uniform. The selection-frequency profile that the
budgeted store pins by follows the same law.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from edge_prism.api import RuntimeConfig, resolve_budget
from edge_prism.build import ResidentStore
from edge_prism.engine import Engine
from edge_prism.errors import BudgetError, ConfigError
from edge_prism.families import build_spec
from edge_prism.kernels import FloatEmbedding, FloatLinear, FloatUnits
from edge_prism.model import LayerWeights, Transformer, Weights, tied_head, transposed
from edge_prism.prefetch import Predictor, Prefetcher
from edge_prism.refactor.partition import default_sub_experts
from edge_prism.runtime.device import pinned_empty, resolve_device
from edge_prism.runtime.sizes import format_size
from edge_prism.runtime.store import BudgetedStore, LayerBlocks, minimum_budget
from edge_prism.runtime.transfer import MemoryTier
from edge_prism.select import LayerGate, check_operating_point, max_operating_point, quotas
from edge_prism.spec import ModelSpec

log = logging.getLogger(__name__)

STD = 0.02  # weight scale: activations stay in a sane range at any width

# Hugging Face style configs with the real shapes (no eos: a sweep decodes every token asked for).
PRESETS: dict[str, dict] = {
    "olmoe-1b-7b": dict(
        model_type="olmoe", vocab_size=50304, hidden_size=2048, intermediate_size=1024,
        num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16, head_dim=128,
        num_experts=64, num_experts_per_tok=8, norm_topk_prob=False, rms_norm_eps=1e-5,
        rope_theta=10000.0, max_position_embeddings=4096, tie_word_embeddings=False,
        clip_qkv=None, hidden_act="silu"),
    "qwen3-30b-a3b": dict(
        model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
        moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], rms_norm_eps=1e-6,
        rope_theta=1000000.0, max_position_embeddings=40960, tie_word_embeddings=False,
        hidden_act="silu"),
}


@dataclass(frozen=True)
class SyntheticConfig:
    """Which synthetic model to build: a preset name or a config.json path, and its knobs."""

    model: str  # a PRESETS key or a path to a Hugging Face config.json
    layers: int | None = None  # None: the config's layer count; fewer runs the real shapes on less memory
    sub_experts: int | None = None  # None: partition.default_sub_experts (8 per routed expert, 24 or 16 per dense FFN)
    skew: float = 0.0  # 0: uniform routing; larger: Zipf-like concentration on few experts
    seed: int = 0
    dtype: str | None = None  # None: float32 on CPU, bfloat16/float16 on CUDA

    def __post_init__(self) -> None:
        if self.layers is not None and self.layers < 1:
            raise ConfigError(f"invalid --layers {self.layers}: use 1 or more")
        if self.sub_experts is not None and self.sub_experts < 1:
            raise ConfigError(f"invalid --sub-experts {self.sub_experts}: use 1 or more")
        if not (self.skew >= 0 and math.isfinite(self.skew)):
            raise ConfigError(f"invalid --skew {self.skew}: use 0 (uniform) or a larger number")

    @property
    def name(self) -> str:
        """The label that tables, files and plots carry: model, then layers and skew when set."""
        path = Path(self.model)
        base = self.model if self.model in PRESETS else (
            (path.name if path.is_dir() else path.parent.name) or path.stem)
        return base + (f"-L{self.layers}" if self.layers else "") + (f"-skew{self.skew:g}" if self.skew else "")


def synthetic_config_dict(model: str, *, layers: int | None = None) -> dict:
    """The Hugging Face config dict of a preset or a config.json file, with ``layers`` applied."""
    if model in PRESETS:
        cfg = dict(PRESETS[model])
    else:
        path = Path(model)
        if path.is_dir():
            path = path / "config.json"
        try:
            cfg = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"invalid synthetic model '{model}': not a preset "
                              f"({', '.join(PRESETS)}) nor a readable config.json ({e})") from None
        if not isinstance(cfg, dict):
            raise ConfigError(f"{path}: not a Hugging Face config (a JSON object)")
        cfg.pop("eos_token_id", None)  # a sweep decodes every token it asks for
    if layers is not None:
        cfg["num_hidden_layers"] = layers
        if cfg.get("mlp_only_layers"):
            cfg["mlp_only_layers"] = [i for i in cfg["mlp_only_layers"] if i < layers]
    return cfg


def synthetic_parts(spec: ModelSpec, sub_experts: int | None) -> list[int]:
    """Sub-experts per expert of every layer, each a whole number of neurons."""
    out = []
    for layer, f in enumerate(spec.ffn):
        s = sub_experts or default_sub_experts(f.width, f.routed)
        if f.width % s:
            raise ConfigError(f"invalid --sub-experts {s}: layer {layer}'s experts have {f.width} neurons, "
                              f"which do not split into {s} equal groups; choose a divisor of {f.width}")
        out.append(s)
    return out


class SyntheticModel:
    """One synthetic model's weights, shared by every engine (store, budget, K) built over it.

    The always-resident weights are made once on ``device``; the sub-expert blocks are made
    once per block shape in host memory (page-locked on CUDA) on first use, in unit order
    (unit e*S+s), expert 0 the hottest. Same config and seed give the same weights.
    """

    def __init__(self, cfg: SyntheticConfig, *, device: torch.device):
        self.cfg, self.device = cfg, torch.device(device)
        self.dtype = RuntimeConfig(dtype=cfg.dtype).torch_dtype(self.device)
        where = f"synthetic model '{cfg.model}'"
        self.spec = build_spec(synthetic_config_dict(cfg.model, layers=cfg.layers), where=where)
        self.parts = synthetic_parts(self.spec, cfg.sub_experts)
        self.name = cfg.name
        self.source = Path(f"synthetic:{self.name}")
        self.weights = self._resident_weights()
        self.frequency = [self._frequency(f, s) for f, s in zip(self.spec.ffn, self.parts)]
        self._host: dict[tuple, torch.Tensor] = {}  # block shape -> [units of its layers, 3, n, D]
        self._host_start: dict[int, int] = {}  # layer -> first block index in its shape's tensor
        self._gates: list | None = None

    # -- shapes ------------------------------------------------------------------------------
    def block_shape(self, layer: int) -> tuple[int, int, int]:
        """(3, n, D) of one sub-expert block of ``layer``."""
        return (3, self.spec.ffn[layer].width // self.parts[layer], self.spec.hidden_size)

    def units(self, layer: int) -> int:
        """Sub-experts (units) of ``layer``: E*S."""
        return self.spec.ffn[layer].num_experts * self.parts[layer]

    def full_operating_point(self) -> int:
        """Full K (every sub-expert of the routed experts: the exact model)."""
        return max_operating_point(self.spec, self.parts)

    # -- weights -----------------------------------------------------------------------------
    def _randn(self, gen: torch.Generator, *shape: int) -> torch.Tensor:
        t = torch.empty(shape, device=self.device, dtype=self.dtype)
        return t.normal_(0.0, STD, generator=gen)

    def _resident_weights(self) -> Weights:
        s, dev = self.spec, self.device
        gen = torch.Generator(device=dev).manual_seed(self.cfg.seed)
        D, hd, H, Hk = s.hidden_size, s.head_dim, s.num_heads, s.num_kv_heads

        def ones(n: int) -> torch.Tensor:
            return torch.ones(n, dtype=self.dtype, device=dev)

        embed = self._randn(gen, s.vocab_size, D)
        if s.tie_word_embeddings:
            embed, lm_head = tied_head(embed)
        else:
            embed, lm_head = FloatEmbedding(embed), FloatLinear(transposed(self._randn(gen, s.vocab_size, D)))
        norm_width = {"none": None, "head": (hd, hd), "full": (H * hd, Hk * hd)}[s.qk_norm]
        layers = []
        for f in s.ffn:
            Ws = f.shared_width
            # Keyword arguments are evaluated in order: the generator's draws follow this order.
            layers.append(LayerWeights(
                attn_norm=ones(D), ffn_norm=ones(D),
                wqkv=FloatLinear(transposed(self._randn(gen, (H + 2 * Hk) * hd, D))),
                bqkv=self._randn(gen, (H + 2 * Hk) * hd) if s.attention_bias else None,
                wo=FloatLinear(transposed(self._randn(gen, D, H * hd))),
                q_norm=ones(norm_width[0]) if norm_width else None,
                k_norm=ones(norm_width[1]) if norm_width else None,
                router=self._randn(gen, f.num_experts, D) if f.routed else None,
                router_bias=self._bias(f),  # the routing skew
                shared_gu=FloatLinear(transposed(self._randn(gen, 2 * Ws, D))) if Ws else None,
                shared_down=FloatLinear(transposed(self._randn(gen, D, Ws))) if Ws else None,
                shared_gate=self._randn(gen, 1, D) if Ws else None))
        return Weights(embed=embed, norm=ones(D), lm_head=lm_head, layers=layers)

    def _bias(self, f) -> torch.Tensor | None:
        # Router bias -skew * ln(1 + e): expert e's routing probability scaled by (1 + e) ** -skew.
        if not f.routed or self.cfg.skew == 0:
            return None
        rank = torch.arange(f.num_experts, dtype=torch.float32)
        return (-self.cfg.skew * torch.log1p(rank)).to(device=self.device, dtype=self.dtype)  # [E]

    def _frequency(self, f, parts: int) -> list[float]:
        # The share of routing each expert gets under the bias alone, for every one of its parts.
        rank = torch.arange(f.num_experts, dtype=torch.float64)
        p = (1 + rank) ** -self.cfg.skew
        p = (p / p.sum()).repeat_interleave(parts)  # [E*S]
        return p.tolist()

    def host_blocks(self, layer: int) -> torch.Tensor:
        """``layer``'s sub-expert blocks in host memory, unit order: [E*S, 3, n, D]."""
        shape = self.block_shape(layer)
        if shape not in self._host:
            self._make_host(shape)
        start = self._host_start[layer]
        return self._host[shape][start:start + self.units(layer)]

    def _make_host(self, shape: tuple) -> None:
        layers = [layer for layer in range(self.spec.num_layers) if self.block_shape(layer) == shape]
        total = sum(self.units(layer) for layer in layers)
        full = (total, *shape)
        cuda = self.device.type == "cuda"
        blocks = pinned_empty(full, self.dtype) if cuda else torch.empty(full, dtype=self.dtype)
        start = 0
        for layer in layers:
            self._host_start[layer] = start
            # One generator per layer: a layer's blocks do not depend on the other layers.
            gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + 1 + layer)
            blocks[start:start + self.units(layer)].normal_(0.0, STD, generator=gen)  # [E*S, 3, n, D]
            start += self.units(layer)
        self._host[shape] = blocks

    def gates(self) -> list:
        """Random linear sub-expert gates (for K below full; full K needs none)."""
        if self._gates is None:
            gen = torch.Generator(device=self.device).manual_seed(self.cfg.seed + 7)
            self._gates = [LayerGate("linear", self._randn(gen, f.num_experts, self.spec.hidden_size, s),
                                     torch.zeros(f.num_experts, s, dtype=self.dtype, device=self.device))
                           for f, s in zip(self.spec.ffn, self.parts)]
        return self._gates

    # -- stores ------------------------------------------------------------------------------
    def layer_blocks(self, k: int) -> list[LayerBlocks]:
        """LayerBlocks of every layer at operating point ``k`` (offsets: block index * bytes)."""
        out, start = [], {}
        for layer, (f, S) in enumerate(zip(self.spec.ffn, self.parts)):
            shape = self.block_shape(layer)
            nbytes = math.prod(shape) * self.dtype.itemsize
            if f.routed:
                most = sum(quotas(k, f.top_k, S))
            else:
                most = S if self.spec.is_moe else min(k, S)
            first = start.get(shape, 0)
            start[shape] = first + self.units(layer)
            out.append(LayerBlocks(layer=layer, parts=S, units=self.units(layer), block_shape=shape,
                                   dtype=self.dtype, offset=first * nbytes, order=range(self.units(layer)),
                                   frequency=self.frequency[layer], max_selection=most))
        return out

    def tiers(self):
        """A TierFactory of host MemoryTiers over the synthetic blocks (pinned on CUDA)."""
        def make(group: list, offsets: list[int], nbytes: int) -> MemoryTier:
            shape = self.block_shape(group[0].layer)
            for lb in group:
                self.host_blocks(lb.layer)  # made on first use
            blocks = self._host[shape]
            index = torch.tensor([o // nbytes for o in offsets], dtype=torch.long)
            if index.numel() == blocks.shape[0] and bool((index == torch.arange(index.numel())).all()):
                return MemoryTier(blocks)  # the usual case: every block of the shape, in order
            return MemoryTier(blocks.index_select(0, index))

        return make

    def resident_store(self) -> ResidentStore:
        """Every sub-expert on the device (on the CPU: views of the host blocks, no copy)."""
        layers = range(self.spec.num_layers)
        return ResidentStore([self.host_blocks(layer).to(self.device) for layer in layers],
                             [self.units(layer) for layer in layers])

    def budget_bytes(self, memory_budget: str | int, k: int) -> int:
        """Bytes a ``memory_budget`` ('25%', '512MiB', a count, 'auto') stands for here."""
        return resolve_budget(memory_budget, self.layer_blocks(k), device=self.device,
                              resident_bytes=self.weights.nbytes())

    def budgeted_store(self, memory_budget: str | int, k: int, *, policy: str = "lru") -> BudgetedStore:
        """A BudgetedStore holding ``memory_budget`` of blocks."""
        layers = self.layer_blocks(k)
        nbytes = self.budget_bytes(memory_budget, k)
        m = minimum_budget(layers)
        if nbytes < m:
            raise BudgetError(f"memory budget '{memory_budget}' is {format_size(nbytes)}, below what one "
                              f"layer's largest selection needs: minimum is {format_size(m)} ({m} bytes); "
                              "raise --memory-budget or lower --operating-point")
        return BudgetedStore(self.tiers(), layers, budget_bytes=nbytes, device=self.device, policy=policy)

    # -- engines -----------------------------------------------------------------------------
    def engine(self, store, *, operating_point: int | None = None, prefetch: bool = False) -> Engine:
        """An Engine over these weights and ``store`` at ``operating_point`` (None: full K).

        ``prefetch`` (a budgeted store only): the activation-predictor prefetcher, without
        the fitted drift corrections a prism checkpoint carries.
        """
        full = self.full_operating_point()
        k = check_operating_point(operating_point or full, self.spec, self.parts)
        model = Transformer(self.spec, self.weights, store, parts=self.parts,
                            kernels=[FloatUnits() for _ in self.parts], dtype=self.dtype, device=self.device,
                            gates=None if k == full else self.gates(), operating_point=k)  # full K reads no gates
        if prefetch and store.streams:
            model.set_prefetcher(Prefetcher(Predictor(model), store))
        # Every figure from a synthetic engine must say so.
        return Engine(model, None, source=self.source, max_context=self.spec.max_position, synthetic=True)


def build_synthetic(name_or_config: str | Path, *, device: str = "auto", dtype: str | None = None,
                    memory_budget: str | int | None = None, policy: str = "lru", layers: int | None = None,
                    sub_experts: int | None = None, skew: float = 0.0, seed: int = 0,
                    operating_point: int | None = None, prefetch: bool = False) -> Engine:
    """An Engine of a synthetic model at real shapes: random weights, no download, no files.

    ``name_or_config``: 'olmoe-1b-7b', 'qwen3-30b-a3b' or a Hugging Face config.json of any
    supported family. ``layers`` runs only that many layers of the real shape. Sub-expert
    blocks live in host memory and stream into ``memory_budget`` of device slots (None: all
    resident; ``prefetch``: predict and load later layers' sub-experts ahead of use). Below
    full ``operating_point`` the sub-expert gates are random linear gates.
    The engine has no tokenizer: drive it with token ids (generate_ids, logits). Its
    ``synthetic`` attribute is True.
    """
    cfg = SyntheticConfig(model=str(name_or_config), layers=layers, sub_experts=sub_experts, skew=skew,
                          seed=seed, dtype=dtype)
    sm = SyntheticModel(cfg, device=resolve_device(device))
    k = operating_point or sm.full_operating_point()
    if memory_budget is None:
        return sm.engine(sm.resident_store(), operating_point=k)
    store = sm.budgeted_store(memory_budget, k, policy=policy)
    return sm.engine(store, operating_point=k, prefetch=prefetch)


def random_prompt(spec: ModelSpec, tokens: int, *, seed: int = 0) -> list[int]:
    """Seeded random token ids: the prompt of a synthetic model, which has no tokenizer."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, spec.vocab_size, (tokens,), generator=gen).tolist()


__all__ = ["PRESETS", "SyntheticConfig", "SyntheticModel", "build_synthetic", "random_prompt",
           "synthetic_config_dict", "synthetic_parts"]
