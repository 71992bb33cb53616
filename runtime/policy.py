"""Residency bookkeeping: which sub-expert holds which slot, and which one to evict.

Plain Python with no tensors, keyed by :class:`~edge_prism.types.SubExpertId` (any
hashable works, which is how the tests drive it). The slots split in two regions:

- a fixed **pinned** region: the hottest sub-experts of the activation profile take
  slots ``0..P-1`` at construction and are never evicted;
- a **dynamic** region, slots ``P..N-1``, whose replacement order comes from a cachetools
  cache (``LRUCache`` or ``LFUCache``): its ``popitem()`` names the next victim and its
  ``__getitem__`` records a use.

Two kinds of keys are never chosen as victims: keys *in use* (reference-counted with
:meth:`ResidencyPolicy.acquire` / :meth:`ResidencyPolicy.release` while a kernel may read
their slot) and keys *protected* for one :meth:`ResidencyPolicy.admit` call (the rest of
the set the current layer needs).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Collection, Hashable, Iterable, Mapping
from types import MappingProxyType

from cachetools import LFUCache, LRUCache

from edge_prism.errors import BudgetError, ConfigError

logger = logging.getLogger(__name__)

POLICIES = ("lru", "lfu")

Key = Hashable


class ResidencyPolicy:
    """Assigns ``num_slots`` slots to sub-experts and picks victims by LRU or LFU.

    ``pinned`` keys (hottest first, at most ``num_slots``) get slots ``0..P-1`` now and are
    resident for the policy's lifetime: the caller fills those slots at load time. Every
    other key gets a slot through :meth:`admit`. Thread-safe: the prefetcher and the
    decode loop may share one policy.
    """

    def __init__(self, num_slots: int, *, policy: str = "lru", pinned: Iterable[Key] = ()) -> None:
        if isinstance(num_slots, bool) or not isinstance(num_slots, int) or num_slots < 0:
            raise ConfigError(f"invalid number of slots {num_slots!r}: use an integer >= 0")
        if policy not in POLICIES:
            raise ConfigError(f"invalid residency policy '{policy}': use one of {', '.join(POLICIES)}")
        pinned_keys = list(dict.fromkeys(pinned))  # de-duplicated, order kept
        if len(pinned_keys) > num_slots:
            raise BudgetError(
                f"{len(pinned_keys)} pinned sub-experts do not fit in {num_slots} slots: "
                "raise the memory budget or pin fewer sub-experts"
            )
        self.num_slots = num_slots
        self.policy = policy
        self._pinned: dict[Key, int] = {key: slot for slot, key in enumerate(pinned_keys)}
        dynamic = num_slots - len(pinned_keys)
        # The cache holds only the dynamic region (value: slot); it only orders victims.
        # We never let it overflow, so it never evicts on its own inside __setitem__.
        self._cache: LRUCache | LFUCache = (LRUCache if policy == "lru" else LFUCache)(maxsize=dynamic)
        self._slots: dict[Key, int] = dict(self._pinned)  # every resident key, no side effects
        self._free: list[int] = list(range(num_slots - 1, len(pinned_keys) - 1, -1))  # pop() -> lowest
        self._in_use: dict[Key, int] = {}
        # LFU only: the use count cachetools keeps privately, mirrored so that a key popped
        # as a candidate victim and put back (in use / protected) gets its count back.
        self._uses: dict[Key, int] = {}
        self._lock = threading.RLock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    # ---- queries -------------------------------------------------------------------

    def lookup(self, key: Key) -> int | None:
        """The slot of ``key`` if resident, else None. Counts a hit (a use) or a miss."""
        with self._lock:
            slot = self._slots.get(key)
            if slot is None:
                self.misses += 1
                return None
            self.hits += 1
            if key not in self._pinned:
                self._cache[key]  # records the use in the replacement order
                if self.policy == "lfu":
                    self._uses[key] += 1
            return slot

    def contains(self, key: Key) -> bool:
        """Whether ``key`` is resident; no effect on statistics or replacement order."""
        return key in self._slots

    def slot_of(self, key: Key) -> int | None:
        """The slot of ``key`` if resident, else None; no effect on statistics or order."""
        return self._slots.get(key)

    def resident_keys(self) -> set[Key]:
        """All resident keys, pinned ones included."""
        with self._lock:
            return set(self._slots)

    def free_slots(self) -> int:
        """Slots that hold nothing yet (only before the dynamic region first fills)."""
        return len(self._free)

    def in_use(self, key: Key) -> bool:
        """Whether ``key`` is acquired by at least one kernel."""
        return key in self._in_use

    @property
    def pinned(self) -> Mapping[Key, int]:
        """Pinned keys and their slots, read-only."""
        return MappingProxyType(self._pinned)

    # ---- changes -------------------------------------------------------------------

    def admit(self, key: Key, *, protect: Collection[Key] = ()) -> tuple[int, Key | None]:
        """Give ``key`` a slot: a free one, else the slot of a victim; returns ``(slot, evicted)``.

        The victim is the policy's choice among dynamic keys that are neither in use nor in
        ``protect``. The caller must then fill the slot (and stop using the evicted key's
        data). A key already resident keeps its slot: ``(slot, None)``, nothing changes.
        Raises :class:`BudgetError` when every candidate is pinned, in use or protected.
        """
        with self._lock:
            slot = self._slots.get(key)
            if slot is not None:
                return slot, None
            evicted: Key | None = None
            if self._free:
                slot = self._free.pop()
            else:
                evicted, slot = self._evict(key, protect)
            self._cache[key] = slot
            self._slots[key] = slot
            if self.policy == "lfu":
                self._uses[key] = 1
            return slot, evicted

    def acquire(self, keys: Iterable[Key]) -> None:
        """Mark resident ``keys`` in use (reference-counted): they cannot be evicted until released."""
        with self._lock:
            keys = list(keys)
            for key in keys:
                if key not in self._slots:
                    raise KeyError(f"{key!r} is not resident: admit it before acquiring it")
            for key in keys:
                self._in_use[key] = self._in_use.get(key, 0) + 1

    def release(self, keys: Iterable[Key]) -> None:
        """Undo one :meth:`acquire` of each key."""
        with self._lock:
            keys = list(keys)
            pending: dict[Key, int] = {}
            for key in keys:
                pending[key] = pending.get(key, 0) + 1
            for key, count in pending.items():
                if self._in_use.get(key, 0) < count:
                    raise KeyError(f"{key!r} is released more often than it was acquired")
            for key, count in pending.items():
                left = self._in_use[key] - count
                if left:
                    self._in_use[key] = left
                else:
                    del self._in_use[key]

    def release_all(self) -> None:
        """Release every key (no kernel runs: an interrupted step left some acquired)."""
        with self._lock:
            self._in_use.clear()

    def discard(self, key: Key) -> int | None:
        """Forget dynamic ``key`` (for example after its load failed) and free its slot.

        Returns the freed slot, or None if ``key`` was not resident. Pinned and in-use keys
        cannot be discarded.
        """
        with self._lock:
            if key in self._pinned:
                raise KeyError(f"{key!r} is pinned and cannot be discarded")
            if key in self._in_use:
                raise KeyError(f"{key!r} is in use and cannot be discarded")
            slot = self._slots.pop(key, None)
            if slot is None:
                return None
            del self._cache[key]
            self._uses.pop(key, None)
            self._free.append(slot)
            return slot

    # ---- internals -----------------------------------------------------------------

    def _evict(self, incoming: Key, protect: Collection[Key]) -> tuple[Key, int]:
        """Pop the policy's victims until one may go; put the others back."""
        if self._cache.maxsize == 0:
            raise BudgetError(
                f"cannot load {incoming!r}: all {self.num_slots} slots hold pinned sub-experts; "
                "raise the memory budget or pin fewer sub-experts"
            )
        if not isinstance(protect, (set, frozenset, Mapping)):
            protect = set(protect)  # membership is tested once per candidate
        skipped: list[Key] = []
        try:
            while True:
                try:
                    victim, slot = self._cache.popitem()
                except KeyError:
                    raise BudgetError(
                        f"cannot load {incoming!r}: all {self._cache.maxsize} evictable slots hold "
                        "sub-experts in use or needed by the same step; raise the memory budget "
                        "or lower the operating point"
                    ) from None
                if victim in self._in_use or victim in protect:
                    skipped.append(victim)
                    continue
                break
        finally:
            self._put_back(skipped)
        del self._slots[victim]
        self._uses.pop(victim, None)
        self.evictions += 1
        return victim, slot

    def _put_back(self, keys: list[Key]) -> None:
        # cachetools has no "peek", so candidates that may not go were popped and are
        # re-inserted in their old relative order. They end up as the most recent (LRU):
        # right, since they are being used or are about to be. For LFU their use counts
        # are restored from the mirror, and they rank last among keys of equal count.
        for key in keys:
            self._cache[key] = self._slots[key]
            for _ in range(self._uses.get(key, 1) - 1):
                self._cache[key]
