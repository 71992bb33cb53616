"""Gate against oracle: how much of the quality lost at an operating point is the gate's.

Per held-out domain, the perplexity ratio to full K at a few operating points K, with the
prism's own sub-expert gate and with an oracle that scores each group by the output mass it
actually carries for the token (sum over its neurons of |silu(x W_gate) * (x W_up)| times the
norm of the neuron's down column: the quantity the gates are fitted to predict), with the
layers allocated (the default) and uniform. The oracle computes every neuron: it shows what
a perfect predictor of the gates' target would give with this partition (not a strict bound
on any selection), and is not a runtime option.

    python scripts/oracle_gate.py [--prism P] [--points 14,12,10] [--max-tokens 1024]

Writes profiles/oracle_gate_<model>.md (and .json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import edge_prism
from edge_prism.api import default_prism, float_pool
from edge_prism.evaluate import perplexity
from edge_prism.refactor.corpus import heldout_text
from edge_prism.refactor.prism import open_prism

DOMAINS = ("licenses", "reference", "dialogue", "code")


class OracleGate:
    """Scores [T, k, S] of the routed experts' groups by the output mass each carries."""

    def __init__(self, pool: torch.Tensor, num_experts: int):
        U, _, n, D = pool.shape
        S = U // num_experts
        self.wg = pool[:, 0].reshape(num_experts, S, n, D)
        self.wu = pool[:, 1].reshape(num_experts, S, n, D)
        # The block's third slot holds its W_down columns as a row-major [D, n] matrix
        # (build.pack_expert): a neuron's down column is a column of that matrix.
        self.down = pool[:, 2].reshape(num_experts, S, D, n).norm(dim=-2)  # [E, S, n]

    def scores(self, x: torch.Tensor, topi: torch.Tensor) -> torch.Tensor:
        x = x.float()
        out = torch.zeros(*topi.shape, self.wg.shape[1])  # [T, k, S]
        for e in topi.unique().tolist():
            t, j = (topi == e).nonzero(as_tuple=True)
            xe = x[t]  # [m, D]
            act = F.silu(torch.einsum("md,snd->msn", xe, self.wg[e])) * torch.einsum("md,snd->msn", xe, self.wu[e])
            out[t, j] = (act.abs() * self.down[e]).sum(-1)
        return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prism", default=None, help="prism checkpoint (default: the default model's)")
    p.add_argument("--points", default="14,12,10")
    p.add_argument("--max-tokens", type=int, default=1024)
    p.add_argument("--domains", default=",".join(DOMAINS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = Path(args.prism) if args.prism else default_prism()
    points = [int(k) for k in args.points.split(",")]
    domains = args.domains.split(",")
    t0 = time.perf_counter()
    engine = edge_prism.load(path, device="cpu")
    m, pc = engine.model, open_prism(path)
    full = max(points + [m.operating_point])
    own = list(m.gates)
    oracle = [OracleGate(float_pool(pc, layer, dtype=torch.float32, device=torch.device("cpu")),
                         m.spec.ffn[layer].num_experts) for layer in range(m.spec.num_layers)]
    allocation = m.allocation
    ids = {d: torch.tensor(engine.tokenizer.encode(heldout_text(d), add_bos=False)[:args.max_tokens]) for d in domains}
    res: dict = {"prism": str(path), "max_tokens": args.max_tokens, "points": points, "runs": {}}
    for gate_name, gates in (("gate", own), ("oracle", oracle)):
        for layers in ("allocated", "uniform"):
            if layers == "allocated" and allocation is None:
                continue
            m.gates[:] = gates
            m._selectors.clear()  # selectors hold the gates they were made with
            m.set_allocation(allocation if layers == "allocated" else None)
            run = {}
            for d in domains:
                engine.set_operating_point(full)
                ref = perplexity(engine, ids[d])
                run[d] = {}
                for k in points:
                    engine.set_operating_point(k)
                    run[d][k] = perplexity(engine, ids[d]) / ref
                print(gate_name, layers, d, " ".join(f"K{k} x{r:.3f}" for k, r in run[d].items()), flush=True)
            res["runs"][f"{gate_name}-{layers}"] = run
    m.gates[:] = own
    m._selectors.clear()
    res["seconds"] = time.perf_counter() - t0
    name = "default" if args.prism is None else Path(path).stem.split(".")[0]
    stem = args.out or Path(__file__).resolve().parents[1] / "profiles" / f"oracle_gate_{name}"
    lines = [f"# Sub-expert gate against an oracle: {Path(path).name}", "",
             "Perplexity of the first {0} tokens of each held-out domain at K, as a ratio to full K. *gate*: the "
             "prism's own gate; *oracle*: each group scored by the output mass it carries for the token (every "
             "neuron computed: what a perfect predictor of the gates' target gives with this partition; not a runtime option). *allocated*: K's sub-experts "
             "spread across layers by the measured layer sensitivity; *uniform*: every layer at K. Where the prism "
             "stores them, every run adds back the dropped sub-experts' mean outputs (compensation, fitted on the "
             "default gate's drops).".format(args.max_tokens),
             "", f"Command: `python scripts/oracle_gate.py {' '.join(argv or [])}`. Machine: {platform.processor() or platform.machine()}, "
             f"{args.threads} threads, torch {torch.__version__}; {res['seconds']:.0f} s.", "",
             "| run | " + " | ".join(f"{d} K={k}" for d in domains for k in points) + " |",
             "|---|" + "---|" * (len(domains) * len(points))]
    for name, run in res["runs"].items():
        lines.append(f"| {name} | " + " | ".join(f"x{run[d][k]:.3f}" for d in domains for k in points) + " |")
    tmp_md, tmp_js = stem.with_suffix(".md.tmp"), stem.with_suffix(".json.tmp")
    tmp_md.write_text("\n".join(lines) + "\n")
    tmp_js.write_text(json.dumps(res, indent=1))
    os.replace(tmp_md, stem.with_suffix(".md"))
    os.replace(tmp_js, stem.with_suffix(".json"))
    print(f"wrote {stem.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
