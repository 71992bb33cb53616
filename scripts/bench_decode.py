"""CPU decode speed on the default model's GGUF file: llama.cpp, transformers and edge-prism,
in one run, same prompt, same threads, greedy.

Systems (each forced to --tokens new tokens, the EOS logit masked, greedy):
- llama.cpp through llama-cpp-python (the tool a CPU user already has), on the same GGUF,
  run in a child process of this script (its OpenMP runtime stays out of torch's);
- transformers on the same GGUF, dequantized to float32 (its only way to load it);
- edge-prism on the GGUF file itself (quantized weights, no prism);
- edge-prism on the default prism checkpoint at full K (24) and K=18, fully resident and under
  50% and 25% memory budgets (sub-experts streamed from the checkpoint file).

Decode tokens/s = (N - 1) decode steps over their total time, per run; runs alternate
between systems after a warm-up each; the table shows the median and the best run (a
shared machine is noisy: read ratios, and prefer the best-of figures on a quiet machine).
Bytes read per token: weights the decode step reads (kernel counters for edge-prism, the
file's tensor bytes for llama.cpp, parameter bytes for transformers). Outputs are not
compared with llama.cpp token for token (it quantizes activations too); greedy agreement
with the first edge-prism system is printed for information.

llama-cpp-python is an optional `bench` extra (`pip install -e '.[bench]'`); it compiles
llama.cpp from source, about 15 minutes on 2 cores. On CPUs with AMX, llama.cpp's native
build can crash in a VM; build it with
CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON
-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF". Without it the llama.cpp
row says how to install it and the other rows still run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

QUESTION = "Why is the sky blue? Explain it to a curious ten-year-old."
PROFILE = Path(__file__).resolve().parents[1] / "profiles" / "bench_decode_cpu.md"


@dataclass
class Run:
    """One timed generation."""

    ttft_s: float
    step_s: list[float]
    tokens: list[int]
    bytes_per_token: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return len(self.step_s) / sum(self.step_s)

    @property
    def p50_ms(self) -> float:
        return 1000 * statistics.median(self.step_s)


# -- llama.cpp (child process) ------------------------------------------------------------------
def llama_child(path: str, ids: list[int], tokens: int, threads: int, suppress: list[int]) -> dict:
    """Runs inside the child: greedy decode with llama.cpp, one eval per token."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(path, n_threads=threads, n_threads_batch=threads, n_ctx=len(ids) + tokens + 8, verbose=False)
    def argmax() -> int:
        row = np.array(llm.scores[llm.n_tokens - 1])
        row[suppress] = -np.inf
        return int(row.argmax())

    out = []
    for _ in range(2):  # warm-up, then the timed run
        llm.reset()
        start = time.perf_counter()
        llm.eval(ids)
        toks = [argmax()]
        ttft = time.perf_counter() - start
        steps = []
        for _ in range(tokens - 1):
            t0 = time.perf_counter()
            llm.eval(toks[-1:])
            toks.append(argmax())
            steps.append(time.perf_counter() - t0)
        out = [ttft, steps, toks]
    return {"ttft_s": out[0], "step_s": out[1], "tokens": out[2]}


def llama_run(path: Path, ids: list[int], args, suppress: list[int]) -> Run | str:
    """One llama.cpp run in a child process, or why it could not run."""
    spec = json.dumps({"path": str(path), "ids": ids, "tokens": args.tokens, "threads": args.threads,
                       "suppress": suppress})
    proc = subprocess.run([sys.executable, __file__, "--llama-child", spec], capture_output=True, text=True,
                          timeout=600)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return f"llama.cpp did not run ({tail})"
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    return Run(r["ttft_s"], r["step_s"], r["tokens"], bytes_per_token=gguf_tensor_bytes(path))


def gguf_tensor_bytes(path: Path) -> float:
    """Bytes of every tensor in the file (llama.cpp reads them all per token; the tied
    embedding is the output matrix)."""
    import gguf

    return float(sum(int(t.n_bytes) for t in gguf.GGUFReader(path).tensors))


# -- edge-prism ---------------------------------------------------------------------------------
def edge_prism_run(engine, ids: list[int], tokens: int, suppress: list[int]) -> Run:
    """Greedy decode over the engine's model: prefill, then one forward per token."""
    import torch

    model = engine.model
    mask = torch.tensor(suppress, dtype=torch.long)
    engine.reset()
    kernels = [k for k in model.kernels if hasattr(k, "bytes_read")]
    start = time.perf_counter()
    logits = model.forward(torch.tensor(ids))[-1].index_fill(0, mask, float("-inf"))  # [V]
    toks = [int(logits.argmax())]
    ttft = time.perf_counter() - start
    before = sum(k.bytes_read for k in kernels)
    steps = []
    for _ in range(tokens - 1):
        t0 = time.perf_counter()
        logits = model.forward(torch.tensor(toks[-1:]))[-1].index_fill(0, mask, float("-inf"))  # [V]
        toks.append(int(logits.argmax()))
        steps.append(time.perf_counter() - t0)
    expert_bytes = (sum(k.bytes_read for k in kernels) - before) / max(len(steps), 1)
    engine.reset()
    return Run(ttft, steps, toks, bytes_per_token=expert_bytes + dense_bytes_per_token(model))


def dense_bytes_per_token(model) -> float:
    """Always-resident weight bytes one decode token reads: every linear (attention, shared
    experts, lm_head), the routers, norms, and one embedding row."""
    from edge_prism.model import _tensors

    w = model.w
    total = sum(t.numel() * t.element_size() for t in _tensors([w.lm_head, w.norm, *w.layers]))
    refine = getattr(w.lm_head, "rows", None)  # QuantHead: its storage rows are read only for the top 64
    if refine is not None:
        total -= refine.nbytes() * (1 - 64 / refine.rows)
    return float(total + 2 * model.spec.hidden_size)


# -- transformers ---------------------------------------------------------------------------------
class _Clock:
    def __init__(self):
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value):
        if self.prompt_seen:
            self.times.append(time.perf_counter())
        self.prompt_seen = True

    def end(self):
        pass


def transformers_run(model, ids: list[int], tokens: int, pad_id: int) -> Run:
    """transformers' greedy generate, forced to ``tokens`` tokens, timed per token."""
    import torch

    clock = _Clock()
    prompt = torch.tensor([ids])
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                             max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=pad_id, streamer=clock)
    ticks = [start] + clock.times
    steps = [b - a for a, b in zip(ticks[1:], ticks[2:])]
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return Run(ticks[1] - start, steps, out[0, len(ids):].tolist(), bytes_per_token=float(nbytes))


# -- the run ----------------------------------------------------------------------------------------
def systems(args, gguf_path: Path, ids: list[int], suppress: list[int]) -> dict:
    """name -> callable(n_tokens) -> Run | str (why it cannot run)."""
    import edge_prism
    from edge_prism.api import default_prism

    out: dict = {}
    try:
        import llama_cpp  # noqa: F401

        out["llama.cpp"] = lambda n: llama_run(gguf_path, ids, argparse.Namespace(tokens=n, threads=args.threads),
                                               suppress)
    except ImportError:
        out["llama.cpp"] = lambda n: ("not installed: pip install -e '.[bench]' (builds llama.cpp from source, "
                                      "~15 min on 2 cores)")
    # Every system on the CPU (load()'s 'auto' would put edge-prism on a GPU beside a CPU transformers).
    engines = {"edge-prism GGUF": edge_prism.load(gguf_path, device="cpu")}
    prism = default_prism(progress=True)
    for k in args.operating_points:
        engines[f"edge-prism K={k}"] = edge_prism.load(prism, device="cpu", operating_point=k)
        for budget in args.budgets:
            engines[f"edge-prism K={k} {budget}"] = edge_prism.load(prism, device="cpu", operating_point=k,
                                                                   memory_budget=budget)
    for name, engine in engines.items():
        out[name] = (lambda e: lambda n: edge_prism_run(e, ids, n, suppress))(engine)
    if not args.no_transformers:
        try:
            import torch
            from transformers import AutoModelForCausalLM

            ref = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                       dtype=torch.float32).eval()
            pad = ref.generation_config.pad_token_id or suppress[0]
            out["transformers"] = lambda n: transformers_run(ref, ids, n, pad)
        except ImportError:
            out["transformers"] = lambda n: "not installed: pip install transformers"
    return out


def measure(runners: dict, args) -> dict[str, list[Run] | str]:
    """A warm-up each, then --repeats rounds over every system in turn."""
    results: dict[str, list[Run] | str] = {}
    for name, run in runners.items():
        r = run(min(8, args.tokens))
        results[name] = r if isinstance(r, str) else []
    for _ in range(args.repeats):
        for name, run in runners.items():
            if isinstance(results[name], list):
                results[name].append(run(args.tokens))
    return results


def table(results: dict, args, prompt_tokens: int) -> str:
    """The markdown table of the run."""
    import torch

    def tps(name: str, pick) -> float | None:
        rs = results.get(name)
        return pick([r.tokens_per_s for r in rs]) if isinstance(rs, list) and rs else None

    base_llama = tps("llama.cpp", max)
    k16 = tps(f"edge-prism K={args.operating_points[0]}", max)
    first_ep = next((r for n, r in results.items() if n.startswith("edge-prism") and isinstance(r, list)), None)
    lines = [f"default model (SmolLM2-135M-Instruct Q4_1 GGUF), {prompt_tokens}-token chat prompt, {args.tokens} new "
             f"tokens (greedy, forced), {args.repeats} runs each after a warm-up, {args.threads} threads, "
             f"torch {torch.__version__}, {cpu_name()}",
             "",
             "| system | tok/s median | tok/s best | p50 ms | TTFT ms | MB read/token | best vs llama.cpp | "
             f"best vs K={args.operating_points[0]} | same greedy tokens |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, rs in results.items():
        if isinstance(rs, str):
            lines.append(f"| {name} | {rs} | | | | | | | |")
            continue
        med, best = statistics.median(r.tokens_per_s for r in rs), max(r.tokens_per_s for r in rs)
        p50 = statistics.median(r.p50_ms for r in rs)
        ttft = 1000 * statistics.median(r.ttft_s for r in rs)
        mb = rs[-1].bytes_per_token / 2**20
        vs_llama = f"{best / base_llama:.2f}x" if base_llama else ""
        vs_k16 = f"{best / k16:.2f}x" if k16 and name.startswith("edge-prism K") else ""
        same = ""
        if first_ep and rs is not first_ep:
            a, b = rs[-1].tokens, first_ep[-1].tokens
            same = f"{next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))}/{args.tokens}"
        lines.append(f"| {name} | {med:.1f} | {best:.1f} | {p50:.2f} | {ttft:.0f} | {mb:.1f} | {vs_llama} | "
                     f"{vs_k16} | {same} |")
    return "\n".join(lines)


def cpu_name() -> str:
    """The CPU model and core count."""
    name = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} cores"


def main(argv=None) -> int:
    """Parse options, run every system, print (and with --write, record) the table."""
    parser = argparse.ArgumentParser(description="Decode tokens/s on the default model's GGUF: llama.cpp, "
                                                 "transformers and edge-prism in one run, with ratios.")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per run (forced)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per system")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for every system")
    parser.add_argument("--operating-points", default="24,18", help="edge-prism K values (first = reference)")
    parser.add_argument("--budgets", default="50%,25%", help="edge-prism memory budgets ('' for none)")
    parser.add_argument("--no-transformers", action="store_true", help="skip transformers (slow)")
    parser.add_argument("--question", default=QUESTION, help="the user message of the chat prompt")
    parser.add_argument("--write", action="store_true", help=f"append the table to {PROFILE}")
    parser.add_argument("--llama-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.llama_child:
        spec = json.loads(args.llama_child)
        print(json.dumps(llama_child(spec["path"], spec["ids"], spec["tokens"], spec["threads"], spec["suppress"])))
        return 0
    if args.tokens < 2 or args.repeats < 1:
        parser.error("--tokens must be at least 2 and --repeats at least 1")
    args.operating_points = [int(k) for k in args.operating_points.split(",") if k.strip()]
    args.budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    import torch

    import edge_prism
    from edge_prism.loaders.default import default_model_path

    torch.set_num_threads(args.threads)
    gguf_path = default_model_path()
    engine = edge_prism.load(gguf_path, device="cpu")
    ids = engine.tokenizer.encode_chat([{"role": "user", "content": args.question}])
    suppress = sorted(set(engine.spec.eos_token_ids) | set(engine.tokenizer.stop_ids))
    results = measure(systems(args, gguf_path, ids, suppress), args)
    text = table(results, args, len(ids))
    print(text)
    if args.write:
        cmd = "python scripts/bench_decode.py " + " ".join(argv if argv is not None else sys.argv[1:])
        with PROFILE.open("a") as f:
            f.write(f"\n## {time.strftime('%Y-%m-%d')}: `{cmd.strip()}`\n\n{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
