"""Tokenizer: ids and chat rendering against transformers, round trips, streaming decode."""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import csv
import dataclasses
import difflib
import enum
import functools
import heapq
import itertools
import json
import logging
import math
import os
import re
import shutil
import statistics
import string
import subprocess
import textwrap
import unicodedata
import urllib.parse
import zipfile
from pathlib import Path

import gguf
import pytest
from tokenizers import SentencePieceBPETokenizer, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as Backend

from edge_prism.errors import TokenizerError, UnsupportedModelError
from edge_prism.loaders.default import default_model_path
from edge_prism.tokenizer import StreamDecoder, Tokenizer

transformers = pytest.importorskip("transformers")

# Real prose and code-ish text: stdlib docstrings (doctests, lists, indentation, URLs, quotes).
DOCSTRINGS = [
    obj.__doc__
    for obj in (
        json, json.dumps, json.loads, textwrap.dedent, textwrap.wrap, collections, collections.Counter,
        itertools.groupby, functools.reduce, functools.lru_cache, re, string, os.path.join, os.walk, heapq,
        dataclasses.dataclass, argparse, contextlib.contextmanager, csv, logging.basicConfig, math.isclose,
        shutil.copytree, statistics, subprocess.run, urllib.parse.urlsplit, zipfile.ZipFile, difflib, enum.Enum,
        base64.b64encode, unicodedata.normalize,
    )
]  # fmt: skip
EDGE_CASES = [
    "",
    " ",
    "Hello, world!",
    "naïve café, Ελληνικά, русский, 日本語のテキスト, 한국어",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "digits 0 12 345 6789 3.14159 1e-9 -42 +7",
    "2024-01-31T12:00:00Z and 1,000,000 and ²³ ½",
    "tabs\tand\nnewlines\r\n\n\nand  double  spaces   ",
    "    indented code():\n        return x ** 2\n",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text",
    "not special: <|im_start and im_end|>",
    "\u200b zero width \u00a0 nbsp \ufeff bom",
    "a" * 300,
]
TEXTS = DOCSTRINGS + EDGE_CASES

# transformers 5.x builds the GGUF tokenizer for tokenizer.ggml.pre == "smollm" with the plain
# GPT-2 split, without the digit split of SmolLM2's tokenizer.json (Digits(individual_digits)
# then ByteLevel; llama.cpp also splits digits first for "smollm"). The two disagree only around
# numeric characters: a run of two or more spaces before one ("a   12": "a","  "," 12" vs
# "a","   ","12"), and non-ASCII numerics the vocabulary merges with a space ("Ġ²").
# We follow the model's own tokenizer; transformers is compared exactly wherever they agree.
def _transformers_gguf_differs(text: str) -> bool:
    return bool(re.search(r"\s\s(?=\d)", text)) or any(c.isnumeric() and not c.isascii() for c in text)


def _ids(output) -> list[int]:
    """transformers returns a list or a BatchEncoding depending on version."""
    return list(output) if isinstance(output, list) else list(output["input_ids"])


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_path() -> Path:
    return default_model_path()


@pytest.fixture(scope="module")
def ours(default_path) -> Tokenizer:
    return Tokenizer.from_gguf(gguf.GGUFReader(default_path), default_path)


@pytest.fixture(scope="module")
def reference(default_path):
    return transformers.AutoTokenizer.from_pretrained(default_path.parent, gguf_file=default_path.name)


@pytest.fixture(scope="module")
def smollm2_reference(reference) -> Backend:
    """transformers' GGUF tokenizer with the pre-tokenizer of SmolLM2's published tokenizer.json."""
    backend = Backend.from_str(reference.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    return backend


# -- the default model (GGUF, byte-level BPE) -----------------------------------------------------


def test_text_corpus_is_big_enough():
    comparable = [t for t in TEXTS if not _transformers_gguf_differs(t)]
    assert len(DOCSTRINGS) >= 30 and all(DOCSTRINGS) and len(comparable) >= 36


@pytest.mark.parametrize("text", [t for t in TEXTS if not _transformers_gguf_differs(t)])
def test_ids_match_transformers_gguf(ours, reference, text):
    assert ours.encode(text) == _ids(reference.encode(text))


@pytest.mark.parametrize(
    "text",
    [t for t in TEXTS if _transformers_gguf_differs(t)] + ["a   12", "x\n    1 + 2", "foo  123bar", "1,000 and  3.14"],
)
def test_digits_are_split_like_smollm2(ours, smollm2_reference, text):
    assert ours.encode(text) == smollm2_reference.encode(text, add_special_tokens=False).ids


def test_special_tokens_in_text_are_single_ids(ours):
    im_start, im_end = ours.encode("<|im_start|>"), ours.encode("<|im_end|>")
    assert im_start == [1] and im_end == [2]
    assert ours.encode("<|im_start|>user\nhi<|im_end|>")[0] == 1
    assert ours.encode("hi", add_bos=True)[:1] == [ours.bos_id]
    assert not ours.add_bos and ours.encode("hi")[:1] != [ours.bos_id]


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trips(ours, text):
    assert ours.decode(ours.encode(text), skip_special=False) == text


def test_decode_skips_special_tokens(ours, reference):
    ids = ours.encode("<|im_start|>user\nhi there<|im_end|>")
    assert ours.decode(ids) == "user\nhi there" == reference.decode(ids, skip_special_tokens=True)


def test_special_ids_and_stop_ids(ours):
    assert (ours.bos_token, ours.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert ours.vocab_size == 49152 and ours.eos_id == 2
    assert {ours.eos_id, ours.encode("<|im_end|>")[0], ours.encode("<|endoftext|>")[0]} <= ours.stop_ids
    assert ours.bos_id not in ours.stop_ids


CONVERSATIONS = {
    "system_user_assistant": [
        {"role": "system", "content": "You answer in one sentence."},
        {"role": "user", "content": "What is the capital of France? Answer 1 word."},
        {"role": "assistant", "content": "Paris."},
    ],
    "user_only": [{"role": "user", "content": "Write a haiku about GPUs 🚀"}],
}


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_chat_template_matches_transformers(ours, reference, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    want = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == want
    want_ids = _ids(reference.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt))
    assert ours.encode_chat(messages, add_generation_prompt=add_generation_prompt) == want_ids


MULTIBYTE = "naïve café — 日本語のテキスト 😀👍🏽 Ελληνικά ✓ €100 🇫🇷 end"


def _stream(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    decoder = tokenizer.stream_decoder()
    return [decoder.push(i) for i in ids] + [decoder.flush()]


def test_stream_decoder_reproduces_decode(ours):
    ids = ours.encode(MULTIBYTE)
    pieces = _stream(ours, ids)
    assert "".join(pieces) == ours.decode(ids) == MULTIBYTE
    assert not any("\ufffd" in piece for piece in pieces)
    # Text comes out as it completes, not all at the end.
    assert sum(1 for piece in pieces[:-1] if piece) >= len(ids) // 2


def test_stream_decoder_flushes_a_truncated_character(ours):
    ids = ours.encode("ok 😀")  # the emoji's bytes span two ids
    decoder = ours.stream_decoder()
    assert "".join(decoder.push(i) for i in ids[:-1]) == "ok"  # the partial emoji is held back
    assert decoder.flush() == " \ufffd"  # the stream ended mid-character: say so, don't drop it
    assert decoder.flush() == ""


def test_stream_decoder_work_per_token_is_bounded(ours):
    """Each push decodes a short window, however long the output already is."""
    lengths: list[int] = []

    class Spy:
        def decode(self, ids, *, skip_special=True):
            lengths.append(len(ids))
            return ours.decode(ids, skip_special=skip_special)

    ids = ours.encode(" ".join(DOCSTRINGS[:6]))
    decoder = StreamDecoder(Spy())
    text = "".join(decoder.push(i) for i in ids) + decoder.flush()
    assert text == ours.decode(ids) and len(ids) > 1000
    assert max(lengths) <= 8


# -- SentencePiece-style GGUF ("llama" tokenizer model) -----------------------------------------


@pytest.fixture(scope="module")
def spm_gguf(tmp_path_factory) -> Path:
    """A llama-style GGUF vocabulary (byte tokens, scores, no merges), trained on docstrings."""
    trainer = SentencePieceBPETokenizer()
    trainer.train_from_iterator(DOCSTRINGS, vocab_size=600, min_frequency=2, limit_alphabet=100, show_progress=False)
    learned = [token for token, _ in sorted(trainer.get_vocab().items(), key=lambda kv: kv[1])]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + learned
    token_types = [2, 3, 3] + [6] * 256 + [1] * len(learned)
    scores = [0.0] * 259 + [-float(i) for i in range(len(learned))]
    path = tmp_path_factory.mktemp("spm") / "spm.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(token_types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_space_prefix(True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


SPM_TEXTS = [d for d in DOCSTRINGS[:10]] + [
    "Hello world", "JSON is a data format\n\twith tabs", "é ü 日本 😀", "trailing  ", "</s> inside <s> text",
]  # fmt: skip


def test_sentencepiece_gguf_matches_transformers(spm_gguf):
    ours = Tokenizer.from_gguf(gguf.GGUFReader(spm_gguf), spm_gguf)
    reference = transformers.AutoTokenizer.from_pretrained(spm_gguf.parent, gguf_file=spm_gguf.name)
    assert ours.add_bos and ours.bos_id == 1 and ours.stop_ids == {2}
    for text in SPM_TEXTS:
        ids = ours.encode(text)
        assert ids == _ids(reference.encode(text)), text
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True)
        assert "".join(_stream(ours, ids)) == ours.decode(ids)


def test_unsupported_gguf_tokenizer_model(tmp_path):
    path = tmp_path / "bert.gguf"
    writer = gguf.GGUFWriter(path, "bert")
    writer.add_tokenizer_model("bert")
    writer.add_token_list(["[PAD]", "[UNK]", "hello"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError) as info:
        Tokenizer.from_gguf(gguf.GGUFReader(path), path)
    assert str(path) in str(info.value) and "'bert'" in str(info.value)


# -- Hugging Face directories -------------------------------------------------------------------

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role') }}{% endif %}"
    "{% if loop.first %}{{ bos_token }}{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] | trim }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _write_hf_dir(path: Path, *, chat_template: str | None, bos_post_processor: bool, jinja_file: bool = False) -> Path:
    """A tiny byte-level BPE trained on docstrings, saved the way transformers saves one."""
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=["<s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(DOCSTRINGS, trainer)
    if bos_post_processor:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    path.mkdir(parents=True, exist_ok=True)
    backend.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        # Older transformers versions save special tokens as serialized AddedTokens.
        "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": False, "normalized": False,
                      "rstrip": False, "single_word": False, "special": True},  # fmt: skip
        "eos_token": "<|im_end|>",
    }
    if chat_template and jinja_file:
        (path / "chat_template.jinja").write_text(chat_template)
    elif chat_template:
        config["chat_template"] = chat_template
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("bos_post_processor", [False, True])
def test_hf_dir_matches_transformers(tmp_path, bos_post_processor):
    path = _write_hf_dir(tmp_path / "tok", chat_template=CHAT_TEMPLATE, bos_post_processor=bos_post_processor)
    ours = Tokenizer.from_hf_dir(path)
    reference = transformers.AutoTokenizer.from_pretrained(path)
    assert ours.add_bos is bos_post_processor and ours.bos_id == 0 and ours.eos_id == 2
    assert ours.stop_ids == {2}
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == _ids(reference.encode(text)), text
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    for add_generation_prompt in (True, False):
        messages = CONVERSATIONS["system_user_assistant"]
        rendered = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == rendered
        assert ours.encode_chat(messages, add_generation_prompt=add_generation_prompt) == _ids(
            reference.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
        )


def test_hf_dir_chat_template_file(tmp_path):
    path = _write_hf_dir(tmp_path / "tok", chat_template=CHAT_TEMPLATE, bos_post_processor=False, jinja_file=True)
    ours = Tokenizer.from_hf_dir(path)
    assert ours.chat_template == CHAT_TEMPLATE
    rendered = ours.apply_chat_template([{"role": "user", "content": " hi "}])
    assert rendered == "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(TokenizerError, match="bad role"):
        ours.apply_chat_template([{"role": "robot", "content": "beep"}])


def test_model_without_chat_template(tmp_path):
    ours = Tokenizer.from_hf_dir(_write_hf_dir(tmp_path / "tok", chat_template=None, bos_post_processor=False))
    assert ours.chat_template is None
    with pytest.raises(TokenizerError, match="no chat template"):
        ours.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(TokenizerError, match="no chat template"):
        ours.encode_chat([{"role": "user", "content": "hi"}])


def test_hf_dir_without_tokenizer_json(tmp_path):
    assert Tokenizer.from_hf_dir(tmp_path) is None


def test_saved_tokenizer_loads_back_unchanged(ours, tmp_path):
    """A prism checkpoint stores its tokenizer with save() and reads it with from_hf_dir()."""
    ours.save(tmp_path)
    loaded = Tokenizer.from_hf_dir(tmp_path)
    assert (loaded.bos_id, loaded.eos_id, loaded.add_bos) == (ours.bos_id, ours.eos_id, ours.add_bos)
    assert (loaded.stop_ids, loaded.vocab_size) == (ours.stop_ids, ours.vocab_size)
    assert loaded.chat_template == ours.chat_template
    for text in TEXTS:
        assert loaded.encode(text) == ours.encode(text)
    messages = CONVERSATIONS["system_user_assistant"]
    assert loaded.encode_chat(messages) == ours.encode_chat(messages)
    # The saved files are ordinary Hugging Face tokenizer files, digit split included.
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert _ids(reference.encode(text)) == ours.encode(text), text
