"""The OpenAI-compatible server against the in-process engine, and under concurrent clients.

1. Streaming speed. The same greedy chat request (same prompt, same max_tokens) runs through
   ``Engine.stream_chat`` in this process and through ``edge-prism serve`` (a subprocess on a
   free loopback port, driven by the official openai client, streamed). Both are timed the
   same way, by the consumer: time to first token = request to first text piece; decode
   tokens/s = (completion tokens - 1) / (last piece - first piece). Runs alternate between
   the two after one warm-up each; the table shows medians and the ratio server / in-process
   (target >= 0.9x), and whether both gave the same text.
2. Concurrency. --clients threads each send --requests greedy chat requests back to back
   (their own prompt, half of them streamed), with no client-side retries. Each answer is
   counted as correct (the in-process engine's reply to that prompt), wrong, 503 (queue
   full), or lost (no answer: a timeout, a dropped connection, another status). The server's
   resident memory (RSS) is read before and after.

The machine may be shared: read ratios, not absolutes. Usage:
    python scripts/bench_serve.py -m default [--tokens 64] [--repeats 5] [--clients 8 --requests 4]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from edge_prism import cli

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
TOPICS = ("cats", "rivers", "the moon", "tea", "volcanoes", "bicycles", "bread", "owls",
          "glaciers", "violins", "deserts", "bees")
READY = re.compile(r"serving (\S+) at (http://\S+)/v1 ")


@dataclass(frozen=True)
class Timed:
    """One streamed reply as its consumer saw it."""

    text: str
    tokens: int
    ttft_s: float
    decode_s: float  # first piece to last piece
    engine_tokens_per_s: float = float("nan")  # the engine's own figure (engine.stats), for comparison

    @property
    def tokens_per_s(self) -> float:
        return (self.tokens - 1) / self.decode_s if self.decode_s > 0 else float("nan")


def time_pieces(start: float, pieces, tokens) -> Timed:
    """Consume ``pieces`` (text) and time them; ``tokens()`` gives the count afterwards."""
    text, first, last = [], None, start
    for piece in pieces:
        if not piece:
            continue
        last = time.perf_counter()
        first = first or last
        text.append(piece)
    first = first or last
    return Timed("".join(text), tokens(), first - start, last - first)


def in_process(engine, messages: list[dict], n: int) -> Timed:
    start = time.perf_counter()
    stream = engine.stream_chat(messages, max_new_tokens=n, temperature=0)
    timed = time_pieces(start, stream, lambda: engine.stats["generated_tokens"])
    return dataclasses.replace(timed, engine_tokens_per_s=engine.stats["decode_tokens_per_s"])


def through_server(client, model: str, messages: list[dict], n: int) -> Timed:
    usage = {}

    def pieces():
        for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=n, temperature=0,
                                                    stream=True, stream_options={"include_usage": True}):
            if chunk.usage is not None:
                usage["n"] = chunk.usage.completion_tokens
            if chunk.choices:
                yield chunk.choices[0].delta.content or ""

    start = time.perf_counter()
    timed = time_pieces(start, pieces(), lambda: usage["n"])
    return dataclasses.replace(timed, engine_tokens_per_s=server_metric(client, "decode_tokens_per_second"))


def server_metric(client, name: str) -> float:
    """A sample of the server's /metrics (the client's base URL ends in /v1)."""
    import httpx

    text = httpx.get(str(client.base_url).rstrip("/").removesuffix("/v1") + "/metrics", timeout=30).text
    found = re.search(rf"^edge_prism_{name} (\S+)$", text, re.M)
    return float(found.group(1)) if found else float("nan")


# -- the server subprocess --------------------------------------------------------------------
class Server:
    """``edge-prism serve`` in a subprocess, killed on exit."""

    def __init__(self, args: argparse.Namespace):
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        cmd = [sys.executable, "-m", "edge_prism.cli", "serve", "-m", args.model, "--port", "0",
               "--queue-size", str(args.queue_size)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if args.threads:  # the same compute threads as the in-process engine
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env)
        deadline = time.monotonic() + 600
        while not (found := READY.search(Path(self.log.name).read_text())):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise SystemExit(f"the server did not start:\n{Path(self.log.name).read_text()}")
            time.sleep(0.2)
        self.model, self.url = found.group(1), found.group(2)
        import httpx

        while True:
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)

    def client(self):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=600)

    def rss(self) -> int:
        return psutil.Process(self.proc.pid).memory_info().rss

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.unlink(self.log.name)


# -- the two measurements -------------------------------------------------------------------------
def speed(engine, server: Server, args: argparse.Namespace) -> None:
    messages = [{"role": "user", "content": PROMPT}]
    client = server.client()
    in_process(engine, messages, args.tokens)  # warm-ups
    through_server(client, server.model, messages, args.tokens)
    runs: dict[str, list[Timed]] = {"in-process": [], "server": []}
    for _ in range(args.repeats):
        runs["in-process"].append(in_process(engine, messages, args.tokens))
        runs["server"].append(through_server(client, server.model, messages, args.tokens))
    print(f"\nstreamed greedy chat, {args.tokens} new tokens at most, {args.repeats} runs each after a warm-up "
          "(alternating), medians")
    print("(decode tokens/s as the consumer sees the pieces arrive; engine: the engine's own decode_tokens_per_s)")
    print(f"{'system':12} {'tokens':>6} {'decode tokens/s':>16} {'engine tokens/s':>16} {'TTFT ms':>8}")
    med = {}
    for name, rs in runs.items():
        med[name] = statistics.median(r.tokens_per_s for r in rs)
        print(f"{name:12} {rs[0].tokens:>6} {med[name]:>16.2f} "
              f"{statistics.median(r.engine_tokens_per_s for r in rs):>16.2f} "
              f"{1000 * statistics.median(r.ttft_s for r in rs):>8.1f}")
    print(f"ratio server / in-process (decode tokens/s): {med['server'] / med['in-process']:.3f}x")
    same = all(r.text == runs["in-process"][0].text for rs in runs.values() for r in rs)
    print(f"same text in every run: {'yes' if same else 'NO'}")


def concurrency(engine, server: Server, args: argparse.Namespace) -> None:
    import openai

    prompts = [f"Tell me one fact about {TOPICS[i % len(TOPICS)]}." for i in range(args.clients)]
    expected = []
    for p in prompts:
        engine.reset()
        expected.append(engine.chat([{"role": "user", "content": p}], max_new_tokens=args.short_tokens, temperature=0))
    counts = {"correct": 0, "wrong": 0, "503": 0, "lost": 0}
    lock = threading.Lock()

    def client_loop(i: int) -> None:
        client = server.client()
        messages = [{"role": "user", "content": prompts[i]}]
        for _ in range(args.requests):
            try:
                if i % 2:
                    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                        model=server.model, messages=messages, max_tokens=args.short_tokens, temperature=0,
                        stream=True) if c.choices)
                else:
                    text = client.chat.completions.create(model=server.model, messages=messages,
                                                          max_tokens=args.short_tokens,
                                                          temperature=0).choices[0].message.content
                outcome = "correct" if text == expected[i] else "wrong"
            except openai.APIStatusError as e:
                outcome = "503" if e.status_code == 503 else "lost"
            except openai.APIError:
                outcome = "lost"
            with lock:
                counts[outcome] += 1

    rss_before = server.rss()
    start = time.perf_counter()
    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    rss_after = server.rss()
    total = args.clients * args.requests
    print(f"\n{args.clients} concurrent clients x {args.requests} requests (greedy, {args.short_tokens} new tokens, "
          f"half streamed, no retries), --queue-size {args.queue_size}: {wall:.1f} s")
    print(", ".join(f"{k} {v}" for k, v in counts.items()) + f" (of {total})")
    print(f"server RSS before {rss_before / 2**20:.1f} MiB, after {rss_after / 2**20:.1f} MiB "
          f"({(rss_after - rss_before) / 2**20:+.1f} MiB)")


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 "unknown CPU")
    import torch

    return (f"{model}, {psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM; "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads; load average "
            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} at start")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench_serve.py", description=__doc__.split("\n\n")[0])
    cli.add_model_args(p)
    p.add_argument("--tokens", type=int, default=64, help="new tokens of the speed runs")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per system")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=4, help="requests per client")
    p.add_argument("--short-tokens", type=int, default=16, help="new tokens of the concurrency requests")
    p.add_argument("--queue-size", type=int, default=16, help="the server's --queue-size")
    p.add_argument("--threads", type=int, default=None,
                   help="torch compute threads, in-process and in the server (default: torch's, one per core); "
                        "on a busy shared machine 1 is steadier")
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    print(machine())
    engine = cli.load_engine(args)  # the runtime options a plain `serve -m MODEL` uses
    server = Server(args)  # after the in-process load: a default prism is built once, here
    try:
        print(f"model {server.model}; server at {server.url}")
        speed(engine, server, args)
        concurrency(engine, server, args)
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
