"""Quality table: perplexity at every operating point for each solver and gate, one run.

Refactors MODEL once per solver (timed), evaluates held-out text (the stdlib docstrings'
eval split, disjoint from calibration) at every K with each gate, and prints perplexity
ratios to the full model, the usable operating-point counts and the issue's targets.
Writes a JSON and a Markdown table (default: profiles/quality_<model>.{json,md}).

    python scripts/quality_table.py [MODEL] [--solvers anneal,greedy,contiguous] [--max-tokens 4096]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from edge_prism.api import RuntimeConfig, load_with
from edge_prism.evaluate import eval_ids, perplexity, usable_points, QualityRow
from edge_prism.refactor.refactor import RefactorConfig, refactor
from edge_prism.select import max_operating_point


def measure(model: str, solvers: list[str], gates: list[str], max_tokens: int, work: Path) -> dict:
    """Refactor per solver and evaluate every K per gate."""
    out: dict = {"model": model, "solvers": {}, "max_tokens": max_tokens}
    for solver in solvers:
        prism = work / f"{solver}.prism"
        t0 = time.perf_counter()
        report = refactor(model, prism, RefactorConfig(solver=solver), force=True, progress=False)
        seconds = time.perf_counter() - t0
        engine = load_with(prism, RuntimeConfig(device="cpu"))
        ids = eval_ids(engine.tokenizer, None, max_tokens)
        full = max_operating_point(engine.spec, engine.model.parts)
        full_ppl = perplexity(engine, ids)
        entry = {"refactor_s": seconds, "objective_per_token": report.objective, "full_k": full,
                 "full_perplexity": full_ppl, "gates": {}}
        for gate in gates:
            rows = [QualityRow(full, full_ppl, "prism", tokens=ids.numel())]
            e = load_with(prism, RuntimeConfig(device="cpu", gate=gate))  # one load, every K
            for k in range(full - 1, 0, -1):
                e.set_operating_point(k)
                rows.append(QualityRow(k, perplexity(e, ids), "prism", tokens=ids.numel()))
                print(f"{solver:10} {gate:6} K={k:3d} ppl={rows[-1].perplexity:9.3f} "
                      f"x{rows[-1].perplexity / full_ppl:.3f}", file=sys.stderr, flush=True)
            entry["gates"][gate] = {
                "perplexity": {r.operating_point: r.perplexity for r in rows},
                "usable": usable_points(rows, full_ppl=full_ppl),
            }
        out["solvers"][solver] = entry
    return out


def markdown(res: dict) -> str:
    """A Markdown table of perplexity ratios per K."""
    lines = [f"# Quality of {res['model']} (held-out: stdlib docstrings eval split, "
             f"{res['max_tokens']} tokens)", ""]
    for solver, e in res["solvers"].items():
        lines.append(f"## {solver}: full perplexity {e['full_perplexity']:.3f}, refactor {e['refactor_s']:.0f} s, "
                     f"left-out mass/token {e['objective_per_token']}")
        gates = list(e["gates"])
        lines.append("| K | " + " | ".join(f"{g} ppl (x full)" for g in gates) + " |")
        lines.append("|---|" + "---|" * len(gates))
        for k in range(e["full_k"], 0, -1):
            cells = [f"{e['gates'][g]['perplexity'][k]:.3f} (x{e['gates'][g]['perplexity'][k] / e['full_perplexity']:.3f})"
                     for g in gates]
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
        for g in gates:
            lines.append(f"\nusable operating points ({g}): {len(e['gates'][g]['usable'])} {e['gates'][g]['usable']}")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default="default")
    p.add_argument("--solvers", default="anneal,greedy,contiguous")
    p.add_argument("--gates", default="proxy,linear")
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--out", default=None, help="output stem (default profiles/quality_<model>)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        res = measure(args.model, args.solvers.split(","), args.gates.split(","), args.max_tokens, Path(work))
    stem = Path(args.out or Path(__file__).resolve().parents[1] / "profiles" / f"quality_{Path(args.model).stem}")
    for suffix, text in ((".json", json.dumps(res, indent=1)), (".md", markdown(res))):
        tmp = stem.with_name(stem.name + suffix + ".tmp")
        tmp.write_text(text + "\n")
        os.replace(tmp, stem.with_name(stem.name + suffix))
    print(markdown(res))
    solvers = res["solvers"]
    if "anneal" in solvers and "contiguous" in solvers:
        for g in solvers["anneal"]["gates"]:
            k = round(0.75 * solvers["anneal"]["full_k"])
            a = solvers["anneal"]["gates"][g]["perplexity"][k] / solvers["anneal"]["full_perplexity"]
            c = solvers["contiguous"]["gates"][g]["perplexity"][k] / solvers["contiguous"]["full_perplexity"]
            print(f"K={k} ({g}): anneal x{a:.3f}, contiguous x{c:.3f}; anneal's perplexity increase is "
                  f"{1 - (a - 1) / (c - 1):.0%} lower than contiguous's; anneal ppl {1 - a / c:.0%} lower")
    return 0


if __name__ == "__main__":
    sys.exit(main())
