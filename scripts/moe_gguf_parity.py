"""MoE GGUF parity figures: tiny random checkpoints of each MoE family (transformers), converted
by llama.cpp's own convert_hf_to_gguf.py (EDGE_PRISM_LLAMA_CPP = a llama.cpp source tree, e.g.
the llama-cpp-python sdist's vendor/llama.cpp; it needs `pip install sentencepiece`), then
edge-prism on the GGUF against transformers on the HF directory and against llama.cpp
(llama-cpp-python) on the same GGUF. Random weights: these figures are about exactness only.

    EDGE_PRISM_LLAMA_CPP=/path/to/llama.cpp python scripts/moe_gguf_parity.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

IDS = list(range(3, 27))


def main() -> int:
    """Print one row per family and conversion type."""
    import edge_prism
    from conftest import build_tiny_checkpoint
    from edge_prism.loaders.default import default_model_path
    from edge_prism.loaders.gguf import load_gguf

    root = Path(os.environ["EDGE_PRISM_LLAMA_CPP"])
    import llama_cpp
    import transformers

    print("| family | GGUF type | vs transformers (max abs diff / max abs) | vs llama.cpp (rel. norm) | same argmax |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for family in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"):
            src = Path(tmp) / family
            extra = {"num_key_value_heads": 4} if family == "olmoe" else {}
            build_tiny_checkpoint(src, family, vocab_size=49152, tokenizer=False, **extra)
            load_gguf(default_model_path()).tokenizer.save(src)
            ref = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
            with torch.no_grad():
                want = ref(torch.tensor([IDS])).logits[0]
            for outtype in ("f32", "f16", "q8_0"):
                out = Path(tmp) / f"{family}-{outtype}.gguf"
                env = {**os.environ, "PYTHONPATH": str(root / "gguf-py")}
                subprocess.run([sys.executable, str(root / "convert_hf_to_gguf.py"), str(src), "--outfile", str(out),
                                "--outtype", outtype], check=True, capture_output=True, env=env)
                ours = edge_prism.load(out).logits(IDS)
                llm = llama_cpp.Llama(str(out), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
                llm.eval(IDS)
                theirs = torch.tensor(np.array(llm.scores[: len(IDS)]))
                vs_hf = float((ours - want).abs().max() / want.abs().max())
                vs_cpp = float((ours - theirs).norm() / theirs.norm())
                same = float((ours.argmax(-1) == theirs.argmax(-1)).float().mean())
                print(f"| {family} | {outtype} | {vs_hf:.2e} | {vs_cpp:.2e} | {same:.0%} |")
                del llm
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
