"""Dynamic degradation under a token-latency budget against the best fixed operating point
meeting the same budget (edge_prism.degrade), on one prism, in one run: a Markdown table,
a JSON of every row, and a plot of quality against the latency budget.

    python scripts/latency_sweep.py [--model PRISM] [--memory-budget 25%] [--decode-tokens 96] \
        [--out profiles/latency_default_cpu]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from edge_prism.degrade import DegradeConfig, compare, plot, table


def main(argv=None) -> int:
    """Run the comparison and write its table, JSON and plot."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="prism checkpoint (default: the default model's)")
    p.add_argument("--memory-budget", default="25%")
    p.add_argument("--decode-tokens", type=int, default=96)
    p.add_argument("--operating-points", default="", help="K,K,... (default: full down to half)")
    p.add_argument("--budgets", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("profiles/latency_default_cpu"))
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = DegradeConfig(model=args.model, memory_budget=args.memory_budget or None,
                        decode_tokens=args.decode_tokens, budgets=args.budgets,
                        operating_points=tuple(int(k) for k in args.operating_points.split(",") if k.strip()))
    start = time.perf_counter()
    rows = compare(cfg)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    head = (f"{cfg.model or 'default model prism'}, memory budget {cfg.memory_budget}, prefetch default, "
            f"{cfg.decode_tokens} teacher-forced decode tokens of held-out stdlib docstrings (after "
            f"{cfg.warmup_tokens} warm-up), {args.threads} threads, {cpu}, torch {torch.__version__}; "
            f"{time.perf_counter() - start:.0f} s")
    text = f"{head}\n\n{table(rows)}\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(f"# Latency budget: dynamic degradation vs fixed operating points\n\n"
                                           f"Command: `python scripts/latency_sweep.py "
                                           f"{' '.join(argv)}`\n\n{text}")
    args.out.with_suffix(".json").write_text(json.dumps([r.as_dict() for r in rows], indent=1))
    plot(rows, args.out.with_suffix(".png"), head[:120])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
