"""CPU decode speed of edge-prism vs transformers on the default model, in one process run.

Both systems get the same token ids (a chat-formatted question rendered by edge-prism's
tokenizer), generate greedily, and are forced to produce the full --tokens new tokens:

- edge-prism: the engine's own decode loop, written out over ``engine.model.forward``:
  one prefill forward over the prompt, then one forward per new token over the KV cache,
  feeding back the argmax. That is what ``Engine.generate_ids`` runs, minus the stop check
  (which would end the reply early) and the bookkeeping.
- transformers: ``generate(do_sample=False, max_new_tokens=N, min_new_tokens=N)`` on the same
  GGUF dequantized to float32, timed per token by a streamer. ``min_new_tokens`` masks the
  EOS logit; the edge-prism loop masks the same ids, so both produce the same tokens.

Time to first token = prefill + first token. Decode tokens/s = (N - 1) decode forwards over
their total time. Runs alternate between the systems (after one warm-up each) and the table
reports medians over --repeats runs; the machine may be shared, so read ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch

import edge_prism

QUESTION = "Why is the sky blue? Explain it to a curious ten-year-old."


@dataclass(frozen=True)
class Run:
    """One timed generation."""

    ttft_s: float
    step_s: list[float]  # decode forwards, one per token after the first
    tokens: list[int]

    @property
    def tokens_per_s(self) -> float:
        return len(self.step_s) / sum(self.step_s)

    @property
    def p50_ms(self) -> float:
        return 1000 * statistics.median(self.step_s)


def edge_prism_run(engine, ids: list[int], new_tokens: int, suppress: list[int]) -> Run:
    """Greedy decode over the engine's model: prefill, then one forward per token."""
    model = engine.model
    mask = torch.tensor(suppress, dtype=torch.long)
    engine.reset()
    start = time.perf_counter()
    logits = model.forward(torch.tensor(ids))[-1].index_fill(0, mask, float("-inf"))  # [V]
    tokens = [int(logits.argmax())]
    ttft = time.perf_counter() - start
    steps = []
    for _ in range(new_tokens - 1):
        t0 = time.perf_counter()
        logits = model.forward(torch.tensor(tokens[-1:]))[-1].index_fill(0, mask, float("-inf"))  # [V]
        tokens.append(int(logits.argmax()))
        steps.append(time.perf_counter() - t0)
    engine.reset()
    return Run(ttft, steps, tokens)


class _Clock:
    """A transformers streamer that timestamps every new token."""

    def __init__(self):
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value):
        if self.prompt_seen:  # the first put is the prompt itself
            self.times.append(time.perf_counter())
        self.prompt_seen = True

    def end(self):
        pass


def transformers_run(model, ids: list[int], new_tokens: int, pad_id: int) -> Run:
    """transformers' greedy generate, forced to ``new_tokens`` tokens, timed per token."""
    clock = _Clock()
    prompt = torch.tensor([ids])
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                             max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad_id,
                             streamer=clock)
    ticks = [start] + clock.times
    steps = [b - a for a, b in zip(ticks[1:], ticks[2:])]
    return Run(ticks[1] - start, steps, out[0, len(ids):].tolist())


def load_systems(dtype: torch.dtype):
    """edge-prism's engine and transformers' model of the default GGUF."""
    from transformers import AutoModelForCausalLM

    engine = edge_prism.load()
    path = engine.source
    reference = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).eval()
    return engine, reference


def measure(engine, reference, ids: list[int], args: argparse.Namespace) -> dict[str, list[Run]]:
    """Warm-up, then --repeats alternating runs of each system."""
    eos = reference.generation_config.eos_token_id
    suppress = [eos] if isinstance(eos, int) else list(eos or [])
    pad = reference.generation_config.pad_token_id or suppress[0]
    systems = {
        "edge-prism": lambda n: edge_prism_run(engine, ids, n, suppress),
        "transformers": lambda n: transformers_run(reference, ids, n, pad),
    }
    for run in systems.values():
        run(min(8, args.tokens))
    runs: dict[str, list[Run]] = {name: [] for name in systems}
    for _ in range(args.repeats):
        for name, run in systems.items():
            runs[name].append(run(args.tokens))
    return runs


def report(runs: dict[str, list[Run]], args: argparse.Namespace, prompt_tokens: int) -> None:
    """The table of medians and the ratio."""
    print(f"default model, {prompt_tokens}-token chat prompt, {args.tokens} new tokens (greedy, forced), "
          f"{args.repeats} runs each after a warm-up, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'system':<14}{'tokens/s (median)':>19}{'p50 ms/token':>14}{'TTFT ms (median)':>18}")
    medians = {}
    for name, rs in runs.items():
        medians[name] = statistics.median(r.tokens_per_s for r in rs)
        p50 = statistics.median(r.p50_ms for r in rs)
        ttft = 1000 * statistics.median(r.ttft_s for r in rs)
        print(f"{name:<14}{medians[name]:>19.1f}{p50:>14.1f}{ttft:>18.1f}")
    print(f"ratio edge-prism / transformers (decode tokens/s): "
          f"{medians['edge-prism'] / medians['transformers']:.2f}x")
    ours, theirs = runs["edge-prism"][-1].tokens, runs["transformers"][-1].tokens
    same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    print(f"same greedy tokens: {same}/{args.tokens}")


def main(argv=None) -> int:
    """Parse options, load both systems, measure, print."""
    parser = argparse.ArgumentParser(description="CPU decode tokens/s of edge-prism vs transformers "
                                                 "on the default model (same prompt, same process).")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per run (forced)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per system")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--question", default=QUESTION, help="the user message of the chat prompt")
    args = parser.parse_args(argv)
    if args.tokens < 2 or args.repeats < 1:
        parser.error("--tokens must be at least 2 and --repeats at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    engine, reference = load_systems(torch.float32)
    ids = engine.tokenizer.encode_chat([{"role": "user", "content": args.question}])
    report(measure(engine, reference, ids, args), args, len(ids))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
