"""Numerical parity with transformers (the reference): logits, greedy continuations, the KV
cache and prefix reuse, for every tiny family (synthetic random weights) and the default model."""

from __future__ import annotations

import pytest
import torch

import edge_prism
from conftest import ENDOFTEXT_ID, IM_END_ID, TINY_FAMILIES

transformers = pytest.importorskip("transformers")

REL_TOL = 1e-4  # max |ours - reference| over max |reference|
# A prompt whose greedy continuation runs the full 12 tokens on every tiny family (seed 0).
TINY_PROMPT = "Mixture-of-Experts models route each token to experts."
TINY_STOPS = {ENDOFTEXT_ID, IM_END_ID}  # config eos + the tokenizer's end-of-turn tokens
FAMILIES = list(TINY_FAMILIES)


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal within REL_TOL of the reference logits' scale (max abs)."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=REL_TOL * scale)


def until_stop(ids: list[int], stops: set[int]) -> list[int]:
    """``ids`` cut before the first stop token (our engine stops there and leaves it out)."""
    for i, tok in enumerate(ids):
        if tok in stops:
            return ids[:i]
    return ids


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()  # [T, V]


def hf_greedy(model, ids: list[int], new_tokens: int, *, pad: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=new_tokens, pad_token_id=pad)
    return out[0, len(ids):].tolist()


# -- tiny families -------------------------------------------------------------------------
@pytest.fixture(scope="module", params=FAMILIES)
def tiny_pair(request, tiny_checkpoint):
    """(edge-prism engine, transformers model) over the same tiny checkpoint."""
    path = tiny_checkpoint(request.param)
    engine = edge_prism.load(path)
    reference = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return engine, reference


@pytest.fixture(scope="module")
def tiny_prompt_ids(tiny_checkpoint) -> list[int]:
    from edge_prism.tokenizer import Tokenizer

    ids = Tokenizer.from_hf_dir(tiny_checkpoint("llama")).encode(TINY_PROMPT)[:24]
    assert len(ids) == 24
    return ids


def test_tiny_logits_match_transformers(tiny_pair, tiny_prompt_ids):
    engine, reference = tiny_pair
    got = engine.logits(tiny_prompt_ids)
    assert got.shape == (24, engine.spec.vocab_size) and got.dtype == torch.float32
    assert_logits_close(got, hf_logits(reference, tiny_prompt_ids))


def test_tiny_greedy_matches_transformers(tiny_pair, tiny_prompt_ids):
    engine, reference = tiny_pair
    theirs = until_stop(hf_greedy(reference, tiny_prompt_ids, 12, pad=ENDOFTEXT_ID), TINY_STOPS)
    ours = engine.generate_ids(tiny_prompt_ids, max_new_tokens=12, temperature=0)
    assert len(theirs) >= 4, "the prompt should give a continuation worth comparing"
    assert ours == theirs


def test_tiny_cached_decode_equals_full_recompute(tiny_pair, tiny_prompt_ids):
    engine, _ = tiny_pair
    new = engine.generate_ids(tiny_prompt_ids, max_new_tokens=8, temperature=0)
    full = engine.logits(tiny_prompt_ids + new)  # one prefill, from an empty cache
    steps = [engine.logits(tiny_prompt_ids)[-1:]]
    for tok in new:  # decode one token at a time over the KV cache
        steps.append(engine.model.forward(torch.tensor([tok])).cpu())
    decoded = torch.cat(steps)  # [1 + len(new), V]
    assert_logits_close(decoded, full[len(tiny_prompt_ids) - 1:])
    assert decoded[:-1].argmax(-1).tolist() == new


def test_tiny_prefix_reuse_equals_from_scratch(tiny_pair, monkeypatch):
    """A second chat turn reuses the first turn's KV cache and gets the from-scratch logits."""
    engine, reference = tiny_pair
    outputs: list[torch.Tensor] = []
    forward = engine.model.forward

    def recording_forward(ids, **kw):
        out = forward(ids, **kw)
        outputs.append(out.cpu())
        return out

    monkeypatch.setattr(engine.model, "forward", recording_forward)
    tok = engine.tokenizer
    turn1 = [{"role": "user", "content": "Route this token."}]
    reply = engine.chat(turn1, max_new_tokens=4, temperature=0)
    turn2 = turn1 + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And this one?"}]
    ids2 = tok.encode_chat(turn2)

    outputs.clear()
    reused_ids = engine.generate_ids(ids2, max_new_tokens=3, temperature=0)
    reused_first = outputs[0][-1]
    assert engine.stats["reused_prompt_tokens"] > 0

    engine.reset()
    outputs.clear()
    scratch_ids = engine.generate_ids(ids2, max_new_tokens=3, temperature=0)
    assert engine.stats["reused_prompt_tokens"] == 0
    scratch_first = outputs[0][-1]

    assert_logits_close(reused_first, scratch_first)
    assert reused_ids == scratch_ids
    assert_logits_close(reused_first, hf_logits(reference, ids2)[-1])


# -- the default model (SmolLM2-135M-Instruct Q4_1 GGUF) ---------------------------------------
DEFAULT_TEXT = ("The history of computing is a story of machines that became smaller, faster and cheaper, "
                "until a phone held more computing power than a room of mainframes.")
DEFAULT_CHAT = [{"role": "user", "content": "Write a short poem about the sea."}]


@pytest.fixture(scope="module")
def default_reference(default_model_path):
    """transformers' model from the same GGUF, dequantized to float32 (~20 s on 2 cores)."""
    return transformers.AutoModelForCausalLM.from_pretrained(
        default_model_path.parent, gguf_file=default_model_path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def default_float_engine(default_model_path):
    """The default model with its Q4_1 / Q8_0 weights expanded to float32 at load (the path
    that must equal transformers' own dequantized loading)."""
    return edge_prism.load(default_model_path, dequantize=True)


def test_default_logits_match_transformers(default_float_engine, default_reference):
    ids = default_float_engine.tokenizer.encode(DEFAULT_TEXT)[:24]
    assert len(ids) == 24
    assert_logits_close(default_float_engine.logits(ids), hf_logits(default_reference, ids))


def test_default_chat_greedy_matches_transformers(default_float_engine, default_reference):
    # Our tokenizer's ids go to both models: the GGUF tokenizer transformers builds differs
    # from SmolLM2's on digits after whitespace (see test_tokenizer.py), not at issue here.
    engine = default_float_engine
    ids = engine.tokenizer.encode_chat(DEFAULT_CHAT)
    stops = set(engine.spec.eos_token_ids) | set(engine.tokenizer.stop_ids)
    theirs = until_stop(hf_greedy(default_reference, ids, 16, pad=engine.tokenizer.eos_id), stops)
    ours = engine.generate_ids(ids, max_new_tokens=16, temperature=0)
    assert len(theirs) == 16, "the prompt should give a full 16-token reply"
    assert ours == theirs


# The quantized engine computes int4 matmuls with bfloat16 inputs, outputs and (scale, zero)
# (quant.py): against the float32 engine on the same file's dequantized weights the logits
# agree to about 2% of their scale (measured 1.9% relative norm on this prompt).
QUANT_REL_TOL = 0.05


def test_default_quantized_engine_tracks_its_dequantization(default_engine, default_float_engine):
    from edge_prism.kernels import QuantLinear

    assert isinstance(default_engine.model.w.lm_head, QuantLinear)
    ids = default_engine.tokenizer.encode(DEFAULT_TEXT)[:24]
    q, f = default_engine.logits(ids), default_float_engine.logits(ids)
    assert float((q - f).norm() / f.norm()) < QUANT_REL_TOL
    assert float((q.argmax(-1) == f.argmax(-1)).float().mean()) >= 0.9
    # Greedy replies may part at a near-tie; each token the quantized engine picks must be one
    # the float engine ranks among its best three at that position.
    chat = default_engine.tokenizer.encode_chat(DEFAULT_CHAT)
    reply = default_engine.generate_ids(chat, max_new_tokens=16, temperature=0)
    ranked = default_float_engine.logits(chat + reply)[len(chat) - 1:-1].topk(3, dim=-1).indices
    assert all(tok in row.tolist() for tok, row in zip(reply, ranked))
