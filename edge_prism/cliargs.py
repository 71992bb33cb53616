"""Command-line options shared by the ``edge-prism`` subcommands (chat, eval, sweep, serve,
export): argparse types, the model/sampling/runtime option groups, and the Engine they
describe. A module of its own so that the subcommands' modules and cli.py, which
dispatches to them, do not import each other."""

from __future__ import annotations

import argparse
import math
from typing import Callable


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid count '{text}': use a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"invalid count '{text}': use 0 or more")
    return value


def _finite(what: str) -> Callable[[str], float]:
    """An argparse type: a finite number (nan and inf are refused here; ranges are checked
    where the value is used, with the same message the Python API gives)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"invalid {what} '{text}': use a finite number")
        return value

    return parse


def _seed(text: str) -> int:
    """An argparse type: a seed torch accepts (a whole number from -2**63 to 2**64-1)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid seed '{text}': use a whole number") from None
    if not -(2**63) <= value < 2**64:
        raise argparse.ArgumentTypeError(f"invalid seed '{text}': use a whole number from -2**63 to 2**64-1")
    return value


def _device(text: str) -> str:
    """An argparse type: auto, cpu, cuda or cuda:N (whether it exists is checked at load)."""
    value = text.strip().lower()
    index = value.removeprefix("cuda:")
    if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and index.isascii() and index.isdigit()):
        return value
    raise argparse.ArgumentTypeError(f"invalid device '{text}': use auto, cpu, cuda or cuda:N")


def add_model_args(p: argparse.ArgumentParser, *, positional: bool = False) -> None:
    """Model and device options shared by every subcommand."""
    if positional:
        p.add_argument("model", nargs="?", default="default",
                       help="HF model directory, .gguf file, prism checkpoint, or 'default'")
    else:
        p.add_argument("-m", "--model", default="default",
                       help="HF model directory, .gguf file, prism checkpoint, or 'default' "
                            "(SmolLM2-135M-Instruct, the default)")
    p.add_argument("--device", default="auto", type=_device, metavar="{auto,cpu,cuda,cuda:N}",
                   help="compute device (auto: cuda when available)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"),
                   help="compute dtype (default: float32 on CPU, bfloat16 on CUDA from compute capability "
                        "8.0, float16 below it)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """Generation options."""
    p.add_argument("-n", "--max-new-tokens", type=_positive_int, default=256, help="tokens to generate at most")
    p.add_argument("-t", "--temperature", type=_finite("temperature"), default=0.7, help="0 = greedy")
    p.add_argument("--top-k", type=_positive_int, default=0, help="sample among the K likeliest (0: off)")
    p.add_argument("--top-p", type=_finite("top-p"), default=0.95, help="nucleus sampling mass")
    p.add_argument("--seed", type=_seed, default=None, help="seed for reproducible sampling")


def sampling_kwargs(args: argparse.Namespace) -> dict:
    """The sampling options of ``args`` as keyword arguments for Engine methods."""
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
            "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed}


def add_runtime_args(p: argparse.ArgumentParser, *, operating_point: bool = True) -> None:
    """Operating point and memory-budget options (prism checkpoints)."""
    if operating_point:
        p.add_argument("-k", "--operating-point", type=int, default=None,
                       help="active sub-experts per token per MoE layer (default: full, exact)")
    p.add_argument("--gate", default=None, choices=("proxy", "linear"),
                   help="sub-expert gate (default: the checkpoint's)")
    p.add_argument("--memory-budget", default=None,
                   help="resident sub-expert bytes: 512MiB, 1.5GiB, 25%%, a byte count or auto "
                        "(default: all resident)")
    p.add_argument("--policy", default="lru", choices=("lru", "lfu"),
                   help="replacement policy of the non-pinned slots")
    p.add_argument("--prefetch", dest="prefetch", action="store_true", default=None,
                   help="predict and load sub-experts ahead of use (default: on CUDA devices, off on CPUs)")
    p.add_argument("--no-prefetch", dest="prefetch", action="store_false", help="never prefetch")
    p.add_argument("--token-latency-ms", type=_finite("token latency budget"), default=None,
                   help="decode-token latency budget: run fewer sub-experts rather than miss it")
    p.add_argument("--host-tier", default="auto", choices=("auto", "ram", "disk"),
                   help="under a memory budget, where the other sub-experts wait: ram (pinned host memory), "
                        "disk (read from the checkpoint file; the default on Jetson and on the CPU) or auto")
    p.add_argument("--max-context", type=_positive_int, default=None,
                   help="tokens the KV cache holds at most (default: the model's); lower it to fit memory")
    p.add_argument("--uniform-layers", dest="layer_allocation", action="store_false", default=True,
                   help="run every layer at the operating point (default: spread its sub-experts across "
                        "layers by the checkpoint's measured layer sensitivity, where it has one)")
    p.add_argument("--no-compensation", dest="compensation", action="store_false", default=True,
                   help="below full K, let dropped sub-experts contribute nothing (default: add back each "
                        "one's mean output on the calibration text, where the checkpoint stores it)")


def runtime_config(args: argparse.Namespace, **override):
    """The RuntimeConfig the options in ``args`` describe."""
    from edge_prism.api import RuntimeConfig

    fields = dict(device=args.device, dtype=args.dtype,
                  operating_point=getattr(args, "operating_point", None),
                  gate=getattr(args, "gate", None),
                  memory_budget=getattr(args, "memory_budget", None),
                  policy=getattr(args, "policy", "lru"),
                  prefetch=getattr(args, "prefetch", None),
                  token_latency_ms=getattr(args, "token_latency_ms", None),
                  host_tier=getattr(args, "host_tier", "auto"),
                  max_context=getattr(args, "max_context", None),
                  layer_allocation=getattr(args, "layer_allocation", True),
                  compensation=getattr(args, "compensation", True))
    fields.update(override)
    return RuntimeConfig(**fields)


def load_engine(args: argparse.Namespace):
    """An Engine for the model and runtime options in ``args``.

    The default model runs from its prism checkpoint, built into the user cache on first use.
    """
    from edge_prism.api import default_prism, load_with

    model = args.model
    if model in (None, "default"):
        model = default_prism(progress=True)
    return load_with(model, runtime_config(args))
