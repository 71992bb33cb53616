"""The ``edge-prism`` command: chat, info (and the refactor / eval / sweep / export tools)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

from edge_prism.cliargs import (add_model_args, add_runtime_args, add_sampling_args, load_engine, runtime_config,
                                sampling_kwargs)
from edge_prism.errors import EdgePrismError

log = logging.getLogger("edge_prism")


def summary_line(stats: dict) -> str:
    """The one-line figures printed on stderr after a reply."""
    from edge_prism.runtime.sizes import format_size

    parts = [f"{stats['generated_tokens']} tokens",
             f"{stats['decode_tokens_per_s']:.1f} tokens/s",
             f"time to first token {stats['time_to_first_token_s']:.2f} s"]
    if stats.get("token_latency_p50_ms") is not None:
        parts.append(f"p50/p99 {stats['token_latency_p50_ms']:.0f}/{stats['token_latency_p99_ms']:.0f} ms")
    if "memory_budget_bytes" in stats:
        parts.append(f"resident {format_size(stats['resident_bytes'])} of "
                     f"{format_size(stats['memory_budget_bytes'])}")
        parts.append(f"hit rate {stats['hit_rate']:.0%}")
        parts.append(f"moved {format_size(stats['bytes_to_device'])}")
        if stats.get("bytes_in_place"):
            parts.append(f"read in place {format_size(stats['bytes_in_place'])}")
        parts.append(f"transfer wait {stats['transfer_wait_s']:.2f} s")
    for key, label in (("prefetch_precision", "prefetch precision"), ("prefetch_recall", "recall")):
        if stats.get(key) is not None:
            parts.append(f"{label} {stats[key]:.0%}")
    if stats.get("dropped_subexperts"):
        parts.append(f"dropped {stats['dropped_subexperts_per_token']:.1f} sub-experts/token")
    if stats.get("tokens_within_budget") is not None:
        parts.append(f"{stats['tokens_within_budget']:.0%} tokens within budget")
    return "[" + ", ".join(parts) + "]"


# -- chat ----------------------------------------------------------------------------------
def cmd_chat(args: argparse.Namespace) -> int:
    """Chat with a model: a REPL on a terminal, one-shot with --prompt or piped input."""
    interactive = args.prompt is None and sys.stdin.isatty()
    prompt = args.prompt
    if not interactive and prompt is None:
        try:
            prompt = sys.stdin.read()
            prompt.encode("utf-8")  # under the C locale, undecodable bytes arrive as lone surrogates
        except UnicodeError as e:
            byte = e.object[e.start]
            byte = byte if isinstance(byte, int) else ord(byte) - 0xDC00
            raise EdgePrismError(f"stdin is not valid UTF-8 text (undecodable byte 0x{byte:02x}); "
                                 "pipe UTF-8 text, or pass --prompt TEXT") from None
        if not prompt.strip():
            raise EdgePrismError("no prompt: stdin was empty; pass --prompt TEXT or pipe text in")
    system = [{"role": "system", "content": args.system}] if args.system else []
    with load_engine(args) as engine:  # threads and pinned memory released on the way out
        if not interactive:
            _reply(engine, system + [{"role": "user", "content": prompt}], args)
            return 0
        return _repl(engine, system, args)


def _reply(engine, messages: list[dict], args: argparse.Namespace) -> str:
    pieces: list[str] = []
    stream = engine.stream_chat(messages, **sampling_kwargs(args))
    try:
        for piece in stream:
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
    finally:
        stream.close()
        sys.stdout.write("\n")
        sys.stdout.flush()
        print(summary_line(engine.stats), file=sys.stderr, flush=True)
    return "".join(pieces)


def _repl(engine, system: list[dict], args: argparse.Namespace) -> int:
    print(f"edge-prism chat with {engine.source.name}: /reset starts over, /exit or Ctrl-D quits, "
          "Ctrl-C stops a reply", file=sys.stderr)
    history = list(system)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history = list(system)
            engine.reset()  # the KV cache, and whatever an interrupted reply left held
            print("(conversation cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        try:
            reply = _reply(engine, history, args)
        except KeyboardInterrupt:
            reply = ""
            print("(reply stopped)", file=sys.stderr)
        except EdgePrismError as e:
            history.pop()
            print(f"error: {e}", file=sys.stderr)
            continue
        history.append({"role": "assistant", "content": reply})


# -- refactor / eval ---------------------------------------------------------------------------
def cmd_refactor(args: argparse.Namespace) -> int:
    """Split a model's experts into sub-experts and write a prism checkpoint."""
    from pathlib import Path

    from edge_prism.refactor.refactor import RefactorConfig, refactor

    cfg = RefactorConfig(sub_experts=args.sub_experts, calib_files=tuple(Path(f) for f in args.calib_file),
                         calib_tokens=args.calib_tokens, generated_share=args.generated_share,
                         solver=args.solver, seed=args.seed,
                         default_gate=args.gate, quant=args.quant, group_size=args.group_size,
                         permuted_down=args.permuted_down)
    report = refactor(args.model, Path(args.out), cfg, force=args.force, progress=True)
    obj = ", ".join(f"{k} {v:.4g}" for k, v in sorted(report.objective.items()))
    print(f"wrote {report.out} in {report.seconds:.1f} s ({report.calib_tokens} calibration tokens; "
          f"left-out activation mass per token: {obj})", file=sys.stderr)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Perplexity at each operating point, and the original model at top-k' for MoE models."""
    import json

    from edge_prism.evaluate import evaluate_model

    rows, usable = evaluate_model(args.model, runtime_config(args, operating_point=None),
                                  text_file=args.text_file, points=args.operating_points,
                                  max_tokens=args.max_tokens, baseline=not args.no_baseline)
    if args.json:
        print(json.dumps([r.as_dict() for r in rows]))
        return 0
    print(f"{'curve':8} {'K':>4} {'top-k':>5} {'perplexity':>11}")
    for r in rows:
        print(f"{r.curve:8} {r.operating_point:>4} {r.top_k if r.top_k else '':>5} {r.perplexity:>11.3f}")
    for curve, points in usable.items():
        print(f"{curve}: {len(points)} usable operating points (within 1.25x of full, monotone): {points}")
    return 0


# -- info ----------------------------------------------------------------------------------
def cmd_info(args: argparse.Namespace) -> int:
    """Print versions, devices, memory and where the default model is; with MODEL, its sizes."""
    if getattr(args, "model", None) is not None:
        return _model_info(args)
    import psutil
    import torch

    from edge_prism import __version__
    from edge_prism.runtime.device import gpu_info
    from edge_prism.runtime.sizes import format_size

    print(f"edge-prism {__version__}")
    print(f"torch {torch.__version__}, CUDA {torch.version.cuda or 'none'} "
          f"({'available' if torch.cuda.is_available() else 'not available'})")
    gpus = gpu_info()
    for g in gpus:
        print(f"GPU {g['name']}: {format_size(g['total'])} total, {format_size(g['free'])} free")
    if not gpus and torch.cuda.is_available():  # no NVML (a Jetson): ask the CUDA runtime
        for i in range(torch.cuda.device_count()):
            prop = torch.cuda.get_device_properties(i)
            shared = ", integrated (shares host RAM)" if prop.is_integrated else ""
            print(f"GPU {prop.name}: {format_size(prop.total_memory)} total{shared}")
    elif not gpus:
        print("GPU: none found (no NVIDIA driver or device)")
    vm = psutil.virtual_memory()
    print(f"host RAM: {format_size(vm.total)} total, {format_size(vm.available)} available; "
          f"{psutil.cpu_count(logical=False) or psutil.cpu_count()} CPU cores")
    print(f"quantized weights: {kernel_paths()}")
    print(f"sub-experts outside a memory budget: {miss_paths()}")
    print("prefetch under a memory budget: on for CUDA devices (their copy engine runs beside the kernels), "
          "off on CPUs (copies would take the compute's cores; misses read in place have nothing to "
          "load ahead); --prefetch / --no-prefetch override where misses are copied")
    try:
        from edge_prism.loaders.default import default_model_path

        print(f"default model: {default_model_path()}")
    except EdgePrismError as e:
        print(f"default model: {e}")
    return 0


def _model_info(args: argparse.Namespace) -> int:
    from edge_prism.info import describe
    from edge_prism.loaders import resolve_model
    from edge_prism.runtime.device import resolve_device

    path = resolve_model(args.model)
    for line in describe(path, memory_budget=args.memory_budget, operating_point=args.operating_point,
                         device=resolve_device(args.device)):
        print(line)
    return 0


def kernel_paths() -> str:
    """Which int4 kernel computes quantized weights on each device here."""
    import torch

    from edge_prism.quant import backend_for

    devices = [torch.device("cpu")] + [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    names = {"cpu-int4pack": "torch int4 kernel (bfloat16 activations)",
             "cuda-int4pack": "torch int4 tinygemm kernel (bfloat16)",
             "dequant": "no int4 kernel: each weight is expanded to the compute dtype in a scratch buffer"}
    return "; ".join(f"{d}: {names[backend_for(d).name]}" for d in devices)


def miss_paths() -> str:
    """How a sub-expert outside the memory budget reaches the kernels on each device here."""
    import torch

    from edge_prism.quant import backend_for

    cpu = ("read in place from the memory-mapped experts file (quantized prisms; float ones copy "
           "into slots); --host-tier disk copies them into slots"
           if backend_for(torch.device("cpu")).native_blocks else
           "copied from the memory-mapped experts file into slots (this CPU's int4 layout is not the stored one)")
    out = f"cpu: {cpu}"
    if torch.cuda.is_available():
        out += "; cuda: copied into device slots from pinned host RAM or the file (--host-tier)"
    return out


# -- entry point ---------------------------------------------------------------------------
Command = Callable[[argparse.Namespace], int]


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Command]]:
    """The argument parser and the handler of each subcommand."""
    from edge_prism.refactor.refactor import PERMUTED_DOWN, PERMUTED_DOWN_HELP, QUANT_HELP

    parser = argparse.ArgumentParser(
        prog="edge-prism",
        description="Run Mixture-of-Experts language models on devices that cannot hold them: "
                    "experts split into sub-experts, a memory budget of resident weights, "
                    "prefetching, and a token-latency budget.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    handlers: dict[str, Command] = {}

    chat = sub.add_parser("chat", help="chat with a model (REPL, or one-shot with --prompt / piped input)",
                          description="Chat with a model. On a terminal: an interactive REPL; with "
                                      "--prompt or piped stdin: the reply alone on stdout.")
    add_model_args(chat)
    chat.add_argument("--prompt", default=None, help="one-shot: reply to this text and exit")
    chat.add_argument("--system", default=None, help="system message")
    add_sampling_args(chat)
    add_runtime_args(chat)
    handlers["chat"] = cmd_chat

    ref = sub.add_parser("refactor", help="split experts into sub-experts (writes a prism checkpoint)",
                         description="Split every expert into sub-experts by a partition solver over "
                                     "activation statistics from calibration text, without retraining.")
    add_model_args(ref, positional=True)
    ref.add_argument("-o", "--out", required=True, help="output prism checkpoint directory")
    ref.add_argument("--sub-experts", type=int, default=None,
                     help="sub-experts per expert (default: 8 per routed expert; 24 per dense FFN "
                          "whose width is a multiple of 768, else 16)")
    ref.add_argument("--calib-file", action="append", default=[],
                     help="calibration text file (repeatable; default: text the model writes itself from "
                          "fixed prompts, cached per model, plus Python stdlib docstrings)")
    ref.add_argument("--calib-tokens", type=int, default=8192, help="calibration tokens")
    ref.add_argument("--generated-share", type=float, default=0.5,
                     help="without --calib-file: share of the calibration tokens the model writes itself "
                          "(0: docstrings only; default 0.5)")
    ref.add_argument("--solver", default="anneal", choices=("anneal", "greedy", "contiguous", "random"))
    ref.add_argument("--gate", default="linear", choices=("proxy", "linear"),
                     help="default sub-expert gate (both are stored; linear measured better)")
    ref.add_argument("--quant", default="auto", choices=("auto", "none", "int8", "int4"),
                     help="precision of the stored weights: " + QUANT_HELP)
    ref.add_argument("--group-size", type=int, default=32, choices=(32, 64, 128, 256),
                     help="values sharing one scale and zero when quantizing float weights (default 32)")
    ref.add_argument("--permuted-down", default="int8", choices=PERMUTED_DOWN, help=PERMUTED_DOWN_HELP)
    ref.add_argument("--seed", type=int, default=0)
    ref.add_argument("--force", action="store_true", help="replace an existing output")
    handlers["refactor"] = cmd_refactor

    ev = sub.add_parser("eval", help="perplexity per operating point on held-out text",
                        description="Perplexity at each operating point (and, for MoE models, the "
                                    "original model routed to top-k' experts for comparison).")
    add_model_args(ev, positional=True)
    add_runtime_args(ev, operating_point=False)
    ev.add_argument("--text-file", default=None, help="UTF-8 text (default: stdlib docstrings, eval split)")
    ev.add_argument("--operating-points", default="all", help="'all' or K,K,...")
    ev.add_argument("--max-tokens", type=int, default=4096, help="evaluate at most this many tokens")
    ev.add_argument("--no-baseline", action="store_true", help="skip the top-k' baseline curve")
    ev.add_argument("--json", action="store_true", help="print only a JSON list of rows on stdout")
    handlers["eval"] = cmd_eval

    from edge_prism.sweep import add_sweep_parser

    handlers["sweep"] = add_sweep_parser(sub)

    from edge_prism.export import add_export_parser

    handlers["export"] = add_export_parser(sub)

    from edge_prism.serve import add_serve_parser

    handlers["serve"] = add_serve_parser(sub)

    info = sub.add_parser("info", help="versions, devices, memory; with MODEL: will it fit?",
                          description="Show torch/CUDA versions, GPUs, host memory and the default model; "
                                      "with MODEL, before anything is built: its sizes per layer and "
                                      "precision, always-resident bytes, the minimum memory budget, the "
                                      "budget that holds the hot set, and the decode speed to expect here.")
    info.add_argument("model", nargs="?", default=None,
                      help="HF model directory, .gguf file, prism checkpoint, or 'default'")
    info.add_argument("--memory-budget", default=None, help="also estimate this budget (512MiB, 25%%...)")
    info.add_argument("-k", "--operating-point", type=int, default=None, help="operating point (default: full)")
    info.add_argument("--device", default="auto", help="device to estimate for (auto: cuda when available)")
    handlers["info"] = cmd_info
    return parser, handlers


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``edge-prism`` console script."""
    parser, handlers = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return handlers[args.command](args)
    except EdgePrismError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
