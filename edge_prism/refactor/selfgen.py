"""Calibration text the model writes itself, in the registers people chat in.

seed prompts (stories, dialogue, instructions, facts, code, ...) --[model, sampled, fixed
seeds]--> replies --> "prompt\\n\\nreply" texts --> cache (keyed by the model's hash and the recipe)

The standard library's docstrings are real text on every machine, but one register: a
partition and gates fitted on them alone generalise poorly to prose or dialogue. No
general text ships with Python, and nothing may come from a hub, so the model writes the
rest from a fixed, diverse set of prompts. Sampling is seeded per reply, so a recipe gives
the same bytes every time on one machine; the text is cached, so a second refactoring of
the same model does not generate it again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from edge_prism.errors import ConfigError
from edge_prism.paths import cache_root
from edge_prism.refactor.stream import source_engine

log = logging.getLogger(__name__)

# Bump when the way text is made changes: cached text is then remade. 2: a model over
# stream.RESIDENT_GENERATION_BYTES writes it with its experts streamed (bfloat16 compute over
# 16-bit weights), no longer fully resident in float32.
RECIPE_VERSION = 2

# (register, prompt). Calibration only: tuning used DEV_PROMPTS, and evaluation uses real
# text from other sources (edge_prism.refactor.corpus.heldout_text).
SEED_PROMPTS: tuple[tuple[str, str], ...] = (
    ("story", "Write a short story about a lighthouse keeper who finds a message in a bottle."),
    ("story", "Tell me a bedtime story about a small dragon who is afraid of the dark."),
    ("story", "Write the opening paragraph of a mystery novel set in a snowy mountain village."),
    ("story", "Write a short story in which two old friends meet again at a train station."),
    ("story", "Describe a busy market in a coastal town on a summer morning."),
    ("story", "Write a fable about a fox and a crow, with a moral at the end."),
    ("dialogue", "Write a conversation between a customer and a shop assistant about returning shoes "
                 "that do not fit."),
    ("dialogue", "Write a dialogue between a teacher and a student who has not done their homework."),
    ("dialogue", "Write a phone call in which two friends plan a weekend camping trip."),
    ("dialogue", "Write a scene in which a detective questions a nervous witness."),
    ("dialogue", "Write a short interview with a baker about how she starts her day."),
    ("chat", "Hi! How are you today?"),
    ("chat", "I feel a bit stressed about my exams next week. Any advice?"),
    ("chat", "Can you recommend a good book for a long flight?"),
    ("chat", "What should I cook tonight? I have rice, eggs and some vegetables."),
    ("instructions", "How do I change a flat tyre on a bicycle? Give step-by-step instructions."),
    ("instructions", "Explain how to plant tomatoes in a small garden."),
    ("instructions", "Give me a simple recipe for pancakes."),
    ("instructions", "How can I improve my sleep? List some practical tips."),
    ("instructions", "Write an email to my landlord asking to fix the heating."),
    ("instructions", "Write a polite note to a neighbour about a noisy party."),
    ("facts", "Why is the sky blue?"),
    ("facts", "Explain how vaccines work in simple terms."),
    ("facts", "What causes the seasons on Earth?"),
    ("facts", "Tell me about the history of the printing press."),
    ("facts", "What is photosynthesis?"),
    ("facts", "Describe the water cycle."),
    ("facts", "What were the main causes of the First World War?"),
    ("facts", "How does a refrigerator keep food cold?"),
    ("opinion", "What are the advantages and disadvantages of working from home?"),
    ("opinion", "Write a short review of a restaurant you enjoyed."),
    ("opinion", "Should cities ban cars from their centres? Give arguments for both sides."),
    ("summary", "Summarise the plot of Romeo and Juliet in a few sentences."),
    ("poem", "Write a poem about autumn leaves."),
    ("poem", "Write a limerick about a cat who loves to sleep."),
    ("math", "A train travels 120 kilometres in 1.5 hours. What is its average speed? Explain."),
    ("math", "If I save 15 dollars a week, how long will it take to save 600 dollars?"),
    ("code", "Write a Python function that checks whether a string is a palindrome."),
    ("code", "Write a Python script that counts the words in a text file."),
    ("code", "Explain what a for loop is, with an example in Python."),
    ("code", "Write a JavaScript function that returns the largest number in an array."),
    ("code", "Write an SQL query that lists the ten customers with the most orders."),
    ("code", "How do I read a CSV file with Python? Show an example."),
    ("code", "Write a bash command that finds all .txt files larger than 1 MB."),
)

# Held apart for choosing the refactoring's knobs (scripts/quality_domains.py --dev); never
# calibration, never evaluation.
DEV_PROMPTS: tuple[tuple[str, str], ...] = (
    ("story", "Write a short story about a girl who builds a kite with her grandfather."),
    ("story", "Describe a thunderstorm over a quiet farm at night."),
    ("dialogue", "Write a conversation between a doctor and a patient who has a sore throat."),
    ("dialogue", "Write a dialogue between two roommates deciding who does the dishes."),
    ("chat", "Hello! Can you help me plan a birthday party for my sister?"),
    ("instructions", "How do I make a good cup of tea?"),
    ("instructions", "Write a cover letter for a job as a library assistant."),
    ("facts", "How do airplanes stay in the air?"),
    ("facts", "What is the difference between weather and climate?"),
    ("opinion", "Is it better to rent or to buy a home?"),
    ("code", "Write a Python class for a simple bank account with deposit and withdraw methods."),
    ("code", "Explain recursion with a short example."),
)
PROMPT_SETS = {"calib": SEED_PROMPTS, "dev": DEV_PROMPTS}


@dataclass(frozen=True)
class GenerationRecipe:
    """How calibration text is generated; every field is part of the cache key."""

    tokens: int  # tokens of text to write (prompts and replies)
    seed: int = 0
    prompts: str = "calib"  # a PROMPT_SETS key
    temperature: float = 0.8
    top_p: float = 0.95
    reply_tokens: int = 160  # longest reply

    def __post_init__(self) -> None:
        if self.prompts not in PROMPT_SETS:
            raise ConfigError(f"invalid prompt set '{self.prompts}': use one of {', '.join(PROMPT_SETS)}")
        if self.tokens < 0 or self.reply_tokens < 1:
            raise ConfigError(f"invalid generation budget {self.tokens} tokens ({self.reply_tokens} per "
                              "reply): use 0 or more tokens and 1 or more per reply")

    def key(self, model_sha256: str) -> str:
        """Cache key: the model's file hash, the recipe and its prompts."""
        rec = {"version": RECIPE_VERSION, "model": model_sha256, **asdict(self),
               "prompt_text": PROMPT_SETS[self.prompts]}
        return hashlib.sha256(json.dumps(rec, sort_keys=True).encode()).hexdigest()


def cache_dir() -> Path:
    """Where generated calibration text is kept: ``calibration/`` in the cache of built prism
    checkpoints (``$EDGE_PRISM_CACHE``, else the user cache)."""
    return cache_root() / "calibration"


def generated_text(model: Path, model_sha256: str, recipe: GenerationRecipe, *, progress: bool = True) -> str:
    """The text ``model`` writes under ``recipe``: read from the cache, else generated and cached.

    A cache entry that cannot be read or does not match its checksum is generated again; a
    cache that cannot be written only costs the next run the generation (logged).
    """
    if recipe.tokens == 0:
        return ""
    key = recipe.key(model_sha256)
    path = cache_dir() / f"{key[:32]}.json"
    text = _read_cached(path, key)
    if text is not None:
        log.info("calibration text from %s", path)
        return text
    text = _generate(model, recipe, progress=progress)
    _write_cached(path, key, recipe, text)
    return text


def _generate(model: Path, recipe: GenerationRecipe, *, progress: bool) -> str:
    # A small model runs fully resident, as load() builds it; a larger one streams its
    # experts from the files (bounded memory: refactor.stream.source_engine).
    engine = source_engine(model)
    try:
        return _write(engine, recipe, progress=progress)
    finally:
        engine.close()


def _write(engine, recipe: GenerationRecipe, *, progress: bool) -> str:
    tok = engine.tokenizer
    chat = bool(tok.chat_template)
    prompts = PROMPT_SETS[recipe.prompts]
    texts, made = [], 0
    bar = tqdm(total=recipe.tokens, desc="writing calibration text", unit="tok", disable=not progress)
    # Round-robin over the prompts until the budget is met; a model that ends every reply at
    # once stops after a few rounds rather than never.
    for i in range(8 * len(prompts)):
        if made >= recipe.tokens:
            break
        _, prompt = prompts[i % len(prompts)]
        ids = tok.encode_chat([{"role": "user", "content": prompt}]) if chat else tok.encode(prompt + "\n\n")
        engine.reset()  # each reply depends on its own prompt and seed only, not on the last one
        reply = engine.generate_ids(ids, max_new_tokens=min(recipe.reply_tokens, recipe.tokens - made),
                                    temperature=recipe.temperature, top_p=recipe.top_p,
                                    seed=recipe.seed * 1_000_003 + i)
        texts.append(f"{prompt}\n\n{tok.decode(reply).strip()}")
        n = min(len(tok.encode(texts[-1] + "\n\n", add_bos=False)), recipe.tokens - made)
        made += n
        bar.update(n)
    bar.close()
    return "\n\n".join(texts)


def _read_cached(path: Path, key: str) -> str | None:
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
        text = rec["text"]
        if rec.get("key") == key and hashlib.sha256(text.encode()).hexdigest() == rec.get("sha256"):
            return text
        log.warning("%s: cached calibration text does not match its key or checksum; generating it again", path)
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("%s: cannot read cached calibration text (%s); generating it again", path, e)
    return None


def _write_cached(path: Path, key: str, recipe: GenerationRecipe, text: str) -> None:
    rec = {"key": key, "recipe": asdict(recipe), "sha256": hashlib.sha256(text.encode()).hexdigest(),
           "text": text}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(rec, f, ensure_ascii=False)
            os.replace(tmp, path)  # concurrent writers write the same bytes; the last rename wins
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        log.warning("cannot cache calibration text in %s (%s); the next refactoring generates it again",
                    path.parent, e)
