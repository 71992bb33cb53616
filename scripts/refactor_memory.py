"""Peak memory and time of refactoring a model larger than memory, measured on synthetic
checkpoints at real layer shapes (labelled synthetic: random weights).

A Hugging Face directory with a few layers at the real Qwen3-30B-A3B or OLMoE-1B-7B shapes
(bfloat16 safetensors on disk, read like a real download, SmolLM2's tokenizer for the
calibration text) is refactored in a child process while its peak RSS is sampled; the
script prints the peak against one layer's expert bytes and the always-resident weights,
and projects the time to the full layer count.

    python scripts/refactor_memory.py --preset qwen3-30b-a3b --layers 2 [--calib-tokens 8192] [--trace]

--trace samples RSS and anonymous RSS every 0.2 s (USS once a second: it costs a page-table
walk) and prints the peak of each phase the refactor logs (open, generation, calibration L,
partition L, dense, writing).
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


class Trace:
    """Memory of a child process, peaks kept per phase: RSS and anonymous RSS (RssAnon of
    /proc/PID/status: RSS less file-backed pages such as a memory-mapped source) every
    ``interval`` seconds, and with ``uss`` the USS (private memory, psutil's memory_full_info)
    in a second thread at most every ``uss_interval`` seconds: reading it walks the child's
    page tables (measured ~0.4 s at 7 GiB RSS on 2 busy cores), too slow for every sample.
    ``mark(name)`` starts a phase (the refactor logs one line per phase, see
    edge_prism.refactor.refactor.phase)."""

    def __init__(self, pid: int, *, interval: float = 0.2, uss: bool = True, uss_interval: float = 1.0):
        self.proc, self.interval = psutil.Process(pid), interval
        self.phases: dict[str, dict] = {}
        self.current = "start"
        self.t0 = time.perf_counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.mark("start")
        self._threads = [threading.Thread(target=self._run, args=(self._sample, interval), daemon=True)]
        if uss:
            self._threads.append(threading.Thread(target=self._run, args=(self._sample_uss, uss_interval),
                                                  daemon=True))
        for t in self._threads:
            t.start()

    def mark(self, name: str) -> None:
        """Start phase ``name`` (a repeated name keeps its peaks and adds to its time)."""
        now = time.perf_counter() - self.t0
        with self._lock:
            old = self.phases.get(self.current)
            if old is not None and old.get("since") is not None:
                old["seconds"] += now - old.pop("since")
            ph = self.phases.setdefault(name, dict(rss=0, uss=0, anon=0, seconds=0.0, first=now))
            ph["since"] = now
            self.current = name
        self._sample()

    def _record(self, phase: str, **values: int) -> None:
        with self._lock:
            ph = self.phases[phase]
            for k, v in values.items():
                ph[k] = max(ph[k], v)

    def _sample(self) -> None:
        phase = self.current
        try:
            rss, anon = self.proc.memory_info().rss, _rss_anon(self.proc.pid)
        except (psutil.Error, OSError):
            return
        self._record(phase, rss=rss, anon=anon)

    def _sample_uss(self) -> None:
        phase = self.current  # the phase the walk started in
        try:
            uss = self.proc.memory_full_info().uss
        except (psutil.Error, OSError):
            return
        self._record(phase, uss=uss)

    def _run(self, sample, interval: float) -> None:
        while not self._stop.wait(interval):
            sample()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()
        self.mark("end")

    def peak(self, key: str = "rss") -> int:
        return max((ph[key] for ph in self.phases.values()), default=0)

    def table(self) -> str:
        gib = 2**30
        rows = [f"{'phase':<16} {'start s':>8} {'time s':>8} {'peak RSS':>9} {'peak USS':>9} {'anon RSS':>9}"]
        for name, ph in self.phases.items():
            if name in ("start", "end") and ph["seconds"] < 1:
                continue
            rows.append(f"{name:<16} {ph['first']:>8.0f} {ph['seconds']:>8.0f} {ph['rss'] / gib:>8.2f}G "
                        f"{ph['uss'] / gib:>8.2f}G {ph['anon'] / gib:>8.2f}G")
        return "\n".join(rows)


def _rss_anon(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


PHASE_MARK = "edge_prism.refactor.refactor: phase: "


def refactor_in_child(src: Path, out: Path, calib_tokens: int, *, trace: bool = False,
                      extra: list[str] = ()) -> tuple[float, Trace]:
    """(seconds, memory trace) of `edge-prism refactor` in a child process. The trace always
    has the peak RSS; with ``trace``, also USS, anonymous RSS and peaks per phase (the child
    runs with -v and its phase lines switch the trace's phase)."""
    cmd = [sys.executable, "-m", "edge_prism.cli", *(["-v"] if trace else []), "refactor", str(src),
           "--out", str(out), "--force", "--calib-tokens", str(calib_tokens), *extra]
    env = {**os.environ, "EDGE_PRISM_CACHE": str(out.parent / "cache")}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    tr = Trace(proc.pid, interval=0.2 if trace else 0.05, uss=trace)
    tail: list[str] = []
    for line in proc.stderr:  # tqdm's carriage returns are line ends here (text mode)
        line = line.rstrip("\n")
        if PHASE_MARK in line:
            tr.mark(line.split(PHASE_MARK, 1)[1].strip())
            if trace:
                print(f"  {time.perf_counter() - start:7.1f} s  phase {tr.current}", file=sys.stderr, flush=True)
        elif line.strip():
            tail = (tail + [line])[-5:]
    proc.wait()
    tr.stop()
    if proc.returncode != 0:
        raise SystemExit(f"refactor failed: {tail[-1] if tail else proc.returncode}")
    return time.perf_counter() - start, tr


def main(argv=None) -> int:
    """Write the synthetic checkpoint, refactor it, print the figures."""
    p = argparse.ArgumentParser(description="Peak RSS and time of refactoring at real MoE layer shapes (synthetic).")
    p.add_argument("--preset", choices=sorted(PRESETS), default="qwen3-30b-a3b")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--calib-tokens", type=int, default=8192)
    p.add_argument("--keep", type=Path, default=None, help="write the checkpoint here, or reuse the one there (default: a temp dir)")
    p.add_argument("--trace", action="store_true",
                   help="sample RSS and anonymous RSS every 0.2 s, USS every 1 s, and print the peaks per phase")
    p.add_argument("--generated-share", type=float, default=None, help="passed to edge-prism refactor")
    args = p.parse_args(argv)
    extra = [] if args.generated_share is None else ["--generated-share", str(args.generated_share)]
    with tempfile.TemporaryDirectory(dir=args.keep.parent if args.keep else None) as tmp:
        src = args.keep or Path(tmp) / "src"
        made = src / "refactor_memory.json"  # a kept checkpoint of the same preset is reused
        key = {"preset": args.preset, "layers": args.layers}
        old = json.loads(made.read_text()) if made.exists() else {}
        if old.get("key") == key:
            sizes = old["sizes"]
        else:
            sizes = write_checkpoint(src, args.preset, args.layers)
            made.write_text(json.dumps({"key": key, "sizes": sizes}))
        seconds, tr = refactor_in_child(src, Path(tmp) / "out.prism", args.calib_tokens, trace=args.trace,
                                        extra=extra)
    peak = tr.peak("rss")
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
    if args.trace:
        print(f"peak USS: {tr.peak('uss') / gib:.2f} GiB; peak anonymous RSS: {tr.peak('anon') / gib:.2f} GiB "
              "(RSS less file-backed pages such as the memory-mapped source)")
        print(tr.table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
