"""Next-token choice: greedy, or temperature / top-k / top-p sampling with a seed."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edge_prism.errors import ConfigError


@dataclass(frozen=True)
class SamplingConfig:
    """How to pick tokens. ``temperature=0`` is greedy (deterministic)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ConfigError(f"invalid max_new_tokens {self.max_new_tokens}: use 0 or more")
        if self.temperature < 0:
            raise ConfigError(f"invalid temperature {self.temperature}: use 0 (greedy) or more")
        if self.top_k < 0:
            raise ConfigError(f"invalid top_k {self.top_k}: use 0 (off) or a positive count")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"invalid top_p {self.top_p}: use a value in (0, 1]")


class Sampler:
    """Stateful sampler: one generator per generation, so a seed reproduces a reply."""

    def __init__(self, cfg: SamplingConfig):
        self.cfg = cfg
        self.gen = torch.Generator()
        if cfg.seed is not None:
            self.gen.manual_seed(cfg.seed)
        else:
            self.gen.seed()

    def __call__(self, logits: torch.Tensor) -> int:
        """A token id from ``logits`` [V] (float32)."""
        cfg = self.cfg
        if cfg.temperature == 0.0:
            return int(torch.argmax(logits))
        logits = logits.float().cpu() / cfg.temperature  # [V]
        if cfg.top_k:
            kth = torch.topk(logits, min(cfg.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if cfg.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
            # Drop tokens once the mass before them already reaches top_p (always keep one).
            drop = (cum - torch.softmax(sorted_logits, dim=-1)) >= cfg.top_p
            logits = logits.index_fill(0, order[drop], float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.gen))
