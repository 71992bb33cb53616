"""Residency policy driven with plain ids: no tensors, no device."""

from __future__ import annotations

import random
import threading

import pytest

from edge_prism.errors import BudgetError, ConfigError
from edge_prism.runtime.policy import POLICIES, ResidencyPolicy
from edge_prism.types import SubExpertId


def fill(policy: ResidencyPolicy, keys) -> None:
    for key in keys:
        slot, evicted = policy.admit(key)
        assert evicted is None


# ---- basics ------------------------------------------------------------------------


def test_admit_uses_free_slots_first_then_evicts():
    policy = ResidencyPolicy(3)
    assert policy.free_slots() == 3
    slots = [policy.admit(k)[0] for k in "abc"]
    assert sorted(slots) == [0, 1, 2]
    assert policy.free_slots() == 0
    slot, evicted = policy.admit("d")
    assert evicted == "a"
    assert slot == slots[0]  # d reuses a's slot
    assert policy.resident_keys() == {"b", "c", "d"}
    assert policy.evictions == 1


def test_lookup_counts_hits_and_misses_and_contains_does_not():
    policy = ResidencyPolicy(2)
    assert policy.lookup("a") is None
    slot, _ = policy.admit("a")
    assert policy.lookup("a") == slot
    assert policy.lookup("a") == slot
    assert policy.contains("a") and not policy.contains("b")
    assert policy.slot_of("a") == slot and policy.slot_of("b") is None
    assert (policy.hits, policy.misses) == (2, 1)


def test_admitting_a_resident_key_keeps_its_slot():
    policy = ResidencyPolicy(2)
    slot, _ = policy.admit("a")
    assert policy.admit("a") == (slot, None)
    assert policy.free_slots() == 1


def test_works_with_subexpert_ids():
    keys = [SubExpertId(layer, expert, part) for layer in range(2) for expert in range(2) for part in range(2)]
    policy = ResidencyPolicy(4, pinned=keys[:1])
    for key in keys[1:]:
        policy.admit(key)
    assert len(policy.resident_keys()) == 4
    assert policy.contains(keys[0])


@pytest.mark.parametrize("bad", [-1, 1.5, "3"])
def test_bad_slot_count_is_a_config_error(bad):
    with pytest.raises(ConfigError):
        ResidencyPolicy(bad)


def test_unknown_policy_is_a_config_error():
    with pytest.raises(ConfigError, match="lru, lfu"):
        ResidencyPolicy(4, policy="fifo")


# ---- replacement order -------------------------------------------------------------


def test_lru_evicts_least_recently_used():
    policy = ResidencyPolicy(3, policy="lru")
    fill(policy, "abc")
    policy.lookup("a")  # order now b, c, a
    assert policy.admit("d")[1] == "b"
    policy.lookup("c")  # order a, d, c
    assert policy.admit("e")[1] == "a"


def test_lfu_evicts_least_frequently_used():
    policy = ResidencyPolicy(3, policy="lfu")
    fill(policy, "abc")
    for _ in range(3):
        policy.lookup("a")
    policy.lookup("b")
    assert policy.admit("d")[1] == "c"
    policy.lookup("d")
    policy.lookup("d")  # d: 3 uses, b: 2
    assert policy.admit("e")[1] == "b"


# ---- pinned ------------------------------------------------------------------------


def test_pinned_take_first_slots_and_are_never_evicted():
    pinned = ["hot0", "hot1"]
    policy = ResidencyPolicy(4, pinned=pinned)
    assert dict(policy.pinned) == {"hot0": 0, "hot1": 1}
    assert policy.slot_of("hot0") == 0 and policy.slot_of("hot1") == 1
    assert policy.free_slots() == 2
    for i in range(50):
        slot, evicted = policy.admit(f"cold{i}")
        assert slot in (2, 3)
        assert evicted not in pinned
    assert policy.lookup("hot1") == 1


def test_more_pinned_than_slots_is_a_budget_error():
    with pytest.raises(BudgetError, match="3 pinned"):
        ResidencyPolicy(2, pinned=["a", "b", "c"])


def test_all_slots_pinned_leaves_nothing_to_admit():
    policy = ResidencyPolicy(2, pinned=["a", "b"])
    assert policy.admit("a") == (0, None)
    with pytest.raises(BudgetError, match="pinned"):
        policy.admit("c")


def test_pinned_cannot_be_discarded():
    policy = ResidencyPolicy(2, pinned=["a"])
    with pytest.raises(KeyError):
        policy.discard("a")


# ---- in use and protected -----------------------------------------------------------


def test_in_use_keys_are_never_evicted_until_released():
    policy = ResidencyPolicy(3)
    fill(policy, "abc")
    policy.acquire(["a"])
    assert policy.in_use("a")
    assert policy.admit("d")[1] == "b"
    assert policy.admit("e")[1] == "c"
    assert policy.admit("f")[1] == "d"
    assert "a" in policy.resident_keys()
    policy.release(["a"])
    assert not policy.in_use("a")
    # a was put back as most recent when skipped (it was being used): e goes first.
    assert policy.admit("g")[1] == "e"


def test_acquire_is_reference_counted():
    policy = ResidencyPolicy(2)
    fill(policy, "ab")
    policy.acquire(["a"])
    policy.acquire(["a", "b"])
    policy.release(["a", "b"])
    assert policy.admit("c")[1] == "b"  # a still held once
    policy.release(["a"])
    with pytest.raises(KeyError):
        policy.release(["a"])


def test_acquire_needs_a_resident_key_and_changes_nothing_on_error():
    policy = ResidencyPolicy(2)
    policy.admit("a")
    with pytest.raises(KeyError, match="not resident"):
        policy.acquire(["a", "zzz"])
    assert not policy.in_use("a")


def test_protected_keys_are_skipped_and_order_of_others_kept():
    policy = ResidencyPolicy(4, policy="lru")
    fill(policy, "abcd")
    assert policy.admit("e", protect={"a"})[1] == "b"
    # LRU order now c, d, a (put back), e
    assert policy.admit("f")[1] == "c"
    assert policy.admit("g")[1] == "d"
    assert policy.admit("h")[1] == "a"


def test_protect_accepts_any_collection():
    policy = ResidencyPolicy(2)
    fill(policy, "ab")
    assert policy.admit("c", protect=["a"])[1] == "b"


def test_no_victim_raises_budget_error_and_leaves_state_intact():
    policy = ResidencyPolicy(3, policy="lru")
    fill(policy, "abc")
    policy.acquire(["a"])
    with pytest.raises(BudgetError, match="raise the memory budget"):
        policy.admit("d", protect={"b", "c"})
    assert policy.resident_keys() == {"a", "b", "c"}
    assert policy.evictions == 0
    policy.release(["a"])
    assert policy.admit("d")[1] == "a"  # LRU order survived the failed attempt


def test_lfu_restores_use_counts_of_skipped_keys():
    policy = ResidencyPolicy(3, policy="lfu")
    fill(policy, "xyz")
    for key, uses in (("x", 2), ("y", 1), ("z", 8)):
        for _ in range(uses):
            policy.lookup(key)
    # counts x=3, y=2, z=9; y is the first candidate but protected, so x goes.
    assert policy.admit("w", protect={"y"})[1] == "x"
    # y keeps its count 2 and w has 1, so w is next (y would go first had its count reset).
    assert policy.admit("v")[1] == "w"


def test_discard_frees_the_slot():
    policy = ResidencyPolicy(2)
    fill(policy, "ab")
    slot = policy.slot_of("a")
    assert policy.discard("a") == slot
    assert policy.discard("a") is None
    assert policy.free_slots() == 1
    assert policy.admit("c") == (slot, None)


# ---- properties under random workloads ------------------------------------------------


class LruModel:
    """Reference LRU with the documented put-back rule, to compare victims exactly."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.order: list = []

    def use(self, key):
        self.order.remove(key)
        self.order.append(key)

    def admit(self, key, blocked):
        if key in self.order:
            return None
        victim = None
        if len(self.order) < self.capacity:
            self.order.append(key)
            return None
        for candidate in self.order:
            if candidate not in blocked:
                victim = candidate
                break
        if victim is not None:
            i = self.order.index(victim)
            skipped = self.order[:i]
            self.order = self.order[i + 1 :] + skipped
        self.order.append(key)
        return victim


def check_invariants(policy: ResidencyPolicy, pinned: list, in_use: dict) -> None:
    resident = policy.resident_keys()
    assert len(resident) <= policy.num_slots
    slots = [policy.slot_of(k) for k in resident]
    assert len(set(slots)) == len(slots), "two keys share a slot"
    assert all(0 <= s < policy.num_slots for s in slots)
    assert policy.free_slots() + len(resident) == policy.num_slots
    for i, key in enumerate(pinned):
        assert policy.slot_of(key) == i
    for key in in_use:
        assert key in resident


@pytest.mark.parametrize("kind", POLICIES)
@pytest.mark.parametrize("seed", range(6))
def test_random_workload_keeps_invariants(kind, seed):
    rng = random.Random(seed)
    num_slots = rng.randint(3, 8)
    pinned = [f"p{i}" for i in range(rng.randint(0, 2))]
    universe = pinned + [f"k{i}" for i in range(20)]
    policy = ResidencyPolicy(num_slots, policy=kind, pinned=pinned)
    lru = LruModel(num_slots - len(pinned))
    counts: dict = {}
    in_use: dict = {}
    hits = misses = 0
    for _ in range(1500):
        op = rng.random()
        key = rng.choice(universe)
        if op < 0.45:
            slot = policy.lookup(key)
            assert (slot is not None) == (key in pinned or key in counts)
            if slot is None:
                misses += 1
            else:
                hits += 1
                if key in counts:
                    counts[key] += 1
                    if kind == "lru":
                        lru.use(key)
        elif op < 0.8:
            if key in pinned or key in counts:
                continue
            protect = set(rng.sample(universe, rng.randint(0, 3))) - {key}
            blocked = protect | set(in_use)
            candidates = {k: c for k, c in counts.items() if k not in blocked}
            expected_lru = lru.admit(key, blocked) if kind == "lru" else None
            try:
                slot, evicted = policy.admit(key, protect=protect)
            except BudgetError:
                assert policy.free_slots() == 0 and not candidates
                if kind == "lru":  # undo the model's admission: nothing happened
                    lru.order.remove(key)
                continue
            assert policy.slot_of(key) == slot
            if evicted is not None:
                assert evicted not in pinned and evicted not in blocked
                if kind == "lru":
                    assert evicted == expected_lru
                else:
                    assert counts[evicted] == min(candidates.values())
                del counts[evicted]
            counts[key] = 1
        elif op < 0.92:
            if policy.contains(key):
                policy.acquire([key])
                in_use[key] = in_use.get(key, 0) + 1
        elif in_use:
            held = rng.choice(sorted(in_use))
            policy.release([held])
            in_use[held] -= 1
            if not in_use[held]:
                del in_use[held]
        check_invariants(policy, pinned, in_use)
    assert (policy.hits, policy.misses) == (hits, misses)


def test_concurrent_admits_and_lookups_stay_consistent():
    policy = ResidencyPolicy(16, policy="lru", pinned=["p0"])
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(2000):
                key = f"k{rng.randint(0, 60)}"
                if policy.lookup(key) is None:
                    policy.admit(key)
        except BaseException as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    check_invariants(policy, ["p0"], {})
    assert len(policy.resident_keys()) == 16
