"""Text <-> token ids and chat templates, for HF tokenizer directories and GGUF files.

text --encode--> ids --model--> ids --StreamDecoder.push--> text pieces as they complete

A thin wrapper over a ``tokenizers.Tokenizer``. The package never imports transformers, but
it gives the ids and chat renderings transformers gives for the same files (tests check it),
except where transformers' GGUF conversion drops a step of the model's own tokenizer: for
SmolLM2-style vocabularies (tokenizer.ggml.pre "smollm") we split digits as the original
tokenizer.json and llama.cpp do.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as Backend

from edge_prism.errors import CorruptCheckpointError, FileAccessError, TokenizerError, UnsupportedModelError
from edge_prism.loaders.gguf_meta import GgufMeta

if TYPE_CHECKING:
    import gguf

logger = logging.getLogger(__name__)

# Tokens that end a turn in the chat formats we know; the ones a vocabulary has stop generation.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<|endoftext|>", "</s>", "<end_of_turn>")

# llama.cpp's token types (tokenizer.ggml.token_type).
_CONTROL = 3
_USER_DEFINED = 4

# Split rules of the byte-level vocabularies, keyed by llama.cpp's tokenizer.ggml.pre.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# These vocabularies were trained with every digit split off before the GPT-2 split
# (SmolLM2's tokenizer.json: Digits(individual_digits) then ByteLevel; llama.cpp: "\p{N}"
# then the GPT-2 regex). Without it, "a   12" becomes "a", "  ", " 12" instead of "a", "   ", "12".
_DIGITS_THEN_GPT2 = frozenset({"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"})
_SPLIT_REGEX = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "dbrx", "smaug-bpe", "pixtral"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT),
}
_GPT2_PRE = frozenset({"default", "gpt2", "gpt-2", "mpt", "olmo", "jais"})


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


class StreamDecoder:
    """Turns ids arriving one at a time into text, without splitting a UTF-8 character.

    Each push decodes only a short window (the ids of the previous emitted piece plus those
    still held back), so the cost per token does not grow with the length of the output.
    The window's leading context makes decoders that look back (SentencePiece's leading-space
    strip) behave as they do on the whole sequence.
    """

    def __init__(self, tokenizer: "Tokenizer", *, skip_special: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._ids: list[int] = []  # the window: context ids, then ids not yet emitted
        self._read = 0  # ids before this index have been emitted as text

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes ('' while a character is still partial)."""
        self._ids.append(int(token_id))
        done = self._decode(self._ids[: self._read])
        text = self._decode(self._ids)
        if len(text) <= len(done) or text.endswith("\ufffd"):
            return ""
        # The ids just emitted become the next window's context; older ones are dropped.
        del self._ids[: self._read]
        self._read = len(self._ids)
        return text[len(done) :]

    def flush(self) -> str:
        """Return whatever is still held back (e.g. a truncated character) and reset."""
        done = self._decode(self._ids[: self._read])
        text = self._decode(self._ids)
        self._ids.clear()
        self._read = 0
        return text[len(done) :]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special=self._skip_special) if ids else ""


class Tokenizer:
    """A model's tokenizer: encode/decode, special ids, stop ids, and its chat template.

    Build it with :meth:`from_hf_dir` or :meth:`from_gguf`. Special tokens written in text
    are encoded as their ids; ``stop_ids`` are the ids that end a reply.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        bos_token: str | None,
        eos_token: str | None,
        add_bos: bool,
        chat_template: str | None,
        source: Path,
    ) -> None:
        self._backend = backend
        self.source = source
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_id: int | None = backend.token_to_id(bos_token) if bos_token is not None else None
        self.eos_id: int | None = backend.token_to_id(eos_token) if eos_token is not None else None
        self.add_bos = bool(add_bos) and self.bos_id is not None
        self.chat_template = chat_template
        stops = {backend.token_to_id(token) for token in END_OF_TURN_TOKENS}
        stops.add(self.eos_id)
        stops.discard(None)
        self.stop_ids: frozenset[int] = frozenset(stops)

    # -- construction ---------------------------------------------------------------

    @classmethod
    def from_hf_dir(cls, path: Path) -> "Tokenizer | None":
        """Load ``tokenizer.json`` (+ ``tokenizer_config.json``, ``chat_template.jinja``) from a
        Hugging Face model directory; None when the directory has no ``tokenizer.json``."""
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            return None
        try:
            with open(tokenizer_file, "rb"):
                pass
        except PermissionError:
            raise FileAccessError(f"{tokenizer_file}: cannot read it (permission denied); make it readable "
                                  f"(chmod a+r {tokenizer_file})") from None
        try:
            backend = Backend.from_file(str(tokenizer_file))
        except Exception as exc:  # the tokenizers library raises a bare Exception on bad JSON
            raise TokenizerError(
                f"{tokenizer_file}: cannot read the tokenizer ({exc}); re-download the model"
            ) from exc
        config = _read_json(path / "tokenizer_config.json")
        bos_token = _token_text(config.get("bos_token"))
        eos_token = _token_text(config.get("eos_token"))
        add_bos = config.get("add_bos_token")
        if add_bos is None:
            # No flag: transformers keeps tokenizer.json's post-processor, so see whether it adds BOS.
            add_bos = _post_processor_adds(backend, bos_token)
        return cls(
            backend,
            bos_token=bos_token,
            eos_token=eos_token,
            add_bos=add_bos,
            chat_template=_hf_chat_template(path, config),
            source=path,
        )

    @classmethod
    def from_gguf(cls, reader: "gguf.GGUFReader", path: Path) -> "Tokenizer":
        """Build the tokenizer described by a GGUF file's ``tokenizer.ggml.*`` metadata.

        Supports byte-level BPE (``gpt2``: GPT-2, Llama 3, Qwen2, SmolLM...) and SentencePiece
        BPE (``llama``: Llama 2, Mistral...).
        """
        path = Path(path)
        meta = GgufMeta(reader, path)
        kind = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if kind is None or not tokens:
            raise TokenizerError(f"{path}: the GGUF file has no tokenizer (tokenizer.ggml.* metadata)")
        token_types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        if kind == "gpt2":
            backend = _byte_level_backend(path, meta, tokens, token_types)
            add_bos_default = False
        elif kind == "llama":
            backend = _sentencepiece_backend(path, meta, tokens, token_types)
            # Older files have no flag, and llama.cpp adds BOS to a SentencePiece vocabulary by default.
            add_bos_default = True
        else:
            raise UnsupportedModelError(
                f"{path}: tokenizer model {kind!r} is not supported (supported: 'gpt2', 'llama'); "
                "use the Hugging Face checkpoint directory instead"
            )

        def token_at(key: str) -> str | None:
            index = meta.get(key)
            return tokens[index] if index is not None and 0 <= index < len(tokens) else None

        add_bos = meta.get("tokenizer.ggml.add_bos_token")
        return cls(
            backend,
            bos_token=token_at("tokenizer.ggml.bos_token_id"),
            eos_token=token_at("tokenizer.ggml.eos_token_id"),
            add_bos=add_bos_default if add_bos is None else add_bos,
            chat_template=meta.get("tokenizer.chat_template"),
            source=path,
        )

    def save(self, directory: Path) -> None:
        """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``directory``, so that
        :meth:`from_hf_dir` (or transformers' AutoTokenizer) loads this tokenizer back unchanged;
        a prism checkpoint carries its tokenizer this way, whatever the source format."""
        directory = Path(directory)
        self._backend.save(str(directory / "tokenizer.json"))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            # Explicit, so loaders do not fall back to guessing from a post-processor.
            "add_bos_token": self.add_bos,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "chat_template": self.chat_template,
        }
        config = {key: value for key, value in config.items() if value is not None}
        text = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
        (directory / "tokenizer_config.json").write_text(text, encoding="utf-8")

    # -- text <-> ids -----------------------------------------------------------------

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; special tokens written in it become their ids.

        ``add_bos`` None follows the model (``self.add_bos``).
        """
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        """Text of ``ids``; special tokens are left out unless ``skip_special`` is False."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def stream_decoder(self, *, skip_special: bool = True) -> StreamDecoder:
        """A decoder that turns ids, pushed one at a time, into text as characters complete."""
        return StreamDecoder(self, skip_special=skip_special)

    # -- chat -------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        """Render ``messages`` ([{"role": ..., "content": ...}]) with the model's chat template,
        the way transformers does (same Jinja environment and variables)."""
        if not self.chat_template:
            raise TokenizerError(
                f"{self.source}: this model has no chat template, so it cannot format a chat; continue raw "
                "text with Engine.generate() from Python, or use a chat (instruct) model, whose "
                "tokenizer_config.json has a chat_template"
            )
        try:
            return _compile(self.chat_template).render(
                messages=[dict(message) for message in messages],
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except TokenizerError:
            raise
        except jinja2.TemplateError as exc:
            raise TokenizerError(f"{self.source}: the chat template failed: {exc}") from exc
        except RecursionError:
            raise TokenizerError(f"{self.source}: the chat template recursed without end; fix the model's "
                                 "chat_template") from None
        except Exception as exc:  # the template is the model's code: any error in it is a bad template
            raise TokenizerError(f"{self.source}: the chat template failed ({type(exc).__name__}: {exc}); "
                                 "fix the model's chat_template, or check the messages it was given") from exc

    def encode_chat(self, messages: list[dict], *, add_generation_prompt: bool = True) -> list[int]:
        """Render, then encode without adding BOS (the template writes it), as transformers'
        ``apply_chat_template(tokenize=True)`` does."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        return self.encode(text, add_bos=False)

    def __repr__(self) -> str:
        return f"Tokenizer({self.source.name!r}, vocab_size={self.vocab_size}, bos={self.bos_id}, eos={self.eos_id})"


# -- GGUF builders -------------------------------------------------------------------


def _bpe(path: Path, **kwargs) -> models.BPE:
    try:
        return models.BPE(**kwargs)
    except Exception as exc:  # the tokenizers library raises a bare Exception (e.g. a merge of unknown tokens)
        raise CorruptCheckpointError(
            f"{path}: the GGUF tokenizer is inconsistent ({exc}); re-download or re-convert the file"
        ) from exc


def _byte_level_backend(path: Path, meta: GgufMeta, tokens: list[str], token_types: list[int]) -> Backend:
    """GPT-2-style byte-level BPE from the file's tokens and merges."""
    spelling = _bytes_to_unicode()
    alphabet = frozenset(spelling.values())
    # Some converters store a token as plain text instead of in the byte alphabet; respell those
    # so the vocabulary lines up with the merges (what transformers does too).
    spelled = [
        token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8"))
        for token in tokens
    ]
    vocab = {token: index for index, token in enumerate(spelled)}
    merges = meta.get("tokenizer.ggml.merges")
    if not merges:
        raise TokenizerError(f"{path}: byte-level GGUF tokenizer without tokenizer.ggml.merges; re-convert the model")
    backend = Backend(_bpe(path, vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False))
    backend.pre_tokenizer = _byte_level_pre_tokenizer(meta.get("tokenizer.ggml.pre") or "default")
    backend.decoder = decoders.ByteLevel()
    # A control token written outside the byte alphabet is a converter mislabel (transformers skips it too).
    _add_special_tokens(backend, tokens, token_types, keep=lambda t: set(t) <= alphabet)
    return backend


def _byte_level_pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre in _SPLIT_REGEX:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT_REGEX[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if pre not in _GPT2_PRE:
        logger.warning("unknown GGUF pre-tokenizer %r: splitting text like GPT-2, ids may differ from llama.cpp", pre)
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _sentencepiece_backend(path: Path, meta: GgufMeta, tokens: list[str], token_types: list[int]) -> Backend:
    """SentencePiece-style BPE (byte fallback, '▁' for spaces) from tokens and merges or scores."""
    vocab = {token: index for index, token in enumerate(tokens)}
    merges = meta.get("tokenizer.ggml.merges")
    if merges:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
    else:
        scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        pairs = _merges_from_scores(vocab, dict(zip(tokens, scores)))
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    backend = Backend(_bpe(path, vocab=vocab, merges=pairs, unk_token=unk, fuse_unk=True, byte_fallback=True))
    add_prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if add_prefix else "never", split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    _add_special_tokens(backend, tokens, token_types)
    return backend


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges a SentencePiece vocabulary implies: every split of a token into two tokens,
    best score first (the same order transformers derives, so ties break the same way)."""
    merges: list[tuple[str, str, float]] = []
    for piece, score in scores.items():
        local = [
            (piece[:i], piece[i:], score)
            for i in range(1, len(piece))
            if piece[:i] in vocab and piece[i:] in vocab
        ]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _add_special_tokens(
    backend: Backend, tokens: list[str], token_types: list[int], *, keep: Callable[[str], bool] | None = None
) -> None:
    """Make control tokens special and user-defined tokens whole, so text never cuts them up."""
    control = [
        AddedToken(token, normalized=False, special=True)
        for token, kind in zip(tokens, token_types)
        if kind == _CONTROL and (keep is None or keep(token))
    ]
    if control:
        backend.add_special_tokens(control)
    vocab = backend.get_vocab(with_added_tokens=False)
    user = [
        AddedToken(token, normalized=False, special=False)
        for token, kind in zip(tokens, token_types)
        if kind == _USER_DEFINED and token in vocab
    ]
    if user:
        backend.add_tokens(user)


# -- HF directory helpers ------------------------------------------------------------


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except PermissionError:
        raise FileAccessError(f"{path}: cannot read it (permission denied); make it readable "
                              f"(chmod a+r {path})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"{path}: cannot read it ({exc}); re-download the model") from exc
    if not isinstance(value, dict):
        raise TokenizerError(f"{path}: expected a JSON object; re-download the model")
    return value


def _token_text(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string, or a serialized AddedToken."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _hf_chat_template(path: Path, config: dict) -> str | None:
    template_file = path / "chat_template.jinja"
    if template_file.is_file():
        try:
            return template_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise TokenizerError(f"{template_file}: cannot read it ({exc}); fix its permissions or "
                                 "re-download the model") from None
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {item.get("name"): item.get("template") for item in template if isinstance(item, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _post_processor_adds(backend: Backend, bos_token: str | None) -> bool:
    """Whether tokenizer.json's post-processor puts ``bos_token`` in front of a sequence."""
    if bos_token is None or backend.post_processor is None:
        return False
    bos_id = backend.token_to_id(bos_token)
    ids = backend.encode("a", add_special_tokens=True).ids
    return bool(ids) and ids[0] == bos_id and backend.encode("a", add_special_tokens=False).ids[:1] != [bos_id]


# -- chat templates ----------------------------------------------------------------


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False
) -> str:
    # Jinja's own tojson escapes HTML characters, which chat templates do not want.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    """Chat templates come from model files, so they run sandboxed, in transformers' environment."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise TokenizerError(f"the model's chat template does not parse: {exc}") from exc
    except RecursionError:
        raise TokenizerError("the model's chat template is nested too deeply to parse") from None
