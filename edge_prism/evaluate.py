"""Quality: perplexity on held-out text at each operating point, and the top-k' baseline."""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from edge_prism.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QualityRow:
    """One point of a quality curve."""

    operating_point: int  # active sub-experts per token per MoE layer
    perplexity: float
    curve: str  # "prism" (sub-expert gate) or "top-k" (original model routed to fewer experts)
    top_k: int | None = None  # experts routed to (top-k rows)
    tokens: int = 0

    def as_dict(self) -> dict:
        """JSON-ready dict."""
        return asdict(self)


def eval_ids(tokenizer, text_file: Path | None, max_tokens: int) -> torch.Tensor:
    """Evaluation token ids [T] from ``text_file`` or the stdlib docstrings' eval split
    (other held-out domains: ``corpus.heldout_text``, written to a file by
    scripts/quality_domains.py)."""
    from edge_prism.refactor.corpus import stdlib_text

    if text_file is None:
        text = stdlib_text("eval")
    else:
        try:
            text = Path(text_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{text_file}: cannot read evaluation text ({e}); give a UTF-8 text file") from None
    ids = tokenizer.encode(text, add_bos=False)[:max_tokens]
    if len(ids) < 2:
        raise ConfigError(f"{text_file or 'evaluation text'}: only {len(ids)} tokens; give more text")
    return torch.tensor(ids)


def perplexity(engine, ids: torch.Tensor, *, seq_len: int = 512, progress: bool = False,
               desc: str = "perplexity") -> float:
    """exp(mean NLL) of ``ids`` in independent windows of ``seq_len`` tokens."""
    nll, count = 0.0, 0
    seq_len = min(seq_len, engine.max_context - 1)
    windows = [w for w in ids.split(seq_len) if w.numel() > 1]
    for w in tqdm(windows, desc=desc, unit="win", disable=not progress, leave=False):
        logits = engine.logits(w)  # [T, V]
        nll += float(F.cross_entropy(logits[:-1].float(), w[1:], reduction="sum"))
        count += w.numel() - 1
    engine.reset()
    return math.exp(nll / count)


def parse_points(text: str, full: int) -> list[int]:
    """'all' or 'K,K,...' -> sorted operating points, each in 1..full."""
    if text.strip().lower() == "all":
        return list(range(1, full + 1))
    try:
        points = sorted({int(p) for p in text.split(",") if p.strip()})
    except ValueError:
        raise ConfigError(f"invalid operating points '{text}': use 'all' or integers like 4,8,12") from None
    bad = [p for p in points if not 1 <= p <= full]
    if bad or not points:
        raise ConfigError(f"invalid operating point {bad[0] if bad else text!r}: use values in 1..{full}")
    return points


def usable_points(rows: Iterable[QualityRow], *, full_ppl: float, tolerance: float = 1.25) -> list[int]:
    """Operating points within ``tolerance`` x the full model's perplexity and no worse than
    the next larger point of the same curve (a usable, monotone knob)."""
    rows = sorted(rows, key=lambda r: r.operating_point)
    out = []
    for i, r in enumerate(rows):
        nxt = rows[i + 1].perplexity if i + 1 < len(rows) else r.perplexity
        if r.perplexity <= tolerance * full_ppl and r.perplexity >= nxt - 1e-9:
            out.append(r.operating_point)
    return out


def evaluate_model(model, cfg, *, text_file: Path | None = None, points: str = "all",
                   max_tokens: int = 4096, baseline: bool = True,
                   progress: bool = True) -> tuple[list[QualityRow], dict[str, list[int]]]:
    """Quality rows for ``model`` (prism: every requested K; plain: the full model only),
    plus the top-k' baseline of MoE models, and the usable operating points per curve."""
    from edge_prism.api import default_prism, load_with
    from edge_prism.refactor.prism import is_prism, write_json_atomic
    from edge_prism.select import max_operating_point

    if model in (None, "default"):
        model = default_prism(progress=progress)
    engine = load_with(model, cfg)
    spec, parts = engine.spec, engine.model.parts
    ids = eval_ids(engine.tokenizer, text_file, max_tokens)
    full = max_operating_point(spec, parts)
    prism = is_prism(engine.source)
    rows: list[QualityRow] = []
    wanted = parse_points(points, full) if prism else [full]
    for k in tqdm(sorted(wanted, reverse=True), desc="operating points", disable=not progress):
        if prism:
            engine.set_operating_point(k)  # one loaded model for every point
        rows.append(QualityRow(k, perplexity(engine, ids), "prism", tokens=ids.numel()))
    if prism:
        engine.set_operating_point(full)
    if baseline and spec.is_moe:
        top_k = max(f.top_k for f in spec.ffn if f.routed)
        per_expert = max(parts[i] for i, f in enumerate(spec.ffn) if f.routed)
        for kk in range(1, top_k + 1):
            with engine.model.routing_top_k(kk):
                rows.append(QualityRow(kk * per_expert, perplexity(engine, ids), "top-k", top_k=kk,
                                       tokens=ids.numel()))
    rows.sort(key=lambda r: (r.curve, r.operating_point))
    full_ppl = next(r.perplexity for r in rows if r.curve == "prism" and r.operating_point == full)
    usable = {c: usable_points([r for r in rows if r.curve == c], full_ppl=full_ppl)
              for c in sorted({r.curve for r in rows})}
    if prism and text_file is None:
        write_json_atomic(engine.source / "quality.json", [r.as_dict() for r in rows])
    return rows, usable
