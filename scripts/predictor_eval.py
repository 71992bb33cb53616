"""Predictor quality: precision and recall of predicted sub-expert selections on held-out text.

Decodes held-out real text token by token (teacher-forced) with a prism checkpoint at
operating point K; at every layer l the predictor guesses what layers l+1 and l+2 will
select from the residual after l's attention, with and without the drift correction
fitted at refactor time, and the guesses are scored against the real selections.
Writes profiles/predictor_<model>.json.

    python scripts/predictor_eval.py [PRISM|default] [--operating-points 8,12,16] [--tokens 256]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

import edge_prism
from edge_prism.api import default_prism
from edge_prism.evaluate import eval_ids
from edge_prism.prefetch.predictor import Predictor


def score(model_path: Path, k: int, tokens: int) -> dict:
    """Precision/recall per distance, with and without the correction, at operating point k."""
    engine = edge_prism.load(model_path, operating_point=k)
    m = engine.model
    pc_names = set()
    from edge_prism.refactor.prism import open_prism

    pc = open_prism(model_path)
    pc_names = set(pc.gates.names())
    corrections = {}
    for layer in range(m.spec.num_layers):
        for d in (1, 2):
            key = f"layers.{layer}.predict.{d}"
            if f"{key}.scale" in pc_names:
                corrections[(layer, d)] = (pc.gate_tensor(f"{key}.scale"), pc.gate_tensor(f"{key}.bias"))
    predictors = {"corrected": Predictor(m, corrections), "plain": Predictor(m)}
    resid: dict[int, torch.Tensor] = {}
    actual: dict[int, set[int]] = {}

    def observe(layer, r, x, topv, topi):
        resid[layer] = r
        units, _ = m.unit_weights(layer, x, topv, topi)
        actual[layer] = set(units.tolist())

    ids = eval_ids(engine.tokenizer, None, tokens + 1)
    counts = {(name, d): [0, 0, 0] for name in predictors for d in (1, 2)}  # correct, predicted, actual
    # Baseline: the layer's most frequently selected units on calibration text, always.
    hottest = {layer: pc.order(layer).tolist() for layer in range(m.spec.num_layers)}
    counts[("static-hottest", 1)] = [0, 0, 0]
    with m.observing(observe):
        engine.reset()
        m.forward(ids[:1])
        for t in range(1, ids.numel()):
            resid.clear()
            actual.clear()
            m.forward(ids[t:t + 1])
            for layer in range(m.spec.num_layers):
                c = counts[("static-hottest", 1)]
                guess = set(hottest[layer][: len(actual[layer])])
                c[0] += len(guess & actual[layer])
                c[1] += len(guess)
                c[2] += len(actual[layer])
                for d in (1, 2):
                    target = layer + d
                    if target >= m.spec.num_layers:
                        continue
                    for name, pred in predictors.items():
                        guess = set(pred.predict(layer, resid[layer], target).units.tolist())
                        c = counts[(name, d)]
                        c[0] += len(guess & actual[target])
                        c[1] += len(guess)
                        c[2] += len(actual[target])
    return {f"{name}_d{d}": {"precision": c[0] / c[1], "recall": c[0] / c[2]}
            for (name, d), c in counts.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default="default")
    p.add_argument("--operating-points", default="8,12,16")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    path = default_prism() if args.model == "default" else Path(args.model)
    res = {"model": str(path.name), "tokens": args.tokens, "text": "stdlib docstrings, eval split",
           "points": {}}
    for k in (int(x) for x in args.operating_points.split(",")):
        res["points"][k] = score(path, k, args.tokens)
        for key, v in res["points"][k].items():
            print(f"K={k:3d} {key:14s} precision {v['precision']:.3f} recall {v['recall']:.3f}")
    out = Path(args.out or Path(__file__).resolve().parents[1] / "profiles" /
               f"predictor_{path.name.removesuffix('.prism')}.json")
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(res, indent=1) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
