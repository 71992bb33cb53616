"""BudgetedStore: the model's ExpertStore when sub-experts must fit a memory budget.

wanted units -> [ResidencyPolicy: hit | admit (evict by policy)] -> [Transferer: host tier ->
slot] -> wait only for this layer's loads -> slot indices -> batched kernels -> done()

One slot pool per sub-expert block shape (layers of a model may differ: dense layers
among MoE layers). Each pool is preallocated at load; nothing is allocated per token.
The hottest sub-experts by the activation profile fill a pinned region first; the rest
of the slots are a cachetools-managed region (LRU or LFU).
"""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass
from typing import Callable, Collection, Sequence

import torch

from edge_prism.errors import BudgetError
from edge_prism.types import SubExpertId

from .device import host_available_bytes, pin
from .policy import ResidencyPolicy
from .sizes import format_size
from .transfer import FileTier, HostTier, MemoryTier, SlotPool, Ticket, Transferer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerBlocks:
    """Where one layer's sub-expert blocks live in the prism checkpoint file."""

    layer: int
    parts: int  # S
    units: int  # E*S
    block_shape: tuple[int, ...]  # (3, n, D)
    dtype: torch.dtype
    offset: int  # byte offset of the layer's [E*S, 3, n, D] tensor
    order: Sequence[int]  # unit id at each storage position
    frequency: Sequence[float]  # activation profile, per unit id
    max_selection: int  # largest number of units one decode token selects in this layer


@dataclass
class _Pool:
    pool: SlotPool
    policy: ResidencyPolicy
    transfer: Transferer
    index: dict[SubExpertId, int]  # key -> block index in this pool's host tier
    min_slots: int
    hottest: list[SubExpertId]  # every key of the pool, hottest first (warm-up order)


@dataclass
class StoreStats:
    """Counters since load (or the last reset)."""

    hits: int = 0
    misses: int = 0
    bytes_to_device: int = 0
    transfer_wait_s: float = 0.0
    prefetch_issued: int = 0
    prefetch_used: int = 0
    prefetched_unused_bytes: int = 0
    prefetch_cancelled: int = 0
    prefetch_late: int = 0  # prefetched sub-experts still in flight when needed


def plan_slots(layers: Sequence[LayerBlocks], budget_bytes: int) -> dict[tuple, int]:
    """Slots per block shape: every shape's minimum, the rest in proportion to its bytes."""
    shapes: dict[tuple, dict] = {}
    for lb in layers:
        nbytes = _block_bytes(lb)
        s = shapes.setdefault((lb.block_shape, lb.dtype), {"bytes": nbytes, "units": 0, "min": 0})
        s["units"] += lb.units
        s["min"] = max(s["min"], lb.max_selection)
    minimum = sum(s["min"] * s["bytes"] for s in shapes.values())
    if budget_bytes < minimum:
        raise BudgetError(f"memory budget {format_size(budget_bytes)} cannot run one layer's largest "
                          f"selection of sub-experts: minimum is {format_size(minimum)} "
                          f"({minimum} bytes); raise --memory-budget")
    total = sum(s["units"] * s["bytes"] for s in shapes.values())
    spare = budget_bytes - minimum
    out = {}
    for key, s in shapes.items():
        share = spare * (s["units"] * s["bytes"]) / total
        out[key] = min(s["units"], s["min"] + int(share // s["bytes"]))
    return out


def minimum_budget(layers: Sequence[LayerBlocks]) -> int:
    """The smallest budget that runs every layer's largest selection."""
    mins: dict[tuple, int] = {}
    for lb in layers:
        key = (lb.block_shape, lb.dtype)
        mins[key] = max(mins.get(key, 0), lb.max_selection * _block_bytes(lb))
    return sum(mins.values())


def _block_bytes(lb: LayerBlocks) -> int:
    n = 1
    for d in lb.block_shape:
        n *= d
    return n * lb.dtype.itemsize


TierFactory = Callable[[list[LayerBlocks], list[int], int], HostTier]
"""(layers of one block shape, byte offset of each block, bytes per block) -> host tier."""


def prism_tiers(path, device: torch.device, *, host: str = "auto", formats: dict | None = None,
                backend=None) -> TierFactory:
    """Host tiers over a prism checkpoint's experts.safetensors.

    CPU device: the file itself (read with pread, so blocks outside the budget never sit in
    process memory). CUDA: every block in page-locked RAM when it fits (``host='auto'``),
    else the file through pinned staging buffers (``host='disk'`` forces this).

    Quantized layers (``formats``: layer -> quant.UnitFormat) are stored in a portable
    layout; each block is turned into ``backend``'s kernel layout on its way into a slot
    (the file tier) or once at load (page-locked RAM).
    """

    def make(group: list[LayerBlocks], offsets: list[int], nbytes: int) -> HostTier:
        lb0 = group[0]
        file_tier: HostTier = FileTier(path, offsets, nbytes, lb0.dtype, lb0.block_shape)
        fmts = [(formats or {}).get(lb.layer) for lb in group for _ in range(lb.units)]
        if any(fmts):
            file_tier = ConvertingTier(file_tier, [functools.partial(f.to_kernel, backend=backend)
                                                   for f in fmts])
        if device.type != "cuda" or host == "disk":
            return file_tier
        total = len(offsets) * nbytes
        if host == "auto" and total > 0.8 * host_available_bytes():
            logger.info("host RAM cannot hold %s of sub-experts: streaming from disk", format_size(total))
            return file_tier
        blocks = torch.empty((len(offsets), *lb0.block_shape), dtype=lb0.dtype)
        for i in range(len(offsets)):
            file_tier.read_into(i, blocks[i])
        file_tier.close()
        return MemoryTier(pin(blocks))

    return make


class ConvertingTier:
    """A host tier whose blocks are converted on the way out (storage layout -> kernel layout).

    Each reading thread reads into its own host buffer, then converts into the destination.
    """

    def __init__(self, tier: HostTier, converters: list[Callable[[torch.Tensor, torch.Tensor], None]]):
        self.tier, self.converters = tier, converters
        self._local = threading.local()

    def read_into(self, index: int, dst: torch.Tensor) -> None:
        """Block ``index`` into ``dst`` in the kernel's layout."""
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.shape != dst.shape:
            buf = self._local.buf = torch.empty(dst.shape, dtype=dst.dtype)
        self.tier.read_into(index, buf)
        self.converters[index](buf, dst)

    def close(self) -> None:
        """Close the underlying tier."""
        self.tier.close()


class BudgetedStore:
    """An ExpertStore holding at most ``budget_bytes`` of sub-expert blocks on ``device``."""

    def __init__(self, tiers: TierFactory, layers: Sequence[LayerBlocks], *, budget_bytes: int,
                 device: torch.device, policy: str = "lru", workers: int = 2, pin_hot: bool = True):
        self.device = device
        self.pin_hot = pin_hot  # False: every slot replaceable (a plain cache, for baselines)
        self.layers = list(layers)
        self.budget_bytes = budget_bytes
        self.stats = StoreStats()
        slots = plan_slots(self.layers, budget_bytes)
        self._pools: dict[tuple, _Pool] = {}
        self._layer_pool: list[_Pool] = []
        self._held: list[tuple[list[SubExpertId], list[int]]] = [([], []) for _ in self.layers]
        self._inflight: dict[SubExpertId, Ticket] = {}
        self._prefetched: set[SubExpertId] = set()
        by_shape: dict[tuple, list[LayerBlocks]] = {}
        for lb in self.layers:
            by_shape.setdefault((lb.block_shape, lb.dtype), []).append(lb)
        for key, group in by_shape.items():
            self._pools[key] = self._make_pool(tiers, group, slots[key], policy=policy, workers=workers)
        self._layer_pool = [self._pools[(lb.block_shape, lb.dtype)] for lb in self.layers]
        self._warm()

    # -- construction ------------------------------------------------------------------
    def _make_pool(self, tiers: TierFactory, group: list[LayerBlocks], num_slots: int, *, policy: str,
                   workers: int) -> _Pool:
        lb0 = group[0]
        nbytes = _block_bytes(lb0)
        offsets, index, heat = [], {}, []
        for lb in group:
            for pos, unit in enumerate(lb.order):
                key = SubExpertId(lb.layer, int(unit) // lb.parts, int(unit) % lb.parts)
                index[key] = len(offsets)
                offsets.append(lb.offset + pos * nbytes)
                heat.append((-float(lb.frequency[int(unit)]), lb.layer, int(unit), key))
        min_slots = max(lb.max_selection for lb in group)
        # The dynamic region must hold a layer's largest selection (and room to prefetch);
        # the hottest sub-experts fill the rest for good.
        dynamic = min(num_slots, max(2 * min_slots, num_slots // 4)) if self.pin_hot else num_slots
        hottest = [h[3] for h in sorted(heat)]
        # Slots in (layer, expert, part) order, so a layer whose selection is all pinned
        # gathers one contiguous run (a view, no copy).
        pinned = sorted(hottest[: num_slots - dynamic])
        pool = SlotPool(num_slots, lb0.block_shape, lb0.dtype, self.device)
        tier = tiers(group, offsets, nbytes)
        transfer = Transferer(pool, tier, self.device, workers=workers)
        pol = ResidencyPolicy(num_slots, policy=policy, pinned=pinned)
        logger.info("slot pool %s x %d: %d pinned, %d dynamic (%s)", lb0.block_shape, num_slots,
                    len(pinned), num_slots - len(pinned), format_size(num_slots * nbytes))
        return _Pool(pool, pol, transfer, index, min_slots, hottest)

    def _warm(self) -> None:
        """Fill every slot with the hottest sub-experts (pinned first, then the dynamic region)."""
        for p in self._pools.values():
            tickets = [p.transfer.submit(p.index[key], slot) for key, slot in p.policy.pinned.items()]
            for key in p.hottest[len(tickets):]:
                if p.policy.free_slots() == 0:
                    break
                slot, _ = p.policy.admit(key)
                tickets.append(p.transfer.submit(p.index[key], slot))
            p.transfer.wait(tickets)
            p.transfer.bytes_moved = 0

    # -- ExpertStore -------------------------------------------------------------------
    def capacity(self, layer: int) -> int:
        """Most units one call of slots() may ask for in ``layer`` (the dynamic region)."""
        p = self._layer_pool[layer]
        return p.pool.num_slots - len(p.policy.pinned)

    def slots(self, layer: int, units: torch.Tensor) -> torch.Tensor:
        """Make ``units`` resident (loading misses), return their slots; waits for this layer only."""
        p, S = self._layer_pool[layer], self.layers[layer].parts
        keys = [SubExpertId(layer, u // S, u % S) for u in units.tolist()]
        want = set(keys)
        slots, tickets = [], []
        for key in keys:
            slot = p.policy.lookup(key)
            if slot is None:
                slot, evicted = p.policy.admit(key, protect=want)
                if evicted is not None:
                    self._forget(evicted, p)
                tickets.append(p.transfer.submit(p.index[key], slot))
                self.stats.misses += 1
                self.stats.bytes_to_device += p.pool.slot_nbytes
            else:
                pending = self._inflight.pop(key, None)
                if pending is not None:
                    tickets.append(pending)  # landed: returns at once, or raises a failed load
                if pending is not None and not pending.done():
                    # Prefetched but still in flight: the compute waits, so not a hit.
                    self.stats.misses += 1
                    self.stats.prefetch_late += 1
                else:
                    self.stats.hits += 1
                if key in self._prefetched:
                    self._prefetched.discard(key)
                    self.stats.prefetch_used += 1
            slots.append(slot)
        p.policy.acquire(keys)
        self.stats.transfer_wait_s += p.transfer.wait(tickets)
        self._held[layer] = (keys, slots)
        return torch.tensor(slots, dtype=torch.long)

    def pool(self, layer: int) -> torch.Tensor:
        """The slot buffer of ``layer``'s block shape [num_slots, 3, n, D]."""
        return self._layer_pool[layer].pool.buffer

    def done(self, layer: int) -> None:
        """Kernels reading this layer's slots are issued: release them after they finish."""
        p = self._layer_pool[layer]
        keys, slots = self._held[layer]
        p.transfer.mark_read(slots)
        p.policy.release(keys)
        self._held[layer] = ([], [])

    # -- prefetch ----------------------------------------------------------------------
    def prefetch(self, layer: int, units: Sequence[int], *, protect: Collection[SubExpertId] = ()) -> int:
        """Start loading predicted ``units`` of ``layer`` not yet resident, best first.

        Never evicts an in-use sub-expert (the current layer's) nor a key in ``protect``
        (nearer predictions); stops at the first unit that finds no evictable slot.
        Returns how many loads were issued.
        """
        p, S = self._layer_pool[layer], self.layers[layer].parts
        keys = [SubExpertId(layer, u // S, u % S) for u in units]
        keep = set(protect) | set(keys)
        issued = 0
        for key in keys:
            if p.policy.contains(key):
                continue
            try:
                slot, evicted = p.policy.admit(key, protect=keep)
            except BudgetError:
                break
            if evicted is not None:
                self._forget(evicted, p)
            self._inflight[key] = p.transfer.submit(p.index[key], slot)
            self._prefetched.add(key)
            self.stats.prefetch_issued += 1
            self.stats.bytes_to_device += p.pool.slot_nbytes
            issued += 1
        return issued

    def drop_stale(self, layer: int, units: Collection[int]) -> None:
        """Predicted ``units`` of ``layer`` were not selected: cancel their loads still queued."""
        p, S = self._layer_pool[layer], self.layers[layer].parts
        for u in units:
            key = SubExpertId(layer, u // S, u % S)
            ticket = self._inflight.get(key)
            if key in self._prefetched and ticket is not None and ticket.cancel():
                del self._inflight[key]
                self._prefetched.discard(key)
                p.policy.discard(key)
                self.stats.bytes_to_device -= p.pool.slot_nbytes
                self.stats.prefetch_cancelled += 1

    def is_resident(self, layer: int, unit: int) -> bool:
        """Whether ``unit`` of ``layer`` has a slot (loaded or in flight)."""
        S = self.layers[layer].parts
        return self._layer_pool[layer].policy.contains(SubExpertId(layer, unit // S, unit % S))

    def ready(self, layer: int, unit: int) -> bool:
        """Whether ``unit`` of ``layer`` is resident and its load (if any) has landed."""
        S = self.layers[layer].parts
        key = SubExpertId(layer, unit // S, unit % S)
        if not self._layer_pool[layer].policy.contains(key):
            return False
        t = self._inflight.get(key)
        return t is None or t.done()

    def host_blocks(self, layer: int, units: Sequence[int]) -> torch.Tensor:
        """Blocks of ``units`` read from the host tier into host memory [P, 3, n, D], without
        touching slots or residency (for computing them on the host CPU)."""
        p, S = self._layer_pool[layer], self.layers[layer].parts
        tier = p.transfer.tier
        out = torch.empty((len(units), *p.pool.block_shape), dtype=p.pool.dtype)
        for i, u in enumerate(units):
            tier.read_into(p.index[SubExpertId(layer, u // S, u % S)], out[i])
        return out

    def block_nbytes(self, layer: int) -> int:
        """Bytes of one sub-expert block of ``layer``."""
        return self._layer_pool[layer].pool.slot_nbytes

    def _forget(self, key: SubExpertId, p: _Pool) -> None:
        self._inflight.pop(key, None)
        if key in self._prefetched:
            self._prefetched.discard(key)
            self.stats.prefetched_unused_bytes += p.pool.slot_nbytes

    # -- reporting ---------------------------------------------------------------------
    def report(self) -> dict:
        """Counters for Engine.stats."""
        s = self.stats
        total = s.hits + s.misses
        return {
            "memory_budget_bytes": self.budget_bytes,
            "resident_bytes": self.resident_bytes(),
            "hits": s.hits,
            "misses": s.misses,
            "hit_rate": s.hits / total if total else 1.0,
            "bytes_to_device": s.bytes_to_device,
            "transfer_wait_s": s.transfer_wait_s,
            "prefetched_unused_bytes": s.prefetched_unused_bytes,
            "prefetch_late": s.prefetch_late,
            "prefetch_used": s.prefetch_used,
        }

    def resident_bytes(self) -> int:
        """Bytes of sub-experts held in slots now (never above the budget)."""
        return sum((p.pool.num_slots - p.policy.free_slots()) * p.pool.slot_nbytes
                   for p in self._pools.values())

    def reset_stats(self) -> None:
        """Zero the counters (a benchmark's warm-up is not counted)."""
        self.stats = StoreStats()

    def close(self) -> None:
        """Stop transfer workers."""
        for p in self._pools.values():
            p.transfer.close()
