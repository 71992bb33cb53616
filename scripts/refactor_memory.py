"""Peak memory and time of refactoring a model larger than memory, measured on synthetic
checkpoints at real layer shapes (labelled synthetic: random weights).

A Hugging Face directory with a few layers at the real Qwen3-30B-A3B or OLMoE-1B-7B shapes
(bfloat16 safetensors on disk, read like a real download, SmolLM2's tokenizer for the
calibration text) is refactored in a child process while its peak RSS is sampled; the
script prints the peak against one layer's expert bytes and the always-resident weights,
and projects the time to the full layer count.

    python scripts/refactor_memory.py --preset qwen3-30b-a3b --layers 2 [--calib-tokens 8192]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

PRESETS = {
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                          moe_intermediate_size=768, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, rms_norm_eps=1e-6,
                          rope_theta=1000000.0, max_position_embeddings=40960, tie_word_embeddings=False,
                          hidden_act="silu", full_layers=48),
    "olmoe-1b-7b": dict(model_type="olmoe", vocab_size=50304, hidden_size=2048, intermediate_size=1024,
                        num_attention_heads=16, num_key_value_heads=16, head_dim=128, num_experts=64,
                        num_experts_per_tok=8, norm_topk_prob=False, rms_norm_eps=1e-5, rope_theta=10000.0,
                        max_position_embeddings=4096, tie_word_embeddings=False, hidden_act="silu", full_layers=16),
}


def write_checkpoint(out: Path, preset: str, layers: int, seed: int = 0) -> dict:
    """Random bfloat16 weights (std 0.02) at the preset's shapes, one shard per layer; the
    default model's tokenizer files beside them. Returns the byte counts."""
    from safetensors.torch import save_file

    from edge_prism.build import expected_shapes
    from edge_prism.families import FAMILIES, build_spec
    from edge_prism.loaders.default import default_model_path
    from edge_prism.loaders.gguf import load_gguf

    cfg = {k: v for k, v in PRESETS[preset].items() if k != "full_layers"}
    cfg["num_hidden_layers"] = layers
    cfg["bos_token_id"], cfg["eos_token_id"] = 1, 2
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    load_gguf(default_model_path()).tokenizer.save(out)
    spec = build_spec(cfg, where=preset)
    names = FAMILIES[spec.family].names
    shapes = expected_shapes(spec)
    gen = torch.Generator().manual_seed(seed)
    index, sizes = {}, {"expert_bytes_per_layer": 0, "resident_bytes": 0}
    experts = {n.format(l=0, e=e) for e in range(spec.ffn[0].num_experts) for n in names.expert}
    for shard in ["dense"] + [f"layer{i}" for i in range(layers)]:
        tensors = {}
        for name, shape in shapes.items():
            layer = name.split(".")[2] if name.startswith("model.layers.") else None
            mine = (shard == "dense" and layer is None) or (shard == f"layer{layer}")
            if not mine:
                continue
            if name.endswith("norm.weight"):
                t = torch.ones(shape, dtype=torch.bfloat16)
            else:
                t = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
            tensors[name] = t
            nbytes = t.numel() * 2
            if name.replace(f"layers.{layer}.", "layers.0.") in experts:
                if layer == "0":
                    sizes["expert_bytes_per_layer"] += nbytes
            else:
                sizes["resident_bytes"] += nbytes
        file = f"model-{shard}.safetensors"
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        index.update({name: file for name in tensors})
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    return sizes


def refactor_in_child(src: Path, out: Path, calib_tokens: int) -> tuple[float, int]:
    """(seconds, peak RSS bytes) of `edge-prism refactor` in a child process."""
    cmd = [sys.executable, "-m", "edge_prism.cli", "refactor", str(src), "--out", str(out), "--force",
           "--calib-tokens", str(calib_tokens)]
    env = {**os.environ, "EDGE_PRISM_CACHE": str(out.parent / "cache")}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = 0
    child = psutil.Process(proc.pid)
    stop = threading.Event()

    def sample():
        nonlocal peak
        while not stop.is_set():
            try:
                peak = max(peak, child.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.05)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    _, err = proc.communicate()
    stop.set()
    t.join()
    if proc.returncode != 0:
        raise SystemExit(f"refactor failed: {err.strip().splitlines()[-1] if err.strip() else proc.returncode}")
    return time.perf_counter() - start, peak


def main(argv=None) -> int:
    """Write the synthetic checkpoint, refactor it, print the figures."""
    p = argparse.ArgumentParser(description="Peak RSS and time of refactoring at real MoE layer shapes (synthetic).")
    p.add_argument("--preset", choices=sorted(PRESETS), default="qwen3-30b-a3b")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--calib-tokens", type=int, default=8192)
    p.add_argument("--keep", type=Path, default=None, help="write the checkpoint here (default: a temp dir)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.keep.parent if args.keep else None) as tmp:
        src = args.keep or Path(tmp) / "src"
        sizes = write_checkpoint(src, args.preset, args.layers)
        seconds, peak = refactor_in_child(src, Path(tmp) / "out.prism", args.calib_tokens)
    layer, resident = sizes["expert_bytes_per_layer"], sizes["resident_bytes"]
    full = PRESETS[args.preset]["full_layers"]
    gib = 2**30
    print(f"synthetic {args.preset} (random weights, bfloat16 on disk), {args.layers} of {full} layers, "
          f"{args.calib_tokens} calibration tokens, {torch.get_num_threads()} threads")
    print(f"one layer's experts: {layer / gib:.2f} GiB; always-resident weights ({args.layers} layers): "
          f"{resident / gib:.2f} GiB")
    print(f"peak RSS: {peak / gib:.2f} GiB = {(peak - resident) / layer:.2f} x one layer's experts + the "
          f"always-resident weights (target < 2x)")
    print(f"time: {seconds:.0f} s ({seconds / args.layers:.0f} s per layer); projected to {full} layers: "
          f"{seconds / args.layers * full / 60:.0f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
