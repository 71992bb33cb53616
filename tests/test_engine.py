"""The Engine API a user embeds: text in, text out, streaming, stats, sampling options,
stopping, limits and input validation. Tiny models carry synthetic random weights."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import edge_prism
from conftest import IM_END_ID, TOKENIZER_SIZE
from edge_prism.errors import ConfigError, ContextLengthError, TokenizerError

PROMPT = "Mixture-of-Experts models route each token to experts."
CHAT = [{"role": "user", "content": "Route this token, please."}]
GREEDY = dict(max_new_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def engine(tiny_engines):
    return tiny_engines("llama")


@pytest.fixture(scope="module")
def prompt_ids(engine) -> list[int]:
    return engine.tokenizer.encode(PROMPT)


@pytest.fixture(scope="module")
def greedy_ids(engine, prompt_ids) -> list[int]:
    ids = engine.generate_ids(prompt_ids, **GREEDY)
    assert len(ids) == 12, "the tiny llama runs the full 12 tokens on PROMPT"
    return ids


# -- text in, text out -----------------------------------------------------------------------
def test_generate_returns_the_decoded_greedy_ids(engine, greedy_ids):
    text = engine.generate(PROMPT, **GREEDY)
    assert isinstance(text, str)
    assert text == engine.tokenizer.decode(greedy_ids)


@pytest.mark.parametrize("method", ["stream", "stream_chat"])
def test_stream_pieces_join_to_the_full_reply(engine, method):
    arg = PROMPT if method == "stream" else CHAT
    pieces = list(getattr(engine, method)(arg, **GREEDY))
    assert pieces and all(isinstance(p, str) and p for p in pieces)
    whole = engine.generate(arg, **GREEDY) if method == "stream" else engine.chat(arg, **GREEDY)
    assert "".join(pieces) == whole


def test_chat_renders_the_template_and_generates(engine):
    reply = engine.chat(CHAT, **GREEDY)
    ids = engine.generate_ids(engine.tokenizer.encode_chat(CHAT), **GREEDY)
    assert isinstance(reply, str)
    assert reply == engine.tokenizer.decode(ids)


def test_default_model_streams_real_text(default_engine):
    messages = [{"role": "user", "content": "Name a color."}]
    pieces = list(default_engine.stream_chat(messages, max_new_tokens=8, temperature=0))
    ids = default_engine.generate_ids(default_engine.tokenizer.encode_chat(messages), max_new_tokens=8,
                                      temperature=0)
    assert len(pieces) >= 2
    assert "".join(pieces) == default_engine.tokenizer.decode(ids)


def test_stats_describe_the_last_generation(engine, prompt_ids, greedy_ids):
    engine.generate_ids(prompt_ids, **GREEDY)
    stats = engine.stats
    assert stats["generated_tokens"] == len(greedy_ids)
    assert stats["prompt_tokens"] == len(prompt_ids)
    for key in ("decode_tokens_per_s", "time_to_first_token_s"):
        assert math.isfinite(stats[key]) and stats[key] > 0, key


# -- sampling --------------------------------------------------------------------------------
def test_seeded_sampling_is_reproducible_and_seeds_differ(engine, prompt_ids):
    def sample(seed: int) -> list[int]:
        return engine.generate_ids(prompt_ids, max_new_tokens=12, temperature=1.0, seed=seed)

    first = sample(1)
    assert len(first) >= 4
    assert sample(1) == first
    assert sample(2) != first


@pytest.mark.parametrize("option", [dict(top_k=1), dict(top_p=1e-6)], ids=["top_k=1", "top_p=1e-6"])
def test_narrowest_sampling_equals_greedy(engine, prompt_ids, greedy_ids, option):
    assert engine.generate_ids(prompt_ids, max_new_tokens=12, temperature=1.0, seed=0, **option) == greedy_ids


@pytest.mark.parametrize("n", [0, 1, 5])
def test_max_new_tokens_is_respected(engine, prompt_ids, greedy_ids, n):
    assert engine.generate_ids(prompt_ids, max_new_tokens=n, temperature=0) == greedy_ids[:n]
    assert engine.stats["generated_tokens"] == n


@pytest.mark.parametrize("option", [dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-1),
                                    dict(max_new_tokens=-1), dict(beams=4)],
                         ids=["temperature<0", "top_p=0", "top_k<0", "max_new_tokens<0", "unknown-option"])
def test_bad_generation_options_raise_config_error(engine, option):
    with pytest.raises(ConfigError):
        engine.generate(PROMPT, **option)


# -- stopping ----------------------------------------------------------------------------------
def _first_new_token_index(ids: list[int]) -> int:
    """The first position k >= 2 whose token did not occur before it."""
    return next(k for k in range(2, len(ids)) if ids[k] not in ids[:k])


def _with_swapped_output_rows(src: Path, dst: Path, a: int, b: int, **config) -> Path:
    """A copy of ``src`` whose lm_head rows a and b are swapped (and config keys overridden).

    Swapping output rows permutes the logits only: greedy picks b where it picked a before.
    """
    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    head = weights["lm_head.weight"]
    head[[a, b]] = head[[b, a]]
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, **config}))
    return dst


@pytest.mark.parametrize("stop", ["<|im_end|>", "config-eos"])
def test_generation_stops_at_end_tokens(tiny_checkpoint, tmp_path, prompt_ids, greedy_ids, stop):
    k = _first_new_token_index(greedy_ids)
    if stop == "<|im_end|>":  # a stop token of the tokenizer
        stop_id, config = IM_END_ID, {}
    else:  # an id only config.json's eos_token_id names (outside the tokenizer)
        stop_id, config = TOKENIZER_SIZE + 10, {"eos_token_id": TOKENIZER_SIZE + 10}
    assert stop_id not in greedy_ids
    path = _with_swapped_output_rows(tiny_checkpoint("llama"), tmp_path / "ckpt", greedy_ids[k], stop_id,
                                     **config)
    stopper = edge_prism.load(path)
    assert stopper.generate_ids(prompt_ids, **GREEDY) == greedy_ids[:k]
    assert stopper.stats["generated_tokens"] == k
    assert stopper.generate(PROMPT, **GREEDY) == stopper.tokenizer.decode(greedy_ids[:k])


# -- logits and input validation ----------------------------------------------------------------
def test_logits_shape_and_dtype(engine, prompt_ids):
    out = engine.logits(prompt_ids)
    assert out.shape == (len(prompt_ids), engine.spec.vocab_size)
    assert out.dtype == torch.float32 and out.device.type == "cpu"
    torch.testing.assert_close(engine.logits(torch.tensor(prompt_ids)), out, rtol=0, atol=0)


@pytest.mark.parametrize("ids", [
    torch.zeros(2, 3, dtype=torch.long),
    torch.tensor([1.0, 2.0]),
    [],
    [0, 300],
    [5, -1],
], ids=["2-D", "float", "empty", "id=vocab", "negative-id"])
def test_logits_rejects_bad_input(engine, ids):
    with pytest.raises(ConfigError):
        engine.logits(ids)


@pytest.fixture(scope="module")
def short_engine(tiny_engines):
    return tiny_engines("llama", max_context=32)


@pytest.mark.parametrize("length", [32, 40])
def test_prompt_at_or_over_the_context_is_refused(short_engine, length):
    ids = list(range(65, 65 + length))
    with pytest.raises(ContextLengthError, match=f"{length} tokens"):
        short_engine.generate_ids(ids, max_new_tokens=4, temperature=0)
    with pytest.raises(ContextLengthError):
        short_engine.generate("x" * length, max_new_tokens=4)


def test_generation_stops_at_the_end_of_the_context(short_engine):
    assert len(short_engine.generate_ids(list(range(65, 65 + 31)), max_new_tokens=10, temperature=0)) <= 1
    assert len(short_engine.generate_ids(list(range(65, 65 + 28)), max_new_tokens=10, temperature=0)) <= 4


def test_logits_accepts_a_sequence_filling_the_context(short_engine):
    assert short_engine.logits(list(range(65, 65 + 32))).shape == (32, short_engine.spec.vocab_size)


def test_zero_max_context_is_refused(tiny_checkpoint):
    with pytest.raises(ConfigError, match="max_context"):
        edge_prism.load(tiny_checkpoint("llama"), max_context=0)


def test_checkpoint_without_tokenizer_gives_logits_but_not_text(tiny_checkpoint, engine, prompt_ids):
    bare = edge_prism.load(tiny_checkpoint("llama", tokenizer=False))
    torch.testing.assert_close(bare.logits(prompt_ids), engine.logits(prompt_ids), rtol=0, atol=0)
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        bare.generate(PROMPT, max_new_tokens=2)
    with pytest.raises(TokenizerError):
        bare.chat(CHAT, max_new_tokens=2)


def test_interrupted_decode_does_not_corrupt_the_next_turn(tiny_engines):
    """Ctrl-C inside a decode step, then a turn that continues the same tokens: every cached
    key must sit at the same position as in a generation from scratch."""
    engine = tiny_engines("llama")
    prompt = list(range(40, 60))
    engine.reset()
    follow = prompt + engine.generate_ids(prompt, max_new_tokens=2, temperature=0) + [5]
    engine.reset()
    engine.generate_ids(follow, max_new_tokens=1, temperature=0)
    want = engine.model.cache.k[0][:, :len(follow)].clone()
    engine.reset()
    real_forward, calls = engine.model.forward, {"n": 0}

    def flaky(ids, **kw):
        calls["n"] += 1
        if calls["n"] == 3:  # prefill, decode of the 1st token, then the 2nd decode is interrupted
            raise KeyboardInterrupt
        return real_forward(ids, **kw)

    engine.model.forward = flaky
    try:
        with pytest.raises(KeyboardInterrupt):
            engine.generate_ids(prompt, max_new_tokens=10, temperature=0)
    finally:
        engine.model.forward = real_forward
    engine.generate_ids(follow, max_new_tokens=1, temperature=0)
    torch.testing.assert_close(engine.model.cache.k[0][:, :len(follow)], want, rtol=1e-5, atol=1e-6)
