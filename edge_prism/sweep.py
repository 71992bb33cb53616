"""The memory-budget sweep: decode speed and memory traffic of each system at each budget.

budgets x operating points -> per system: [the same model, that system's expert store] ->
warm-up -> greedy decode of the same prompts -> SweepRow -> table with ratios, CSV, PNG

Systems, all over the same prism checkpoint (or synthetic model) and budget:

- ``edge-prism``: our BudgetedStore (pinned hot region + LRU region), no prefetch;
  ``edge-prism+prefetch`` as well when ``load()`` takes ``prefetch``.
- ``subexpert-lru``: sub-expert LRU over every slot, no pinned region, no prefetch (the
  MoE-Prism paper's offloading manager). Ratios are printed against it.
- ``expert-lru``: whole experts are the unit of residency, LRU, no prefetch (the policy of
  mixtral-offloading): a miss on any part of an expert loads all of its parts.
- ``all-resident``: every sub-expert on the device (no budget).
- ``transformers+accelerate``: transformers with accelerate offloading under the same
  budget; CUDA only (skipped, with a note, on the CPU).
- ``bound``: max(compute, missed bytes / bandwidth) per token, where compute is the
  all-resident token latency and the missed bytes are edge-prism's; the bandwidth is
  measured host-to-device (on the CPU: memcpy, what moving a block into a slot costs there).

One module per job; this one runs the jobs in order and is the command line:

- ``sweep_config``: SweepConfig (what is measured), SweepRow (what is recorded)
- ``sweep_subjects``: the model swept (prism checkpoint or synthetic) and its engines
- ``sweep_measure``: timing and traffic of one engine; KL and greedy agreement against another
- ``sweep_baselines``: the baseline stores, transformers + accelerate, the bandwidth bound
- ``sweep_report``: table, CSV, plot
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from edge_prism.cliargs import add_model_args
from edge_prism.errors import BudgetError, ConfigError, EdgePrismError
from edge_prism.runtime.sizes import parse_size
from edge_prism.select import check_operating_point
from edge_prism.sweep_baselines import (ExpertLRUStore, SubExpertLRUStore, bound_rows, transformers_rows,
                                        whole_expert_blocks)
from edge_prism.sweep_config import ALL, SYSTEMS, SweepConfig, SweepRow
from edge_prism.sweep_measure import device_label, lockstep_quality, measure, release
from edge_prism.sweep_report import format_table, plot, write_csv
from edge_prism.sweep_subjects import Subject, open_subject
from edge_prism.synthetic import SyntheticConfig

log = logging.getLogger(__name__)


# -- the sweep ---------------------------------------------------------------------------------
def run_sweep(model: str | Path | None = None, *, memory_budgets: Sequence[str],
              operating_points: Sequence[int] | None = None, new_tokens: int = 32, prompt_tokens: int = 64,
              device: str = "auto", dtype: str | None = None, repeats: int = 1, baselines: bool = True,
              policy: str = "lru", synthetic: SyntheticConfig | None = None, threads: int | None = None,
              progress: bool = False) -> list[SweepRow]:
    """Measure every system at every memory budget and operating point; the rows.

    ``model``: a prism checkpoint (or 'default' / None: the default model's, built on first
    use). ``synthetic``: sweep that synthetic model instead (``model`` must then be None).
    """
    cfg = SweepConfig(memory_budgets=tuple(memory_budgets),
                      operating_points=None if operating_points is None else tuple(operating_points),
                      new_tokens=new_tokens, prompt_tokens=prompt_tokens, device=device, dtype=dtype,
                      repeats=repeats, baselines=baselines, policy=policy, synthetic=synthetic,
                      threads=threads, progress=progress)
    return sweep_with(model, cfg)


def sweep_with(model: str | Path | None, cfg: SweepConfig) -> list[SweepRow]:
    """run_sweep() with a ready SweepConfig."""
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        # On a CPU shared with other work, fewer compute threads than cores avoids stalls
        # of a whole token on a descheduled thread.
        torch.set_num_threads(cfg.threads)
    try:
        return _sweep(model, cfg)
    finally:
        torch.set_num_threads(threads)


def _sweep(model: str | Path | None, cfg: SweepConfig) -> list[SweepRow]:
    subject = open_subject(model, cfg)
    points = list(cfg.operating_points or [subject.full])
    for k in points:
        check_operating_point(k, subject.spec, subject.parts)
    prompts = subject.prompts(cfg.repeats + 1, cfg.prompt_tokens)
    warm, prompts = prompts[-1], prompts[:-1]
    dev = device_label(subject.device)
    common = dict(synthetic=subject.synthetic, device=dev, model=subject.name)
    systems = ["edge-prism", "edge-prism+prefetch"]
    if cfg.baselines:
        systems += ["subexpert-lru", "expert-lru"]
    jobs = [(k, ALL, "all-resident") for k in points if cfg.baselines]
    jobs += [(k, b, s) for k in points for b in cfg.memory_budgets for s in systems]
    rows: list[SweepRow] = []
    bar = tqdm(jobs, desc="sweep", unit="run", disable=not cfg.progress)
    for k, budget, system in bar:
        bar.set_postfix_str(f"K={k} {budget} {system}")
        rows.append(_run_one(subject, cfg, system, budget, k, prompts, warm, common))
    if not subject.synthetic:
        rows += _latency_rows(subject, cfg, rows, prompts, warm, common)
    if cfg.baselines:
        rows += transformers_rows(subject, cfg, points, prompts, common)
        rows += bound_rows(subject, rows, common)
    order = {s: i for i, s in enumerate(SYSTEMS)}
    budgets = {b: i for i, b in enumerate([ALL, *cfg.memory_budgets])}
    rows.sort(key=lambda r: (-r.operating_point, budgets.get(r.memory_budget, len(budgets)),
                             order.get(r.system, len(order))))
    return rows


def _run_one(subject: Subject, cfg: SweepConfig, system: str, budget: str, k: int, prompts, warm,
             common: dict) -> SweepRow:
    nbytes = None
    try:
        if system == "all-resident":
            engine = subject.resident(k)
        else:
            nbytes = subject.budget_bytes(budget, k)
            if system in ("edge-prism", "edge-prism+prefetch"):
                engine = subject.ours(budget, k, prefetch=system.endswith("prefetch"))
            elif system == "subexpert-lru":
                engine = subject.with_store(SubExpertLRUStore, subject.layer_blocks(k), budget, k)
            else:
                layers = whole_expert_blocks(subject.layer_blocks(k), subject.spec, k)
                engine = subject.with_store(ExpertLRUStore, layers, budget, k)
    except (BudgetError, torch.OutOfMemoryError) as e:
        log.warning("%s at %s, K=%d: %s", system, budget, k, e)
        return SweepRow(system, budget, k, None, None, None, None, None, None, subject.perplexity(k),
                        budget_bytes=nbytes, note=f"not run: {e}", **common)
    try:
        m = measure(engine, prompts, warm, cfg.new_tokens)
    finally:
        release(engine)
    return SweepRow(system, budget, k, m.tokens_per_s, m.ttft_s, m.hit_rate, m.bytes_per_token, m.p50_ms,
                    m.p99_ms, subject.perplexity(k), budget_bytes=nbytes, tokens=m.tokens, **common)


def _latency_rows(subject: Subject, cfg: SweepConfig, rows: list[SweepRow], prompts, warm,
                  common: dict) -> list[SweepRow]:
    """edge-prism under token-latency budgets of ``cfg.latency_factors`` x its unconstrained p50."""
    out = []
    base_system = "edge-prism+prefetch"
    for base in [r for r in rows if r.system == base_system and r.p50_ms]:
        reference = subject.resident(base.operating_point)
        for factor in cfg.latency_factors:
            budget_ms = factor * base.p50_ms
            engine = subject.ours(base.memory_budget, base.operating_point, prefetch=True,
                                  token_latency_ms=budget_ms)
            try:
                m = measure(engine, prompts, warm, cfg.new_tokens)
                kl, same = lockstep_quality(engine, reference, prompts[0], cfg.new_tokens)
            finally:
                release(engine)
            out.append(SweepRow(
                f"edge-prism+latency x{factor:g}", base.memory_budget, base.operating_point, m.tokens_per_s,
                m.ttft_s, m.hit_rate, m.bytes_per_token, m.p50_ms, m.p99_ms,
                subject.perplexity(base.operating_point), budget_bytes=base.budget_bytes, tokens=m.tokens,
                latency_budget_ms=budget_ms, within_budget=m.within_budget, dropped_per_token=m.dropped_per_token,
                kl_vs_full=kl, same_tokens=same, note=f"token-latency budget {factor:g} x unconstrained p50",
                **common))
        release(reference)
    return out


# -- command line ------------------------------------------------------------------------------
def _budgets(text: str) -> tuple[str, ...]:
    out = tuple(b.strip() for b in text.split(",") if b.strip())
    for b in out:
        parse_size(b, total=100, what="memory budget")  # fail before any slow work
    if not out:
        raise ConfigError(f"invalid --memory-budgets '{text}': use a list like 10%,25%,50%,100%")
    return out


def _points(text: str | None) -> tuple[int, ...] | None:
    if text is None or text.strip().lower() == "full":
        return None
    try:
        return tuple(dict.fromkeys(int(p) for p in text.split(",") if p.strip()))
    except ValueError:
        raise ConfigError(f"invalid --operating-points '{text}': use integers like 16,12 or 'full'") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The sweep's options (shared by `edge-prism sweep` and scripts/sweep.py)."""
    add_model_args(p, positional=True)
    p.add_argument("--memory-budgets", default="10%,25%,50%,100%",
                   help="comma-separated budgets of resident sub-expert bytes (25%%, 512MiB, ...)")
    p.add_argument("--operating-points", default=None,
                   help="comma-separated K values (default: full K only)")
    p.add_argument("-n", "--max-new-tokens", type=int, default=32, help="greedy tokens decoded per prompt")
    p.add_argument("--prompt-tokens", type=int, default=64, help="prompt length in tokens")
    p.add_argument("--repeats", type=int, default=1, help="prompts per measurement (different text windows)")
    p.add_argument("--policy", default="lru", choices=("lru", "lfu"), help="edge-prism's dynamic region")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU compute threads during the sweep (default: torch's, one per core)")
    p.add_argument("--no-baselines", action="store_true", help="measure edge-prism only")
    p.add_argument("-o", "--out", default=None, help="write the rows to this CSV file")
    p.add_argument("--plot", default=None, help="write a PNG plot to this file")
    syn = p.add_argument_group("synthetic model (random weights at real shapes; no download)")
    syn.add_argument("--synthetic", default=None, metavar="PRESET|CONFIG.json",
                     help="olmoe-1b-7b, qwen3-30b-a3b, or a Hugging Face config.json (instead of MODEL)")
    syn.add_argument("--layers", type=int, default=None, help="run only this many layers of the shape")
    syn.add_argument("--sub-experts", type=int, default=None, help="sub-experts per expert (default 8)")
    syn.add_argument("--skew", type=float, default=0.0, help="routing skew: 0 uniform, larger = Zipf-like")
    syn.add_argument("--seed", type=int, default=0, help="weight seed")


def cmd_sweep(args: argparse.Namespace) -> int:
    """Run the sweep the options describe; print the table, write the CSV and plot."""
    syn = None
    if args.synthetic is not None:
        syn = SyntheticConfig(model=args.synthetic, layers=args.layers, sub_experts=args.sub_experts,
                              skew=args.skew, seed=args.seed)
    elif args.layers is not None or args.sub_experts is not None:
        raise ConfigError("--layers and --sub-experts apply to --synthetic models only")
    model = None if syn is not None and args.model == "default" else args.model
    rows = run_sweep(model, memory_budgets=_budgets(args.memory_budgets),
                     operating_points=_points(args.operating_points), new_tokens=args.max_new_tokens,
                     prompt_tokens=args.prompt_tokens, device=args.device, dtype=args.dtype,
                     repeats=args.repeats, baselines=not args.no_baselines, policy=args.policy,
                     synthetic=syn, threads=args.threads, progress=True)
    print(format_table(rows))
    if args.out:
        write_csv(rows, args.out)
        print(f"wrote {args.out}", file=sys.stderr)
    if args.plot:
        plot(rows, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def add_sweep_parser(subparsers) -> Callable[[argparse.Namespace], int]:
    """Add the ``sweep`` subcommand to ``subparsers``; returns its handler."""
    p = subparsers.add_parser(
        "sweep", help="decode speed and memory traffic per memory budget, against baselines",
        description="Measure tokens/s, time to first token, hit rate, bytes moved per token and "
                    "token latency at each memory budget and operating point, for edge-prism and the "
                    "baselines (sub-expert LRU, expert LRU, all-resident, the bandwidth bound) on the "
                    "same model and prompts; print ratios, write a CSV and a plot.")
    add_arguments(p)
    return cmd_sweep


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point (scripts/sweep.py): the same options as `edge-prism sweep`."""
    p = argparse.ArgumentParser(prog="sweep.py", description="The memory-budget sweep of edge-prism.")
    p.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    add_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return cmd_sweep(args)
    except EdgePrismError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


__all__ = ["run_sweep", "sweep_with", "add_arguments", "cmd_sweep", "add_sweep_parser", "main"]
