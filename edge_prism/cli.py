"""The ``edge-prism`` command: chat, info (and the refactor / eval / sweep tools)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

from edge_prism.errors import EdgePrismError

log = logging.getLogger("edge_prism")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid count '{text}': use a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"invalid count '{text}': use 0 or more")
    return value


def add_model_args(p: argparse.ArgumentParser, *, positional: bool = False) -> None:
    """Model and device options shared by every subcommand."""
    if positional:
        p.add_argument("model", nargs="?", default="default",
                       help="HF model directory, .gguf file, prism checkpoint, or 'default'")
    else:
        p.add_argument("-m", "--model", default="default",
                       help="HF model directory, .gguf file, prism checkpoint, or 'default' "
                            "(SmolLM2-135M-Instruct, the default)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="compute device (auto: cuda when available)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="compute dtype (default: float32 on CPU, bfloat16 on CUDA)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """Generation options."""
    p.add_argument("-n", "--max-new-tokens", type=_positive_int, default=256, help="tokens to generate at most")
    p.add_argument("-t", "--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-k", type=_positive_int, default=0, help="sample among the K likeliest (0: off)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")


def sampling_kwargs(args: argparse.Namespace) -> dict:
    """The sampling options of ``args`` as keyword arguments for Engine methods."""
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
            "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed}


def load_engine(args: argparse.Namespace):
    """An Engine for the model and runtime options in ``args``."""
    from edge_prism.api import load

    return load(args.model, device=args.device, dtype=args.dtype)


def summary_line(stats: dict) -> str:
    """The one-line figures printed on stderr after a reply."""
    parts = [f"{stats['generated_tokens']} tokens",
             f"{stats['decode_tokens_per_s']:.1f} tokens/s",
             f"time to first token {stats['time_to_first_token_s']:.2f} s"]
    return "[" + ", ".join(parts) + "]"


# -- chat ----------------------------------------------------------------------------------
def cmd_chat(args: argparse.Namespace) -> int:
    """Chat with a model: a REPL on a terminal, one-shot with --prompt or piped input."""
    interactive = args.prompt is None and sys.stdin.isatty()
    prompt = args.prompt
    if not interactive and prompt is None:
        prompt = sys.stdin.read()
        if not prompt.strip():
            raise EdgePrismError("no prompt: stdin was empty; pass --prompt TEXT or pipe text in")
    engine = load_engine(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
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
            engine.reset()
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


# -- info ----------------------------------------------------------------------------------
def cmd_info(args: argparse.Namespace) -> int:
    """Print versions, devices, memory and where the default model is."""
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
    if not gpus:
        print("GPU: none found (no NVIDIA driver or device)")
    vm = psutil.virtual_memory()
    print(f"host RAM: {format_size(vm.total)} total, {format_size(vm.available)} available; "
          f"{psutil.cpu_count(logical=False) or psutil.cpu_count()} CPU cores")
    try:
        from edge_prism.loaders.default import default_model_path

        print(f"default model: {default_model_path()}")
    except EdgePrismError as e:
        print(f"default model: {e}")
    return 0


# -- entry point ---------------------------------------------------------------------------
Command = Callable[[argparse.Namespace], int]


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Command]]:
    """The argument parser and the handler of each subcommand."""
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
    handlers["chat"] = cmd_chat

    info = sub.add_parser("info", help="versions, devices, memory, default model",
                          description="Show torch/CUDA versions, GPUs, host memory and the default model.")
    handlers["info"] = cmd_info
    del info
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
