"""Memory accounting: every byte an engine will hold, per memory, checked before any of it
is allocated.

[dense weights + KV cache at max context (+ its growth) + workspace + sub-expert slots]
-> device memory; [sub-experts in page-locked RAM + staging buffers] -> host memory. On a
CPU or an integrated GPU (a Jetson) the two are one memory and are checked together.

Plain arithmetic over sizes (no tensors): ``edge_prism.api.memory_report`` fills it in
from a checkpoint, and ``memory_budget='auto'`` is what is left for the slots.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

from edge_prism.errors import BudgetError

from .sizes import format_size

logger = logging.getLogger(__name__)

AUTO_HEADROOM = 0.9  # 'auto' plans for 90% of the free memory: allocator slack, fragmentation
INITIAL_KV_POSITIONS = 256  # the model's first KV cache reservation


def kv_positions(max_context: int, *, initial: int = INITIAL_KV_POSITIONS) -> tuple[int, int]:
    """(positions held at rest, positions held at the peak) in the worst case for a cache
    that holds up to ``max_context`` positions and grows as the model's caches do:
    ``capacity = max(needed, 2 * capacity, 64)`` with both copies alive while it grows.

    The worst history is a prefill to ``max_context - 1`` positions (an exact capacity)
    followed by one more token: the capacity doubles to ``2 * (max_context - 1)``, and while
    it is copied both exist.
    """
    if max_context <= initial:
        return initial, initial
    old = max_context - 1
    rest = max(max_context, 2 * old)
    return rest, old + rest


@dataclass(frozen=True)
class MemoryReport:
    """Bytes an engine holds, per item and per memory, against what is free.

    ``unified``: device and host are one memory (CPU, integrated GPU); every item is then
    checked against ``device_free_bytes``.
    """

    device: str
    unified: bool
    max_context: int
    dense_bytes: int  # always-resident weights (embeddings, attention, norms, routers, gates)
    kv_cache_bytes: int  # KV cache holding max_context positions
    kv_growth_bytes: int  # more, at the worst moment of its growth by doubling
    workspace_bytes: int  # activations of the largest step (a max_context prefill), estimated
    slot_pool_bytes: int  # sub-expert slots (the memory budget), or every sub-expert resident
    host_tier_bytes: int  # sub-experts outside the budget kept in page-locked host RAM
    staging_bytes: int  # pinned staging and conversion buffers of the transfers
    memory_budget_bytes: int | None  # None: every sub-expert resident
    device_free_bytes: int
    host_available_bytes: int

    @property
    def device_bytes(self) -> int:
        """Bytes in device memory (all of them when the memory is unified)."""
        on_device = (self.dense_bytes + self.kv_cache_bytes + self.kv_growth_bytes + self.workspace_bytes
                     + self.slot_pool_bytes)
        return on_device + (self.host_bytes if self.unified else 0)

    @property
    def host_bytes(self) -> int:
        """Bytes in (page-locked) host memory."""
        return self.host_tier_bytes + self.staging_bytes

    def problem(self) -> str | None:
        """Why this does not fit, with what to lower; None when it fits."""
        if self.device_bytes > self.device_free_bytes:
            where = "memory" if self.unified else "device memory"
            return (f"the engine needs {format_size(self.device_bytes)} of {where} but {self.device} has "
                    f"{format_size(self.device_free_bytes)} free ({self.items()}); "
                    f"{self._advice()}")
        if not self.unified and self.host_bytes > self.host_available_bytes:
            return (f"the engine needs {format_size(self.host_bytes)} of page-locked host RAM for sub-experts "
                    f"but {format_size(self.host_available_bytes)} is available; use --host-tier disk")
        return None

    def check(self) -> None:
        """Raise BudgetError naming what to lower when this does not fit."""
        why = self.problem()
        if why is not None:
            raise BudgetError(why)

    def items(self) -> str:
        """The items, largest first, for messages."""
        parts = [("dense weights", self.dense_bytes),
                 (f"KV cache at {self.max_context} tokens", self.kv_cache_bytes + self.kv_growth_bytes),
                 ("workspace", self.workspace_bytes),
                 ("sub-expert slots" if self.memory_budget_bytes is not None else "sub-experts", self.slot_pool_bytes)]
        if self.unified:
            parts += [("pinned sub-experts", self.host_tier_bytes), ("staging", self.staging_bytes)]
        return ", ".join(f"{name} {format_size(n)}" for name, n in sorted(parts, key=lambda p: -p[1]) if n)

    def _advice(self) -> str:
        kv = self.kv_cache_bytes + self.kv_growth_bytes + self.workspace_bytes
        lower = []
        if self.memory_budget_bytes is not None:
            lower.append("--memory-budget")
        elif self.slot_pool_bytes:
            lower.append("--memory-budget (e.g. auto)")
        if kv > 0.1 * self.device_bytes or not lower:
            lower.append("--max-context")
        advice = "lower " + " or ".join(lower)
        if self.unified and self.host_tier_bytes:
            advice += ", or use --host-tier disk"
        return advice

    def lines(self) -> list[str]:
        """One line per item, for logs and ``edge-prism info MODEL``."""
        kv = f"{format_size(self.kv_cache_bytes)} (+{format_size(self.kv_growth_bytes)} while growing)"
        out = [f"memory on {self.device} ({'one memory for device and host' if self.unified else 'discrete'}):",
               f"  dense weights       {format_size(self.dense_bytes)}",
               f"  KV cache            {kv} at {self.max_context} tokens",
               f"  workspace           {format_size(self.workspace_bytes)} (estimate, largest prefill)",
               f"  sub-expert slots    {format_size(self.slot_pool_bytes)}"
               + ("" if self.memory_budget_bytes is None else f" (budget {format_size(self.memory_budget_bytes)})"),
               f"  pinned sub-experts  {format_size(self.host_tier_bytes)}",
               f"  staging buffers     {format_size(self.staging_bytes)}",
               f"  total {format_size(self.device_bytes)} of {format_size(self.device_free_bytes)} free"
               + ("" if self.unified else f"; host {format_size(self.host_bytes)} of "
                                           f"{format_size(self.host_available_bytes)} available")]
        return out

    def as_dict(self) -> dict:
        """Every field, the two totals and ``fits``/``problem``."""
        out = asdict(self)
        out.update(device_total_bytes=self.device_bytes, host_total_bytes=self.host_bytes,
                   problem=self.problem(), fits=self.problem() is None)
        return out


def auto_budget(*, free: int, fixed: int, experts: int) -> int:
    """The memory budget 'auto' stands for: what ``AUTO_HEADROOM`` of ``free`` leaves after
    the ``fixed`` items (dense weights, KV cache, workspace, staging), at most every sub-expert."""
    return max(0, min(experts, int(AUTO_HEADROOM * free) - fixed))


__all__ = ["MemoryReport", "auto_budget", "kv_positions", "AUTO_HEADROOM"]
