"""Shared fixtures: tiny random Hugging Face checkpoints of every family, and the default model.

A tiny checkpoint is built by transformers itself (``AutoConfig.for_model`` ->
``AutoModelForCausalLM.from_config`` -> ``save_pretrained``), so its tensor names and config
keys are exactly what a real download holds; a byte-level BPE tokenizer with ChatML specials
sits beside it. Weights are random (synthetic): these models test exactness, not quality.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
import torch

@pytest.fixture(scope="session", autouse=True)
def _isolated_caches(tmp_path_factory):
    """Cost models and cached prism checkpoints go to temporary directories, never into the
    repository's profiles/ or the user's cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("EDGE_PRISM_PROFILES", str(tmp_path_factory.mktemp("profiles")))
    mp.setenv("EDGE_PRISM_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    mp.undo()


# -- tiny tokenizer ------------------------------------------------------------------------
# Ids 0-255 are the bytes (id == byte value), then the specials, then a few merges.
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 256, 257, 258
_MERGES = (("Ġ", "t"), ("h", "e"), ("Ġt", "he"))  # -> ids 259, 260, 261
TOKENIZER_SIZE = 256 + len(SPECIALS) + len(_MERGES)
TINY_VOCAB = 300  # the models' vocab_size: covers the tokenizer, plus ids no text maps to
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
          " + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\\n' }}{% endif %}")

# -- tiny families -------------------------------------------------------------------------
# D=64 hidden, 4 heads / 2 KV heads (GQA), 2-3 layers; expert widths are multiples of 128 so
# that refactoring can split every expert into 8 or 16 sub-experts of whole neurons.
_COMMON = dict(vocab_size=TINY_VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, bos_token_id=ENDOFTEXT_ID,
               eos_token_id=IM_END_ID, pad_token_id=ENDOFTEXT_ID, tie_word_embeddings=False)
_QWEN2_MOE = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128,
                  shared_expert_intermediate_size=256, intermediate_size=256)
_DEEPSEEK = dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=128, n_shared_experts=2,
                 intermediate_size=256, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=32,
                 qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, topk_method="greedy",
                 # Sharper attention than the 0.02 default: a 1% error in the softmax scale or the
                 # rotary factor then moves the logits ~1% (measured), far above the parity tolerance.
                 initializer_range=0.08,
                 rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=64, mscale=0.707,
                                   mscale_all_dim=0.707, beta_fast=32, beta_slow=1))
TINY_FAMILIES: dict[str, dict] = {
    "llama": dict(model_type="llama", intermediate_size=256),
    "qwen2_moe": dict(model_type="qwen2_moe", **_QWEN2_MOE),
    # A dense FFN between MoE layers, both ways Qwen configs can say it.
    "qwen2_moe-mlp_only_layers": dict(model_type="qwen2_moe", num_hidden_layers=3, mlp_only_layers=[1],
                                      **_QWEN2_MOE),
    "qwen2_moe-sparse_step": dict(model_type="qwen2_moe", num_hidden_layers=3, decoder_sparse_step=2,
                                  **_QWEN2_MOE),
    "qwen3_moe": dict(model_type="qwen3_moe", num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128,
                      intermediate_size=256, norm_topk_prob=True),
    "mixtral": dict(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2, intermediate_size=128),
    "olmoe": dict(model_type="olmoe", num_experts=8, num_experts_per_tok=2, intermediate_size=128),
    # Multi-head latent attention (value width 12 != query/key width 16 + 8), one leading dense
    # layer, two ungated shared experts. DeepSeek-V2-Lite's shape: no low-rank query, greedy
    # routing, yarn with mscale == mscale_all_dim (softmax scale x mscale^2, rotary factor 1).
    "deepseek_v2": dict(model_type="deepseek_v2", num_hidden_layers=3, num_key_value_heads=4, **_DEEPSEEK),
    # DeepSeek-V2's shape: low-rank query, group-limited routing (top 3 experts of the best 2
    # of 4 groups: fewer groups than top-k, so the limit changes selections), routed weights
    # x2.5, yarn with mscale != mscale_all_dim (rotary factor != 1).
    "deepseek_v2-grouped": dict(
        model_type="deepseek_v2", num_hidden_layers=3, num_key_value_heads=4,
        **{**_DEEPSEEK, "q_lora_rank": 48, "topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2,
           "num_experts_per_tok": 3, "routed_scaling_factor": 2.5,
           "rope_scaling": dict(type="yarn", factor=4.0, original_max_position_embeddings=64, mscale=1.0,
                                mscale_all_dim=0.8, beta_fast=32, beta_slow=1)}),
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what ByteLevel pre-tokenizers emit)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def write_tokenizer(path: Path) -> None:
    """A byte-level BPE tokenizer.json and a tokenizer_config.json with a ChatML template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    byte_chars = _bytes_to_unicode()
    vocab = {byte_chars[b]: b for b in range(256)}
    vocab.update({tok: 256 + i for i, tok in enumerate(SPECIALS)})
    for i, (a, b) in enumerate(_MERGES):
        vocab[a + b] = 256 + len(SPECIALS) + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(_MERGES), fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    assert tok.get_vocab_size() == TOKENIZER_SIZE
    tok.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "chat_template": CHATML, "model_max_length": 256}
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=1))


def build_tiny_checkpoint(path: Path, family: str, *, seed: int = 0, tokenizer: bool = True,
                          **overrides) -> Path:
    """Write a random tiny checkpoint of ``family`` (a TINY_FAMILIES key) into ``path``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = {**_COMMON, **TINY_FAMILIES[family], **overrides}
    model_type = kw.pop("model_type")
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **kw)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    if tokenizer:
        write_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Callable[..., Path]:
    """``tiny_checkpoint(family, *, seed=0, tokenizer=True, **config)`` -> a checkpoint dir.

    Built once per distinct argument set per session; treat the directory as read-only
    (copy it with shutil.copytree before damaging it).
    """
    pytest.importorskip("transformers")
    built: dict[str, Path] = {}

    def make(family: str, *, seed: int = 0, tokenizer: bool = True, **overrides) -> Path:
        key = json.dumps([family, seed, tokenizer, overrides], sort_keys=True)
        if key not in built:
            path = tmp_path_factory.mktemp(f"tiny-{family}")
            built[key] = build_tiny_checkpoint(path, family, seed=seed, tokenizer=tokenizer, **overrides)
        return built[key]

    return make


@pytest.fixture(scope="session")
def tiny_engines(tiny_checkpoint) -> Callable[..., object]:
    """``tiny_engines(family, **load_kwargs)`` -> a shared Engine of that tiny checkpoint."""
    import edge_prism

    engines: dict[str, object] = {}

    def get(family: str, **load_kwargs):
        key = json.dumps([family, load_kwargs], sort_keys=True)
        if key not in engines:
            engines[key] = edge_prism.load(tiny_checkpoint(family), **load_kwargs)
        return engines[key]

    return get


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The bundled SmolLM2-135M-Instruct Q4_1 GGUF file."""
    from edge_prism.loaders.default import default_model_path as locate

    return locate()


@pytest.fixture(scope="session")
def default_engine(default_model_path):
    """edge_prism.load() of the default model (~8 s), shared by the whole session.

    Its KV cache is shared state: tests must not rely on what an earlier test left cached.
    """
    import edge_prism

    return edge_prism.load()


# -- prism checkpoints ---------------------------------------------------------------------
@pytest.fixture(scope="session")
def prism_of(tiny_checkpoint, tmp_path_factory):
    """``prism_of(family, solver='anneal', **RefactorConfig fields)`` -> a prism checkpoint dir.

    Refactored once per argument set per session with a small calibration budget; treat it
    as read-only (copy it before damaging it).
    """
    from edge_prism.refactor.refactor import RefactorConfig, refactor

    built: dict[str, Path] = {}
    # Float blocks unless a test asks for quantization: these checkpoints test exactness; and every
    # layer at K unless a test asks for the measured allocation (tests/test_allocation.py).
    fast = dict(calib_tokens=384, rows_per_expert=256, seq_len=128, quant="none", layer_sensitivity=False)

    def make(family: str, solver: str = "anneal", **kw) -> Path:
        key = json.dumps([family, solver, kw], sort_keys=True)
        if key not in built:
            out = tmp_path_factory.mktemp("prism") / f"{family}-{solver}.prism"
            refactor(tiny_checkpoint(family), out, RefactorConfig(**{**fast, "solver": solver, **kw}),
                     progress=False)
            built[key] = out
        return built[key]

    return make


@pytest.fixture(scope="session")
def min_budget():
    """``min_budget(prism_dir, operating_point=None)`` -> the smallest memory budget in bytes."""
    def get(path: Path, operating_point: int | None = None) -> int:
        from edge_prism.api import layer_blocks
        from edge_prism.families import build_spec
        from edge_prism.refactor.prism import open_prism
        from edge_prism.runtime.store import minimum_budget
        from edge_prism.select import max_operating_point

        pc = open_prism(path)
        spec = build_spec(pc.config, where=str(path))
        k = operating_point or max_operating_point(spec, pc.parts)
        return minimum_budget(layer_blocks(pc, spec, k))

    return get
