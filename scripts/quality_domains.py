"""Quality per held-out domain: the old calibration (stdlib docstrings) against the new one
(the model's own replies to fixed prompts + docstrings), for each partition solver.

Writes each held-out domain (edge_prism.refactor.corpus.heldout_text: docstrings, licenses,
reference, dialogue, code; none seen by calibration) to a text file, refactors MODEL once per
(calibration, solver) (timed; the first new-calibration run includes writing its text, in a
fresh cache), then runs `edge-prism eval PRISM --text-file DOMAIN.txt --operating-points all
--json` per prism and domain, and writes a Markdown table and a JSON of the perplexity at every
K, the ratio to the full model, the usable operating points and the issue's targets
(default: profiles/quality_domains_<model>.{md,json}).

    python scripts/quality_domains.py [MODEL] [--solvers anneal,contiguous] [--max-tokens 1024]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from edge_prism.evaluate import QualityRow, usable_points
from edge_prism.refactor.corpus import DOMAINS, heldout_text
from edge_prism.refactor.refactor import RefactorConfig, refactor

CALIBRATIONS = {
    # The defaults before issue 10: docstrings only, 2048 rows per expert, activation mass.
    "old": ("stdlib docstrings (calib split), 8192 tokens, 2048 rows/expert, activation mass",
            RefactorConfig(generated_share=0.0, rows_per_expert=2048, mass="activation")),
    "new": ("4096 tokens of the model's own replies to fixed prompts + 4096 of stdlib docstrings, "
            "4096 rows/expert, output mass (the defaults)", RefactorConfig()),
}
TARGET_K12, TOLERANCE = 1.5, 1.25


LAYERS = ("allocated", "uniform")  # each K spread across layers by the measured sensitivity, or K everywhere
# Also on request: "nocomp", allocated with dropped sub-experts adding nothing (--no-compensation).


def eval_cli(prism: Path, text: Path, max_tokens: int, layers: str = "allocated") -> tuple[list[str], list[dict]]:
    """Rows of `edge-prism eval` on one text (the command as a user types it, and its JSON)."""
    args = ["eval", str(prism), "--text-file", str(text), "--operating-points", "all", "--json",
            "--no-baseline", "--max-tokens", str(max_tokens), "--device", "cpu"]
    if layers == "uniform":
        args.append("--uniform-layers")
    if layers == "nocomp":
        args.append("--no-compensation")
    run = subprocess.run([sys.executable, "-c", "import sys; from edge_prism.cli import main; sys.exit(main())",
                          *args], capture_output=True, text=True, check=False)
    if run.returncode:
        raise SystemExit(f"edge-prism {' '.join(args)} failed:\n{run.stderr[-2000:]}")
    return ["edge-prism", *args], json.loads(run.stdout)


def measure(model: str, solvers: list[str], domains: list[str], max_tokens: int, work: Path,
            partial: Path | None = None, calibrations: list[str] = list(CALIBRATIONS),
            cache: Path | None = None, layers: list[str] = list(LAYERS), prism: Path | None = None) -> dict:
    """Refactor per (calibration, solver), evaluate every domain at every K (the results so far
    go to ``partial`` after each domain). ``cache``: reuse its generated text (else a fresh cache,
    and the generation is timed)."""
    texts = {}
    for d in domains:
        texts[d] = work / f"{d}.txt"
        texts[d].write_text(heldout_text(d), encoding="utf-8")
    os.environ["EDGE_PRISM_CACHE"] = str(cache or work / "cache")  # fresh: generated text starts uncached
    res: dict = {"model": model, "max_tokens": max_tokens, "domains": domains, "runs": {}, "machine": _machine(),
                 "generate_s": None if cache else _time_generation(model, CALIBRATIONS["new"][1])}
    for calib in calibrations:
        desc, cfg = CALIBRATIONS[calib]
        for solver, mode in [(s, m) for s in solvers for m in layers]:
            name = f"{calib}-{solver}" + ("" if mode == "allocated" else f"-{mode}")
            built = prism or work / f"{calib}-{solver}.prism"
            if prism is not None:
                made = {"refactor_s": None, "prism": str(prism)}
            elif not built.exists():
                t0 = time.perf_counter()
                report = refactor(model, built, replace(cfg, solver=solver), force=True, progress=True)
                made = {"refactor_s": time.perf_counter() - t0, "calib_tokens": report.calib_tokens}
            else:
                made = {"refactor_s": None, "prism": f"{calib}-{solver}'s, as above"}
            run = {"calibration": desc, "solver": solver, "layers": mode, "domains": {}, **made}
            for d in domains:
                cmd, rows = eval_cli(built, texts[d], max_tokens, mode)
                ppl = {r["operating_point"]: r["perplexity"] for r in rows}
                full = max(ppl)
                usable = usable_points([QualityRow(k, p, "prism") for k, p in ppl.items()], full_ppl=ppl[full],
                                       tolerance=TOLERANCE)
                run["domains"][d] = {"perplexity": ppl, "ratio": {k: p / ppl[full] for k, p in ppl.items()},
                                     "usable": usable,
                                     "command": " ".join(cmd[:2] + [f"{calib}-{solver}.prism"] + cmd[3:])}
                print(f"{name:16} {d:10} K={round(0.75 * full)} x{ppl[round(0.75 * full)] / ppl[full]:.3f} "
                      f"usable {usable}", file=sys.stderr, flush=True)
                res["runs"][name] = run
                if partial is not None:
                    partial.write_text(json.dumps(res, indent=1) + "\n")
    return res


def _time_generation(model: str, cfg: RefactorConfig) -> float:
    """Seconds to write the new calibration's text (first use); the refactorings then read it cached."""
    from edge_prism.loaders import open_checkpoint, resolve_model
    from edge_prism.refactor.prism import hash_files
    from edge_prism.refactor.refactor import generation_recipe
    from edge_prism.refactor.selfgen import generated_text

    path = resolve_model(model)
    t0 = time.perf_counter()
    sha = hash_files([Path(f).resolve() for f in open_checkpoint(path).files])
    generated_text(path, sha, generation_recipe(cfg), progress=True)
    return time.perf_counter() - t0


def _machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": cpu, "cores": os.cpu_count()}


def markdown(res: dict) -> str:
    """Per-domain tables (every K, every run) and a summary against the targets."""
    runs, domains = res["runs"], res["domains"]
    names = list(runs)
    first = next(iter(runs[names[0]]["domains"].values()))["perplexity"]
    full = max(int(k) for k in first)
    k34 = round(0.75 * full)
    lines = [f"# Quality of {res['model']} per held-out domain, old vs new calibration",
             "",
             f"Perplexity of the first {res['max_tokens']} tokens of each domain at every operating point K, "
             f"as a ratio to the full model (K={full}). Usable operating points: within {TOLERANCE}x of full "
             "perplexity and no worse than the next larger K. Machine: "
             f"{res['machine']['cpu']}, {res['machine']['cores']} shared cores.",
             "Produced by `python scripts/quality_domains.py` (per prism and domain it runs the "
             "`edge-prism eval` command listed in the JSON).", "",
             "Domains (none seen by either calibration; sources in `edge_prism/refactor/corpus.py`): "
             "docstrings = stdlib docstrings, eval split; licenses = /usr/share/common-licenses; "
             "reference = Python Language Reference (pydoc_data.topics); dialogue = chatterbot-corpus "
             "(English); code = stdlib source of modules outside the docstring corpus.", "",
             (f"Writing the new calibration text (first use of a model, then cached): {res['generate_s']:.0f} s. "
              if res.get("generate_s") else "Writing the new calibration text: not timed in this run (--cache). ") +
             "Runs: " + "; ".join(f"**{n}**: {r['calibration']}, solver {r['solver']}, "
                                  f"layers {r.get('layers', 'uniform')}, "
                                  + (f"refactor {r['refactor_s']:.0f} s" if r.get("refactor_s") else
                                     f"prism {r.get('prism', 'built by an earlier run')}")
                                  for n, r in runs.items()), "",
             "Layers: *allocated* spreads each K's sub-experts across layers by the layer sensitivity the "
             "refactoring measured on its calibration text (edge_prism/allocation.py; same sub-experts per "
             "token as K in every layer); *uniform* runs every layer at K (`--uniform-layers`); *nocomp* is "
             "allocated with dropped sub-experts adding nothing (`--no-compensation`; the others add back each "
             "dropped sub-expert's mean output on the calibration text).", "",
             f"## Summary at K={k34} (target: at most {TARGET_K12}x on every domain) and usable points "
             "(target: at least 5)", "",
             "| run | " + " | ".join(domains) + " | usable points (fewest over domains) |",
             "|---|" + "---|" * (len(domains) + 1)]
    for n in names:
        d = runs[n]["domains"]  # a run cut short lacks its last domains: "not measured"
        cells = [f"x{d[dom]['ratio'][k34]:.3f} ({len(d[dom]['usable'])})" if dom in d else "not measured"
                 for dom in domains]
        fewest = min((len(d[dom]["usable"]) for dom in domains if dom in d), default=0)
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {fewest} |")
    for dom in domains:
        have = [n for n in names if dom in runs[n]["domains"]]
        lines += ["", f"## {dom}: full perplexity "
                  + ", ".join(f"{n} {runs[n]['domains'][dom]['perplexity'][full]:.3f}" for n in have), "",
                  "| K | " + " | ".join(have) + " |", "|---|" + "---|" * len(have)]
        for k in range(full, 0, -1):
            cells = [f"{runs[n]['domains'][dom]['perplexity'][k]:.2f} (x{runs[n]['domains'][dom]['ratio'][k]:.3f})"
                     for n in have]
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append("usable: " + "; ".join(f"{n} {runs[n]['domains'][dom]['usable']}" for n in have))
    return "\n".join(lines) + "\n"


def _int_keys(res: dict) -> dict:
    """JSON turned K keys into strings: back to ints (for --from-json)."""
    for run in res["runs"].values():
        for d in run["domains"].values():
            for key in ("perplexity", "ratio"):
                d[key] = {int(k): v for k, v in d[key].items()}
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default="default")
    p.add_argument("--solvers", default="anneal,contiguous")
    p.add_argument("--domains", default=",".join(d for d in DOMAINS if d != "docstrings"),
                   help=f"comma-separated, of {', '.join(DOMAINS)} (default: all but the calibration's own "
                        "register, docstrings)")
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--calibrations", default=",".join(CALIBRATIONS), help="comma-separated, of old,new")
    p.add_argument("--cache", default=None, help="reuse the generated text cached in this directory")
    p.add_argument("--layers", default=",".join(LAYERS), help="comma-separated, of allocated,uniform,nocomp")
    p.add_argument("--prism", default=None,
                   help="evaluate this prism checkpoint (built with the new calibration's defaults) instead of "
                        "refactoring; with one solver, the one it was built with")
    p.add_argument("--out", default=None, help="output stem (default profiles/quality_domains_<model>)")
    p.add_argument("--from-json", default=None,
                   help="only rewrite the Markdown from earlier JSONs (comma-separated: their runs are merged, "
                        "e.g. one process per solver)")
    args = p.parse_args(argv)
    stem = Path(args.out or Path(__file__).resolve().parents[1] / "profiles" / f"quality_domains_{Path(args.model).stem}")
    if args.from_json:
        parts = [_int_keys(json.loads(Path(f).read_text())) for f in args.from_json.split(",")]
        res = parts[0]
        for other in parts[1:]:
            res["runs"].update(other["runs"])
            res["generate_s"] = res.get("generate_s") or other.get("generate_s")
        res["runs"] = {n: res["runs"][n] for c in CALIBRATIONS for n in sorted(res["runs"]) if n.startswith(c + "-")}
    else:
        model = args.model
        if model == "default":
            from edge_prism.loaders.default import default_model_path

            model = str(default_model_path())
        with tempfile.TemporaryDirectory() as work:
            res = measure(model, args.solvers.split(","), args.domains.split(","), args.max_tokens, Path(work),
                          partial=stem.with_name(stem.name + ".partial.json"),
                          calibrations=args.calibrations.split(","), cache=args.cache and Path(args.cache),
                          layers=args.layers.split(","), prism=args.prism and Path(args.prism))
        res["model"] = args.model
    for suffix, text in ((".json", json.dumps(res, indent=1)), (".md", markdown(res))):
        tmp = stem.with_name(stem.name + suffix + ".tmp")
        tmp.write_text(text + ("\n" if suffix == ".json" else ""))
        os.replace(tmp, stem.with_name(stem.name + suffix))
    stem.with_name(stem.name + ".partial.json").unlink(missing_ok=True)  # the results so far: superseded
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
