"""BudgetedStore: the model's ExpertStore when sub-experts must fit a memory budget.

wanted units -> [ResidencyPolicy: hit | admit (evict by policy)] -> [Transferer: host tier ->
slot] -> wait only for this layer's loads -> slot indices -> batched kernels -> done()

One slot pool per sub-expert block shape (layers of a model may differ: dense layers
among MoE layers). Each pool is preallocated at load; nothing is allocated per token.
The hottest sub-experts by the activation profile fill a pinned region first; the rest
of the slots are a cachetools-managed region (LRU or LFU). Float blocks are held in the
compute dtype in slots and host tiers (converted once, on their way into a tier or a
slot); quantized blocks stay bytes.

A key is resident once it has a slot, but its bytes are only there once its transfer
has landed: every transfer not yet waited for is in ``_inflight``, so a later hit waits
for it (after an interrupted step too); a failed transfer gives its slot back.

In place (``in_place=True``, the CPU with blocks stored as its kernel reads them): the
host tier is the memory-mapped experts file, the same RAM the kernels read, so a miss is
not copied at all. The slots hold the hottest sub-experts for good and every other one is
read by the kernel where it lies in the mapping (wanted units -> slot | host block ->
kernels); the kernel's page cache decides what of that cold rest stays in RAM.
"""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass
from typing import Callable, Collection, Sequence

import torch

from edge_prism.errors import BudgetError, ConfigError
from edge_prism.types import SubExpertId

from .device import host_available_bytes, host_buffer, is_async, is_integrated
from .policy import ResidencyPolicy
from .sizes import format_size
from .transfer import FileTier, HostTier, MappedFileTier, MemoryTier, SlotPool, Ticket, Transferer

logger = logging.getLogger(__name__)

HOST_TIERS = ("auto", "ram", "disk")


@dataclass(frozen=True)
class LayerBlocks:
    """Where one layer's sub-expert blocks live in the prism checkpoint file."""

    layer: int
    parts: int  # S
    units: int  # E*S
    block_shape: tuple[int, ...]  # (3, n, D) float, (nbytes,) quantized
    dtype: torch.dtype  # in slots and host tiers (the compute dtype for float blocks)
    offset: int  # byte offset of the layer's [E*S, *block_shape] tensor in the file
    order: Sequence[int]  # unit id at each storage position
    frequency: Sequence[float]  # activation profile, per unit id
    max_selection: int  # largest number of units one decode token selects in this layer
    storage_dtype: torch.dtype | None = None  # in the file, when it differs from ``dtype``

    @property
    def stored_dtype(self) -> torch.dtype:
        """Element type in the file."""
        return self.storage_dtype or self.dtype


@dataclass
class _Pool:
    pool: SlotPool
    policy: ResidencyPolicy
    transfer: Transferer
    index: dict[SubExpertId, int]  # key -> block index in this pool's host tier
    min_slots: int
    hottest: list[SubExpertId]  # every key of the pool, hottest first (warm-up order)
    # In place: the slot buffer and the host tier's blocks, numbered after the slots (the
    # kernels' view of the pool, BudgetedStore.pool).
    in_place: tuple[torch.Tensor, tuple[torch.Tensor, ...]] | None = None


@dataclass
class StoreStats:
    """Counters since load (or the last reset); every one is reported."""

    hits: int = 0
    misses: int = 0
    bytes_to_device: int = 0
    transfer_wait_s: float = 0.0  # host blocked on loads (the stall on the CPU)
    prefetch_issued: int = 0
    prefetch_used: int = 0
    prefetched_unused_bytes: int = 0
    prefetch_cancelled: int = 0
    prefetch_late: int = 0  # prefetched sub-experts still in flight when needed
    bytes_in_place: int = 0  # misses read by the kernels where they lie in the host tier (in place)


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
"""(layers of one block shape, byte offset of each block in the file, stored bytes per block)
-> host tier whose blocks are in the layers' ``dtype``."""


def _stored_bytes(lb: LayerBlocks) -> int:
    n = 1
    for d in lb.block_shape:
        n *= d
    return n * lb.stored_dtype.itemsize


def host_tier_kind(device: torch.device, host: str, nbytes: int) -> str:
    """Where sub-experts outside the budget live on ``device``: 'file' (read on demand from
    the checkpoint) or 'ram' (every block in page-locked host memory, read once at load).

    CPU: the file (page cache). Integrated GPU (unified memory): the file, unless
    ``host='ram'``: pinning every block in the DRAM the budget lives in would hold them twice.
    Discrete GPU: RAM when ``nbytes`` fits in 80% of the available host memory (``auto``),
    or as asked (``ram``, ``disk``).
    """
    if host not in HOST_TIERS:
        raise ConfigError(f"invalid host tier {host!r}: use one of {', '.join(HOST_TIERS)}")
    if not is_async(device) or host == "disk":
        return "file"
    if host == "ram":
        return "ram"
    if is_integrated(device):
        return "file"
    return "ram" if nbytes <= 0.8 * host_available_bytes() else "file"


def prism_tiers(path, device: torch.device, *, host: str = "auto", formats: dict | None = None,
                backend=None) -> TierFactory:
    """Host tiers over a prism checkpoint's experts.safetensors (see :func:`host_tier_kind`).

    The RAM tier is read straight from the file into one exactly-sized page-locked buffer
    (its peak is the tier's bytes, not 2-3x). Quantized layers (``formats``: layer ->
    quant.UnitFormat) are stored in a portable layout and turned into ``backend``'s kernel
    layout, float blocks into the layers' dtype: on their way into a slot (file tier) or
    once at load (RAM tier). Where the kernel reads the portable layout as it is
    (``backend.native_blocks``: AVX-512 CPUs) a block goes from the file into its slot in
    one read.
    """

    def make(group: list[LayerBlocks], offsets: list[int], nbytes: int) -> HostTier:
        lb0 = group[0]
        # The CPU copies every miss out of the page cache: from a memory map, without a read call.
        file_tier = FileTier if is_async(device) else MappedFileTier
        tier: HostTier = file_tier(path, offsets, nbytes, lb0.stored_dtype, lb0.block_shape)
        fmts = [(formats or {}).get(lb.layer) for lb in group for _ in range(lb.units)]
        # Where the kernel reads blocks as stored, they go straight from the file into a slot.
        native = all(fmts) and backend is not None and backend.native_blocks
        if any(fmts) and not native:
            tier = ConvertingTier(tier, [functools.partial(f.to_kernel, backend=backend) for f in fmts])
        elif lb0.stored_dtype != lb0.dtype:
            tier = ConvertingTier(tier, [_cast] * len(offsets), storage_dtype=lb0.stored_dtype)
        total = len(offsets) * _block_bytes(lb0)
        if host_tier_kind(device, host, total) == "file":
            if host == "auto" and is_async(device) and not is_integrated(device):
                logger.info("host RAM cannot hold %s of sub-experts: streaming from disk", format_size(total))
            return tier
        blocks = host_buffer((len(offsets), *lb0.block_shape), lb0.dtype, device)
        for i in range(len(offsets)):
            tier.read_into(i, blocks[i])
        tier.close()
        return MemoryTier(blocks)

    return make


def _cast(src: torch.Tensor, dst: torch.Tensor) -> None:
    dst.copy_(src)


class ConvertingTier:
    """A host tier whose blocks are converted on the way out (storage layout or dtype ->
    the slots'). Each reading thread reads into its own host buffer, then converts into
    the destination."""

    def __init__(self, tier: HostTier, converters: list[Callable[[torch.Tensor, torch.Tensor], None]], *,
                 storage_dtype: torch.dtype | None = None):
        self.tier, self.converters, self.storage_dtype = tier, converters, storage_dtype
        self._local = threading.local()

    def read_into(self, index: int, dst: torch.Tensor) -> None:
        """Block ``index`` into ``dst`` in the kernel's layout and dtype."""
        dtype = self.storage_dtype or dst.dtype
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.shape != dst.shape or buf.dtype != dtype:
            buf = self._local.buf = torch.empty(dst.shape, dtype=dtype)
        self.tier.read_into(index, buf)
        self.converters[index](buf, dst)

    def close(self) -> None:
        """Close the underlying tier."""
        self.tier.close()


class BudgetedStore:
    """An ExpertStore holding at most ``budget_bytes`` of sub-expert blocks on ``device``."""

    streams = True  # sub-experts stream into the slots on demand: a Prefetcher may load them ahead

    def __init__(self, tiers: TierFactory, layers: Sequence[LayerBlocks], *, budget_bytes: int,
                 device: torch.device, policy: str = "lru", workers: int | None = None, pin_hot: bool = True,
                 in_place: bool = False):
        self.device = device
        self.pin_hot = pin_hot  # False: every slot replaceable (a plain cache, for baselines)
        # Misses read where they lie in the host tier instead of copied into slots (module doc).
        self.in_place = in_place
        self.streams = not in_place  # nothing is loaded ahead in place: a Prefetcher has no work
        self.layers = list(layers)
        self.budget_bytes = budget_bytes
        self.stats = StoreStats()
        slots = plan_slots(self.layers, budget_bytes)
        self._pools: dict[tuple, _Pool] = {}
        self._layer_pool: list[_Pool] = []
        # Keys acquired by each layer's slots() until its done(), as one list per call.
        self._held: list[list[tuple[list[SubExpertId], list[int]]]] = [[] for _ in self.layers]
        self._inflight: dict[SubExpertId, Ticket] = {}  # transfers not yet waited for
        self._prefetched: set[SubExpertId] = set()
        self._closed = False
        by_shape: dict[tuple, list[LayerBlocks]] = {}
        for lb in self.layers:
            by_shape.setdefault((lb.block_shape, lb.dtype), []).append(lb)
        try:
            for key, group in by_shape.items():
                self._pools[key] = self._make_pool(tiers, group, slots[key], policy=policy, workers=workers)
            self._layer_pool = [self._pools[(lb.block_shape, lb.dtype)] for lb in self.layers]
            self._warm()
            for p in self._pools.values() if in_place else ():
                p.in_place = (p.pool.buffer, self._host_views(p))
        except BaseException:
            self.close()
            raise

    # -- construction ------------------------------------------------------------------
    def _make_pool(self, tiers: TierFactory, group: list[LayerBlocks], num_slots: int, *, policy: str,
                   workers: int | None) -> _Pool:
        lb0 = group[0]
        stored = _stored_bytes(lb0)
        offsets, index, heat = [], {}, []
        for lb in group:
            for pos, unit in enumerate(lb.order):
                key = SubExpertId(lb.layer, int(unit) // lb.parts, int(unit) % lb.parts)
                index[key] = len(offsets)
                offsets.append(lb.offset + pos * stored)
                heat.append((-float(lb.frequency[int(unit)]), lb.layer, int(unit), key))
        min_slots = max(lb.max_selection for lb in group)
        # The dynamic region must hold a layer's largest selection (and room to prefetch);
        # the hottest sub-experts fill the rest for good.
        dynamic = min(num_slots, max(2 * min_slots, num_slots // 4)) if self.pin_hot else num_slots
        hottest = [h[3] for h in sorted(heat)]
        # Slots in (layer, expert, part) order, so a layer whose selection is all pinned
        # gathers one contiguous run (a view, no copy).
        pinned = sorted(hottest[: num_slots - dynamic])
        tier = tiers(group, offsets, stored)
        pool = SlotPool(num_slots, lb0.block_shape, lb0.dtype, self.device)
        transfer = Transferer(pool, tier, self.device, workers=workers)
        pol = ResidencyPolicy(num_slots, policy=policy, pinned=pinned)
        logger.info("slot pool %s x %d: %d pinned, %d dynamic (%s)", lb0.block_shape, num_slots,
                    len(pinned), num_slots - len(pinned), format_size(num_slots * _block_bytes(lb0)))
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
            p.transfer.reset_stall()

    def _host_views(self, p: _Pool) -> tuple[torch.Tensor, ...]:
        blocks = getattr(p.transfer.tier, "blocks", None)
        if blocks is None or self.device.type != "cpu":
            raise ConfigError(f"in-place sub-experts need the CPU and a memory-mapped host tier of blocks in "
                              f"the kernel's layout, got {type(p.transfer.tier).__name__} on {self.device}")
        return blocks()

    # -- ExpertStore -------------------------------------------------------------------
    def capacity(self, layer: int) -> int:
        """Most units one call of slots() may ask for in ``layer`` (the dynamic region; in
        place, every unit: a miss needs no slot)."""
        if self.in_place:
            return self.layers[layer].units
        p = self._layer_pool[layer]
        return p.pool.num_slots - len(p.policy.pinned)

    def slots(self, layer: int, units: torch.Tensor) -> torch.Tensor:
        """Make ``units`` resident (loading misses), return their slots; waits for this layer only.

        The keys stay in use (never evicted) until :meth:`done`. If this raises (a failed
        load, Ctrl-C), nothing stays in use, loads not yet landed stay tracked, and failed
        ones give their slots back.

        In place, a miss is numbered ``num_slots + i`` for block ``i`` of the host tier:
        :meth:`pool` then returns the slot buffer with those blocks (see the module doc).
        """
        if self.in_place:
            return self._slots_in_place(layer, units)
        p, S = self._layer_pool[layer], self.layers[layer].parts
        keys = [SubExpertId(layer, u // S, u % S) for u in units.tolist()]
        want = set(keys)
        slots: list[int] = []
        waits: list[tuple[SubExpertId, Ticket]] = []
        held = None
        try:
            for key in keys:
                slot = p.policy.lookup(key)
                if slot is None:
                    slot, ticket = self._load(p, key, protect=want, speculative=False)
                    waits.append((key, ticket))
                    self.stats.misses += 1
                    self.stats.bytes_to_device += p.pool.slot_nbytes
                else:
                    ticket = self._inflight.get(key)
                    if ticket is not None:
                        waits.append((key, ticket))  # landed: returns at once, or raises a failed load
                    if ticket is not None and not ticket.done():
                        # Still in flight (a prefetch, or a load an interrupt left): the compute
                        # waits, so not a hit.
                        self.stats.misses += 1
                        self.stats.prefetch_late += key in self._prefetched
                    else:
                        self.stats.hits += 1
                    if key in self._prefetched:
                        self._prefetched.discard(key)
                        self.stats.prefetch_used += 1
                slots.append(slot)
            held = (keys, slots)
            self._held[layer].append(held)
            p.policy.acquire(keys)
            self.stats.transfer_wait_s += p.transfer.wait([t for _, t in waits])
        except BaseException:
            self._recover(p, layer, held, waits)
            raise
        for key, ticket in waits:
            if self._inflight.get(key) is ticket:
                del self._inflight[key]
        return torch.tensor(slots, dtype=torch.long)

    def _slots_in_place(self, layer: int, units: torch.Tensor) -> torch.Tensor:
        """slots() in place: nothing is loaded, waited for or evicted; the slots hold their
        sub-experts for good, so none is acquired either."""
        p, S = self._layer_pool[layer], self.layers[layer].parts
        lookup, index, first = p.policy.lookup, p.index, p.pool.num_slots
        out = []
        for u in units.tolist():
            key = SubExpertId(layer, u // S, u % S)
            slot = lookup(key)
            out.append(first + index[key] if slot is None else slot)
        misses = sum(s >= first for s in out)
        self.stats.misses += misses
        self.stats.hits += len(out) - misses
        self.stats.bytes_in_place += misses * p.pool.slot_nbytes
        return torch.tensor(out, dtype=torch.long)

    def pool(self, layer: int):
        """The slot buffer of ``layer``'s block shape [num_slots, *block_shape]; in place, the
        pair (slot buffer, host blocks) that :meth:`slots` numbers one after the other."""
        p = self._layer_pool[layer]
        return p.pool.buffer if p.in_place is None else p.in_place

    def done(self, layer: int) -> None:
        """Kernels reading this layer's slots are issued: release them after they finish."""
        p = self._layer_pool[layer]
        while self._held[layer]:
            keys, slots = self._held[layer].pop()
            p.transfer.mark_read(slots)
            p.policy.release(keys)

    def release_all(self) -> None:
        """Release every key still in use and forget failed loads: nothing computes now (a
        new generation starts, or an interrupted one was abandoned)."""
        for layer, held in enumerate(self._held):
            if held:
                self._layer_pool[layer].transfer.mark_read()
                held.clear()
        for p in self._pools.values():
            p.policy.release_all()
        for key, ticket in list(self._inflight.items()):
            if ticket.failed():
                self._drop(key)

    def _load(self, p: _Pool, key: SubExpertId, *, protect: Collection[SubExpertId],
              speculative: bool) -> tuple[int, Ticket]:
        """Admit ``key`` and start its transfer; on any error (Ctrl-C included) it is not resident."""
        try:
            slot, evicted = p.policy.admit(key, protect=protect)
            if evicted is not None:
                self._forget(evicted, p)
            ticket = p.transfer.submit(p.index[key], slot, speculative=speculative)
            self._inflight[key] = ticket
        except BaseException:
            if key not in self._inflight and p.policy.contains(key) and not p.policy.in_use(key):
                p.policy.discard(key)  # a slot with no transfer would be read as if loaded
            raise
        return slot, ticket

    def _recover(self, p: _Pool, layer: int, held, waits: list[tuple[SubExpertId, Ticket]]) -> None:
        if held is not None and held in self._held[layer]:
            self._held[layer].remove(held)
            p.transfer.mark_read(held[1])
            try:
                p.policy.release(held[0])
            except KeyError:  # interrupted before acquire() finished
                pass
        for key, ticket in waits:
            if ticket.failed():
                self._drop(key)

    def _drop(self, key: SubExpertId) -> None:
        """Forget ``key`` whose load failed: its slot goes back to the free list."""
        p = self._layer_pool[key.layer]
        self._inflight.pop(key, None)
        self._prefetched.discard(key)
        if p.policy.contains(key) and key not in p.policy.pinned and not p.policy.in_use(key):
            p.policy.discard(key)

    # -- prefetch ----------------------------------------------------------------------
    def prefetch(self, layer: int, units: Sequence[int], *, protect: Collection[SubExpertId] = ()) -> int:
        """Start loading predicted ``units`` of ``layer`` not yet resident, best first.

        Speculative: queued behind every demand load, cancellable until it starts. Never
        evicts an in-use sub-expert (the current layer's) nor a key in ``protect`` (nearer
        predictions); stops at the first unit that finds no evictable slot. Returns how
        many loads were issued (in place none: misses are not loaded).
        """
        if self.in_place:
            return 0
        p, S = self._layer_pool[layer], self.layers[layer].parts
        keys = [SubExpertId(layer, u // S, u % S) for u in units]
        keep = set(protect) | set(keys)
        issued = 0
        for key in keys:
            if p.policy.contains(key):
                continue
            try:
                self._load(p, key, protect=keep, speculative=True)
            except BudgetError:
                break
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
        """Whether ``unit`` of ``layer`` can be computed without waiting: resident with its load
        (if any) landed, or (in place) any unit."""
        if self.in_place:
            return True
        S = self.layers[layer].parts
        key = SubExpertId(layer, unit // S, unit % S)
        if not self._layer_pool[layer].policy.contains(key):
            return False
        t = self._inflight.get(key)
        return t is None or (t.done() and not t.failed())

    def host_blocks(self, layer: int, units: Sequence[int]) -> torch.Tensor:
        """Blocks of ``units`` read from the host tier into host memory [P, *block_shape], without
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
        """Counters for Engine.stats (every StoreStats counter)."""
        s = self.stats
        total = s.hits + s.misses
        return {
            "memory_budget_bytes": self.budget_bytes,
            "resident_bytes": self.resident_bytes(),
            "hits": s.hits,
            "misses": s.misses,
            "hit_rate": s.hits / total if total else 1.0,
            "bytes_to_device": s.bytes_to_device,
            # Host blocked on loads, plus (asynchronous devices) compute stalled on copies,
            # timed on the device.
            "transfer_wait_s": s.transfer_wait_s + sum(p.transfer.stall_seconds() for p in self._pools.values()),
            "prefetch_issued": s.prefetch_issued,
            "prefetch_used": s.prefetch_used,
            "prefetch_cancelled": s.prefetch_cancelled,
            "prefetched_unused_bytes": s.prefetched_unused_bytes,
            "prefetch_late": s.prefetch_late,
            "bytes_in_place": s.bytes_in_place,
        }

    def resident_bytes(self) -> int:
        """Bytes of sub-experts held in slots now (never above the budget)."""
        return sum((p.pool.num_slots - p.policy.free_slots()) * p.pool.slot_nbytes
                   for p in self._pools.values())

    def load_lanes(self) -> int:
        """Missing sub-experts loaded at once (the fewest over the slot pools' transferers)."""
        return min(p.transfer.lanes for p in self._pools.values())

    def slot_bytes(self) -> int:
        """Bytes of the slot pools (allocated once, at most the budget)."""
        return sum(p.pool.num_slots * p.pool.slot_nbytes for p in self._pools.values())

    def reset_stats(self) -> None:
        """Zero the counters (a benchmark's warm-up is not counted)."""
        self.stats = StoreStats()
        for p in self._pools.values():
            p.transfer.reset_stall()

    def close(self) -> None:
        """Stop the transfers (waiting for copies in flight), then give the slot pools and
        host tiers back. Idempotent; the store cannot load afterwards."""
        if self._closed:
            return
        self._closed = True
        for p in self._pools.values():
            p.transfer.close()
        for p in self._pools.values():
            p.pool.release()
            p.in_place = None  # its references to the slot buffer and the mapping
            p.transfer.tier = None
