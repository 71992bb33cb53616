"""Graceful degradation, judged against the fixed knob: a token-latency budget (the planner
drops sub-experts per token) against the best fixed operating point whose median token
latency meets the same budget, on the same held-out tokens, in one run.

held-out tokens -> prompt + forced continuation (teacher forcing: every row decodes the
same tokens) -> per decode step: latency, next-token distribution
    reference  full K, same memory budget, no latency budget (the undegraded model)
    fixed K    every K in a list: p50 latency, KL from the reference, greedy agreement
    dynamic    full K + token_latency_ms = b, for budgets b between the fastest fixed K's
               p50 and the reference's: share within b, drops per token, KL, agreement
-> rows, and for each b beside the dynamic row the best fixed K two ways: the largest K whose
   p50 <= b (half its tokens may miss b), and the largest K with at least WITHIN of its
   tokens within b (what the dynamic row is held to).

KL is mean KL(reference || degraded) over the decoded positions; greedy agreement is the
share of positions whose most likely token is the reference's.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DegradeConfig:
    """What one comparison runs."""

    model: str | Path | None = None  # a prism checkpoint (None: the default model's)
    memory_budget: str | None = "25%"
    prompt_tokens: int = 32
    decode_tokens: int = 96
    warmup_tokens: int = 16
    operating_points: tuple[int, ...] = ()  # () : every K from full down to a quarter of it
    budgets: int = 6  # latency budgets between the fastest fixed K's p50 and the reference's
    extra_budgets: tuple[float, ...] = (0.7,)  # also these fractions of the reference's p50
    prefetch: bool | None = None  # None: the runtime's default for the device
    device: str = "cpu"


@dataclass
class DegradeRow:
    """One configuration's measurement."""

    kind: str  # "reference" | "fixed" | "dynamic"
    operating_point: int
    latency_budget_ms: float | None
    p50_ms: float
    p90_ms: float
    within_budget: float | None
    dropped_per_token: float
    kl: float
    agreement: float
    best_fixed_k: int | None = None  # dynamic rows: the best fixed K meeting the same budget
    best_fixed_kl: float | None = None
    best_fixed_agreement: float | None = None
    best_within_k: int | None = None  # dynamic rows: the best fixed K with WITHIN of its tokens within budget
    best_within_kl: float | None = None
    best_within_agreement: float | None = None

    def as_dict(self) -> dict:
        """JSON-ready."""
        return asdict(self)


def heldout_ids(tokenizer, count: int) -> list[int]:
    """``count`` token ids of held-out text (the stdlib docstrings' eval split)."""
    from edge_prism.refactor.corpus import stdlib_text

    return tokenizer.encode(stdlib_text("eval"), add_bos=False)[1000:1000 + count]


@torch.inference_mode()
def forced_run(engine, ids: list[int], prompt: int, warmup: int) -> tuple[list[float], torch.Tensor]:
    """Teacher-forced decode: (decode step latencies in s, log-probabilities [N, V]) of the
    positions after ``prompt``; the first ``warmup`` steps are run but not returned."""
    model = engine.model
    engine.reset()
    model.forward(torch.tensor(ids[:prompt]))
    lat, logps = [], []
    for i in range(prompt, len(ids)):
        t = time.perf_counter()
        logits = model.forward(torch.tensor([ids[i]]))[-1]  # predicts position i + 1
        lat.append(time.perf_counter() - t)
        logps.append(F.log_softmax(logits.float(), dim=-1))
    engine.reset()
    return lat[warmup:], torch.stack(logps[warmup:])


def _quality(ref: torch.Tensor, got: torch.Tensor) -> tuple[float, float]:
    """(mean KL(ref || got), share of equal argmax)."""
    kl = (ref.exp() * (ref - got)).sum(-1).mean()
    return float(kl), float((ref.argmax(-1) == got.argmax(-1)).float().mean())


WITHIN = 0.95  # the share of decode tokens a latency budget is met for (issue 10's target)


def within(lat: list[float], budget_s: float) -> float:
    """The share of ``lat`` (seconds) within ``budget_s``."""
    return sum(t <= budget_s for t in lat) / len(lat)


def _row(kind: str, k: int, budget_s: float | None, lat: list[float], ref, got, engine) -> DegradeRow:
    kl, agree = _quality(ref, got)
    p50 = statistics.median(lat)
    p90 = sorted(lat)[int(0.9 * (len(lat) - 1))]
    stats = engine.model.planner.report(lat) if engine.model.planner is not None else {}
    share = None if budget_s is None else within(lat, budget_s)
    return DegradeRow(kind, k, None if budget_s is None else budget_s * 1000, p50 * 1000, p90 * 1000, share,
                      stats.get("dropped_subexperts_per_token", 0.0), kl, agree)


def compare(cfg: DegradeConfig, *, progress=print) -> list[DegradeRow]:
    """Every row of the comparison (see the module docstring)."""
    import edge_prism
    from edge_prism.api import default_prism
    from edge_prism.select import max_operating_point

    path = cfg.model or default_prism()
    common = dict(memory_budget=cfg.memory_budget, prefetch=cfg.prefetch, device=cfg.device)
    engine = edge_prism.load(path, **common)
    full = max_operating_point(engine.spec, engine.model.parts)
    points = cfg.operating_points or tuple(range(full, max(1, full // 4) - 1, -1))
    ids = heldout_ids(engine.tokenizer, cfg.prompt_tokens + cfg.warmup_tokens + cfg.decode_tokens)
    prompt = cfg.prompt_tokens
    lat_ref, ref = forced_run(engine, ids, prompt, cfg.warmup_tokens)
    rows = [_row("reference", full, None, lat_ref, ref, ref, engine)]
    progress(f"reference K={full}: p50 {rows[0].p50_ms:.1f} ms")
    fixed, fixed_lat = [], {}
    for k in points:
        if k == full:
            fixed.append(DegradeRow("fixed", k, None, rows[0].p50_ms, rows[0].p90_ms, None, 0.0, 0.0, 1.0))
            fixed_lat[k] = lat_ref
            continue
        engine.set_operating_point(k)
        lat, got = forced_run(engine, ids, prompt, cfg.warmup_tokens)
        fixed.append(_row("fixed", k, None, lat, ref, got, engine))
        fixed_lat[k] = lat
        progress(f"fixed K={k}: p50 {fixed[-1].p50_ms:.1f} ms, KL {fixed[-1].kl:.4f}")
    engine.close()
    rows += fixed
    fastest = min(r.p50_ms for r in fixed)
    ref_p50 = rows[0].p50_ms
    budgets = [fastest + (ref_p50 - fastest) * i / max(cfg.budgets - 1, 1) for i in range(cfg.budgets)]
    budgets += [ref_p50 * f for f in cfg.extra_budgets]
    for b in sorted(set(round(b, 3) for b in budgets)):
        dyn = edge_prism.load(path, token_latency_ms=b, **common)
        lat, got = forced_run(dyn, ids, prompt, cfg.warmup_tokens)
        row = _row("dynamic", full, b / 1000, lat, ref, got, dyn)
        dyn.close()
        meeting = [r for r in fixed if r.p50_ms <= b]
        if meeting:
            best = max(meeting, key=lambda r: r.operating_point)
            row.best_fixed_k, row.best_fixed_kl, row.best_fixed_agreement = best.operating_point, best.kl, best.agreement
        held = [r for r in fixed if within(fixed_lat[r.operating_point], b / 1000) >= WITHIN]
        if held:
            best = max(held, key=lambda r: r.operating_point)
            row.best_within_k, row.best_within_kl, row.best_within_agreement = best.operating_point, best.kl, best.agreement
        rows.append(row)
        progress(f"budget {b:.1f} ms: within {row.within_budget:.0%}, KL {row.kl:.4f} "
                 f"(best fixed K={row.best_fixed_k}: {row.best_fixed_kl})")
    return rows


def table(rows: list[DegradeRow]) -> str:
    """Markdown: the fixed operating points, then each latency budget with the best fixed K beside it."""
    out = ["| fixed K | p50 ms | p90 ms | KL from full | greedy agreement |", "|---|---|---|---|---|"]
    for r in rows:
        if r.kind in ("reference", "fixed") and not (r.kind == "fixed" and r.kl == 0.0 and r.agreement == 1.0
                                                        and r.operating_point == rows[0].operating_point):
            out.append(f"| {r.operating_point}{' (reference)' if r.kind == 'reference' else ''} | {r.p50_ms:.1f} | "
                       f"{r.p90_ms:.1f} | {r.kl:.4f} | {r.agreement:.1%} |")
    out += ["", "| latency budget ms | x ref p50 | within budget | p50 ms | dropped/token | KL dynamic | "
                "agreement dynamic | best fixed K (p50 <= budget) | KL fixed | agreement fixed | "
                f"best fixed K ({WITHIN:.0%} within) | KL fixed | agreement fixed |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    ref_p50 = rows[0].p50_ms
    for r in rows:
        if r.kind != "dynamic":
            continue
        fixed = (f"{r.best_fixed_k} | {r.best_fixed_kl:.4f} | {r.best_fixed_agreement:.1%}" if r.best_fixed_k
                 else "none meets it | | ")
        held = (f"{r.best_within_k} | {r.best_within_kl:.4f} | {r.best_within_agreement:.1%}" if r.best_within_k
                else "none meets it | | ")
        out.append(f"| {r.latency_budget_ms:.1f} | {r.latency_budget_ms / ref_p50:.2f} | {r.within_budget:.1%} | "
                   f"{r.p50_ms:.1f} | {r.dropped_per_token:.1f} | {r.kl:.4f} | {r.agreement:.1%} | {fixed} | {held} |")
    return "\n".join(out)


def plot(rows: list[DegradeRow], path: Path, title: str) -> None:
    """Quality (KL) against the latency budget: dynamic degradation and the best fixed K."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dyn = [r for r in rows if r.kind == "dynamic"]
    fixed = sorted((r for r in rows if r.kind == "fixed"), key=lambda r: r.p50_ms)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot([r.latency_budget_ms for r in dyn], [r.kl for r in dyn], "o-", label="dynamic (latency budget)")
    bx = [r.latency_budget_ms for r in dyn if r.best_fixed_k]
    by = [r.best_fixed_kl for r in dyn if r.best_fixed_k]
    ax.plot(bx, by, "s--", label="best fixed K meeting the budget (p50)")
    wx = [r.latency_budget_ms for r in dyn if r.best_within_k]
    wy = [r.best_within_kl for r in dyn if r.best_within_k]
    ax.plot(wx, wy, "^:", label=f"best fixed K meeting it for {WITHIN:.0%} of tokens")
    for r in fixed:
        ax.annotate(f"K={r.operating_point}", (r.p50_ms, r.kl), fontsize=7, alpha=0.6)
    ax.plot([r.p50_ms for r in fixed], [r.kl for r in fixed], ".", color="gray", label="fixed K at its p50")
    ax.set_xlabel("token latency budget (ms)")
    ax.set_ylabel("KL from the full model (teacher-forced)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
