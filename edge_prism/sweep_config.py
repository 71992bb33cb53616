"""What a memory-budget sweep measures (SweepConfig) and what it records (SweepRow).

The leaf of the sweep modules: subjects, measurement, baselines and the report all read
these; it imports none of them (nor torch), so rows can be read and tabulated anywhere.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edge_prism.errors import ConfigError

if TYPE_CHECKING:  # a type only: rows and tables need no torch
    from edge_prism.synthetic import SyntheticConfig

SYSTEMS = ("edge-prism", "edge-prism+prefetch", "subexpert-lru", "expert-lru", "all-resident",
           "transformers+accelerate", "bound")
REFERENCE = "subexpert-lru"  # ratios are against the paper's offloading manager
ALL = "all"  # the memory_budget label of rows with every sub-expert resident


@dataclass(frozen=True)
class SweepConfig:
    """What one sweep measures: budgets x operating points x systems, and how."""

    memory_budgets: tuple[str, ...] = ("10%", "25%", "50%", "100%")
    operating_points: tuple[int, ...] | None = None  # None: full K only
    new_tokens: int = 32  # greedy decode length per prompt
    prompt_tokens: int = 64
    device: str = "auto"
    dtype: str | None = None
    repeats: int = 1  # prompts per measurement (different text windows, the same for every system)
    baselines: bool = True
    policy: str = "lru"  # edge-prism's dynamic region
    synthetic: SyntheticConfig | None = None  # set: sweep this synthetic model instead of a checkpoint
    threads: int | None = None  # CPU threads for compute during the sweep (None: torch's default)
    progress: bool = False
    # Token-latency budgets as multiples of edge-prism's unconstrained p50 at the same budget
    # (prism checkpoints only: the synthetic builder has no latency planner).
    latency_factors: tuple[float, ...] = (0.7, 3.0)

    def __post_init__(self) -> None:
        if not self.memory_budgets:
            raise ConfigError("no memory budgets: give at least one, like --memory-budgets 10%,25%,50%")
        if self.new_tokens < 2:
            raise ConfigError(f"invalid -n {self.new_tokens}: decode at least 2 tokens")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"invalid --threads {self.threads}: use 1 or more")
        if self.prompt_tokens < 1 or self.repeats < 1:
            raise ConfigError(f"invalid --prompt-tokens {self.prompt_tokens} / --repeats {self.repeats}: "
                              "use 1 or more")


@dataclass(frozen=True)
class SweepRow:
    """One system at one memory budget and operating point. None: not measured / not defined."""

    system: str
    memory_budget: str  # as given ('25%', '512MiB'), or 'all'
    operating_point: int
    tokens_per_s: float | None  # decode tokens per second
    ttft_s: float | None  # prefill of the prompt, to the first token
    hit_rate: float | None  # sub-expert blocks found resident / asked for, during decode
    bytes_per_token: float | None  # bytes moved to the device per decoded token
    p50_ms: float | None  # decode token latency percentiles
    p99_ms: float | None
    perplexity: float | None  # measured quality at this operating point (prism quality.json)
    synthetic: bool  # random weights: speed and traffic only, no quality
    device: str
    model: str = ""
    budget_bytes: int | None = None
    tokens: int = 0  # decoded tokens measured
    note: str = ""
    latency_budget_ms: float | None = None  # token-latency budget rows only
    within_budget: float | None = None  # fraction of decode tokens within it
    dropped_per_token: float | None = None  # sub-experts dropped per decode token (all layers)
    kl_vs_full: float | None = None  # mean KL(undegraded || degraded) of next-token distributions
    same_tokens: float | None = None  # fraction of greedy tokens equal to the undegraded engine's

    def as_dict(self) -> dict:
        """CSV-ready dict (None as an empty cell)."""
        return {k: ("" if v is None else v) for k, v in dataclasses.asdict(self).items()}


COLUMNS = tuple(f.name for f in dataclasses.fields(SweepRow))

__all__ = ["SYSTEMS", "REFERENCE", "ALL", "SweepConfig", "SweepRow", "COLUMNS"]
