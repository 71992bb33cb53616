"""MoE GGUF parity figures: tiny random checkpoints of each MoE family (transformers), converted
by llama.cpp's own convert_hf_to_gguf.py (EDGE_PRISM_LLAMA_CPP = a llama.cpp source tree, e.g.
the llama-cpp-python sdist's vendor/llama.cpp; it needs `pip install sentencepiece`), then
edge-prism on the GGUF against transformers on the HF directory and against llama.cpp
(llama-cpp-python) on the same GGUF. Random weights: these figures are about exactness only.
The checkpoints are tests/moe_gguf.py CONVERTED (deepseek_v2: DeepSeek-V2-Lite's and V2's shapes).

A second table takes the deepseek2 differences from llama.cpp apart: llama.cpp with an f32 KV
cache (its default caches the latent in f16), edge-prism with llama.cpp's group-ranking rule
(top-2 sum; DeepSeek-V2 and transformers rank groups by their best expert), and edge-prism
on the file's exact (dequantized) values.

    EDGE_PRISM_LLAMA_CPP=/path/to/llama.cpp python scripts/moe_gguf_parity.py [-f deepseek_v2,...]

(*) With group limits, edge-prism runs llama.cpp's rule in the last two columns.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

IDS = list(range(3, 27))
OUTTYPES = ("f32", "f16", "q8_0")
_F32 = 0  # GGML_TYPE_F32


def _checkpoint(tmp: Path, family: str) -> Path:
    """CONVERTED[family] with SmolLM2's tokenizer (one the converter knows)."""
    from conftest import build_tiny_checkpoint
    from edge_prism.loaders.default import default_model_path
    from edge_prism.loaders.gguf import load_gguf
    from moe_gguf import CONVERTED

    tiny, extra = CONVERTED[family]
    src = tmp / family
    build_tiny_checkpoint(src, tiny, vocab_size=49152, tokenizer=False, **extra)
    load_gguf(default_model_path()).tokenizer.save(src)
    return src


def _convert(root: Path, src: Path, out: Path, outtype: str) -> Path:
    env = {**os.environ, "PYTHONPATH": str(root / "gguf-py")}
    subprocess.run([sys.executable, str(root / "convert_hf_to_gguf.py"), str(src), "--outfile", str(out),
                    "--outtype", outtype], check=True, capture_output=True, env=env)
    return out


def _llama_cpp(path: Path, **options) -> torch.Tensor:
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False, n_threads=2, **options)
    llm.eval(IDS)
    return torch.tensor(np.array(llm.scores[: len(IDS)]))


@contextlib.contextmanager
def _llama_cpp_group_rule():
    """edge-prism's router with llama.cpp's group ranking, for the diagnostic table only."""
    import edge_prism.model
    from moe_gguf import top2_sum_groups

    ours = edge_prism.model._group_limited
    edge_prism.model._group_limited = top2_sum_groups
    try:
        yield
    finally:
        edge_prism.model._group_limited = ours


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _deepseek_row(family: str, outtype: str, path: Path, theirs: torch.Tensor) -> str:
    import edge_prism
    from edge_prism.loaders.gguf import load_gguf

    theirs_f32 = _llama_cpp(path, type_k=_F32, type_v=_F32)
    ours = edge_prism.load(path).logits(IDS)
    rule = rule_f32 = "-"
    grouped = load_gguf(path).config["topk_method"] == "group_limited_greedy"
    with _llama_cpp_group_rule() if grouped else contextlib.nullcontext():
        alike = edge_prism.load(path).logits(IDS)  # the last two columns: with llama.cpp's rule
        exact = edge_prism.load(path, dequantize=True).logits(IDS)
    if grouped:
        rule, rule_f32 = f"{_rel(alike, theirs):.2e}", f"{_rel(alike, theirs_f32):.2e}"
    return (f"| {family} | {outtype} | {_rel(ours, theirs):.2e} | {_rel(ours, theirs_f32):.2e} | {rule} | "
            f"{rule_f32} | {_rel(exact, theirs):.2e} | {_rel(alike, exact):.2e} |")


def main() -> int:
    """Print one row per family and conversion type, then the deepseek2 breakdown."""
    import edge_prism
    import transformers
    from moe_gguf import CONVERTED

    parser = argparse.ArgumentParser(description="MoE GGUF parity: edge-prism vs transformers and llama.cpp")
    parser.add_argument("-f", "--families", default=",".join(CONVERTED),
                        help=f"comma-separated (default: all of {', '.join(CONVERTED)})")
    families = parser.parse_args().families.split(",")
    unknown = [f for f in families if f not in CONVERTED]
    if unknown:
        parser.error(f"unknown families {unknown}; choose from {', '.join(CONVERTED)}")
    root = Path(os.environ["EDGE_PRISM_LLAMA_CPP"])
    print("| family | GGUF type | vs transformers (max abs diff / max abs) | vs llama.cpp (rel. norm) | same argmax |")
    print("|---|---|---|---|---|")
    breakdown = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in families:
            src = _checkpoint(Path(tmp), family)
            ref = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
            with torch.no_grad():
                want = ref(torch.tensor([IDS])).logits[0]
            for outtype in OUTTYPES:
                out = _convert(root, src, Path(tmp) / f"{family}-{outtype}.gguf", outtype)
                ours = edge_prism.load(out).logits(IDS)
                theirs = _llama_cpp(out)
                vs_hf = float((ours - want).abs().max() / want.abs().max())
                same = float((ours.argmax(-1) == theirs.argmax(-1)).float().mean())
                print(f"| {family} | {outtype} | {vs_hf:.2e} | {_rel(ours, theirs):.2e} | {same:.0%} |", flush=True)
                if family.startswith("deepseek"):
                    breakdown.append(_deepseek_row(family, outtype, out, theirs))
    if breakdown:
        print()
        print("| family | GGUF type | vs llama.cpp | vs llama.cpp, f32 KV cache | with llama.cpp's group rule | "
              "same, f32 KV cache | file's exact values vs llama.cpp* | edge-prism vs file's exact values* |")
        print("|---|---|---|---|---|---|---|---|")
        print("\n".join(breakdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
