"""The runtime's ordering rules under adversarial delays, on the emulated asynchronous device
(runtime.device.emulate: copies land later, on a copy engine that runs them first in first
out; freed device memory is handed to the next allocation at once).

- an interrupted or failed step leaves nothing in use and nothing read before it landed (C4);
- demand loads never queue behind speculative prefetches (C10);
- no copy lands in memory after its store is closed or freed (C11);
- the REPL survives two Ctrl-C in a reply under a budget just above the minimum.

These tests use only APIs older runtimes had too, so they can be run against them
(see the issue-11 notes) to show they fail there.
"""

from __future__ import annotations

import gc
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import edge_prism
from edge_prism.errors import CorruptCheckpointError
from edge_prism.runtime import transfer as transferlib
from edge_prism.runtime.device import DeviceBuffer, emulate
from edge_prism.runtime.store import BudgetedStore, LayerBlocks
from edge_prism.runtime.transfer import FileTier, MappedFileTier, MemoryTier, Transferer

CPU = torch.device("cpu")
PROMPT = list(range(70, 94))
DEPTH = getattr(transferlib, "SPECULATIVE_DEPTH", 2)


@pytest.fixture(scope="module")
def olmoe(prism_of):
    return prism_of("olmoe")


@pytest.fixture(scope="module")
def reference(olmoe):
    engine = edge_prism.load(olmoe)
    return engine.generate_ids(PROMPT, max_new_tokens=8, temperature=0), engine.logits(PROMPT)


# -- a two-layer store of tiny blocks: block i holds the value i everywhere ------------------------
UNITS, WIDTH = 32, 64


def tiny_store(kind: str, tmp_path: Path, *, budget_blocks: int) -> BudgetedStore:
    nbytes = WIDTH * 4
    blocks = torch.arange(2 * UNITS, dtype=torch.float32)[:, None].repeat(1, WIDTH)  # [2U, WIDTH]
    layers = [LayerBlocks(layer=layer, parts=1, units=UNITS, block_shape=(WIDTH,), dtype=torch.float32,
                          offset=layer * UNITS * nbytes, order=list(range(UNITS)),
                          frequency=[1.0 / (u + 1) for u in range(UNITS)], max_selection=4)
              for layer in (0, 1)]
    if kind == "memory":
        def tiers(group, offsets, n):
            return MemoryTier(blocks[[o // n for o in offsets]].clone())
    else:
        path = tmp_path / "blocks.bin"
        path.write_bytes(blocks.numpy().tobytes())

        def tiers(group, offsets, n):
            return FileTier(path, offsets, n, torch.float32, (WIDTH,))
    return BudgetedStore(tiers, layers, budget_bytes=budget_blocks * nbytes, device=CPU, policy="lru", workers=1)


def _absent(store: BudgetedStore, layer: int, count: int) -> list[int]:
    return [u for u in range(UNITS) if not store.is_resident(layer, u)][:count]


# -- C10: demand before speculation ----------------------------------------------------------------
@pytest.mark.parametrize("kind", ["memory", "file"])
def test_demand_loads_do_not_wait_behind_prefetches(kind, tmp_path):
    """Eight prefetches for layer 1 are queued, then layer 0 misses two sub-experts: their
    copies run after at most DEPTH speculative ones, not after all eight."""
    with emulate(latency_s=0.02) as emu:
        store = tiny_store(kind, tmp_path, budget_blocks=40)
        try:
            start = len(emu.log)
            assert store.prefetch(1, _absent(store, 1, 8)) == 8
            want = _absent(store, 0, 2)
            slots = store.slots(0, torch.tensor(want))
            pool = store.pool(0)
            for slot, unit in zip(slots.tolist(), want):
                assert torch.all(pool[slot] == unit)  # landed before slots() returned
            ran = [ptr for ptr, _ in emu.log[start:]]
            positions = [ran.index(pool[s].data_ptr()) for s in slots.tolist()]
            assert max(positions) < DEPTH + 2, f"demand copies ran at positions {positions} of {len(ran)}"
            store.done(0)
        finally:
            store.close()


# -- C11: teardown ---------------------------------------------------------------------------------
@pytest.mark.parametrize("close", [True, False])
def test_copies_in_flight_never_land_in_reused_memory(close, tmp_path):
    """A store freed with prefetches in flight: the allocator may hand its slot memory to the
    next allocation only once the copies into it have run (close() waits; record_stream)."""
    with emulate(latency_s=0.03) as emu:
        store = tiny_store("memory", tmp_path, budget_blocks=40)
        shape, dtype = tuple(store.pool(0).shape), store.pool(0).dtype
        assert store.prefetch(1, _absent(store, 1, 8)) == 8
        time.sleep(0.01)  # the first prefetches are on the copy engine
        assert emu.pending() > 0
        if close:
            store.close()
        del store
        gc.collect()
        fresh = DeviceBuffer(shape, dtype, CPU)  # reuses the freed block when the allocator may
        fresh.tensor.fill_(-1.0)
        emu.synchronize()
        assert torch.all(fresh.tensor == -1.0), "a late copy wrote into memory handed to a new tensor"


# -- C4: interrupted and failed steps --------------------------------------------------------------
def _interrupt_at(monkeypatch, cls, name: str, n: int, exc: BaseException = KeyboardInterrupt()):
    """Make the n-th call of cls.name raise ``exc`` (once)."""
    real = getattr(cls, name)
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(cls, name, flaky)
    return lambda: monkeypatch.setattr(cls, name, real)


@pytest.mark.parametrize("prefetch", [False, True])
def test_ctrl_c_while_loading_leaves_nothing_in_use(olmoe, reference, min_budget, monkeypatch, prefetch):
    """At the smallest budget every slot is needed each layer: a key left in use by an
    interrupted load makes every later reply fail."""
    want, _ = reference
    engine = edge_prism.load(olmoe, memory_budget=min_budget(olmoe), prefetch=prefetch)
    for n in (1, 3, 8, 14):
        restore = _interrupt_at(monkeypatch, Transferer, "wait", n)
        with pytest.raises(KeyboardInterrupt):
            engine.generate_ids(PROMPT, max_new_tokens=8, temperature=0)
        restore()
        assert engine.generate_ids(PROMPT, max_new_tokens=8, temperature=0) == want


def test_a_load_cut_short_is_waited_for_by_the_next_hit(olmoe, reference, min_budget, monkeypatch):
    """Copies take 10 ms; Ctrl-C before the wait: the next step finds the keys resident and
    must wait for their copies, not read the slots' old contents."""
    _, logits = reference
    with emulate(latency_s=0.01):
        engine = edge_prism.load(olmoe, memory_budget=2 * min_budget(olmoe), prefetch=False)
        for n in (1, 2, 3):
            restore = _interrupt_at(monkeypatch, Transferer, "wait", n)
            with pytest.raises(KeyboardInterrupt):
                engine.logits(PROMPT)
            restore()
            torch.testing.assert_close(engine.logits(PROMPT), logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("emulated", [False, True])
def test_a_failed_load_is_loaded_again(olmoe, reference, min_budget, monkeypatch, emulated):
    """A read fails once (a bad sector): the error surfaces, and the next step loads the block
    again instead of computing with whatever the slot held."""
    _, logits = reference
    # Emulated: an integrated GPU, whose sub-experts stream from the file through staging buffers.
    with emulate(latency_s=0.002, integrated=True) if emulated else _nothing():
        engine = edge_prism.load(olmoe, memory_budget=min_budget(olmoe), prefetch=False)
        engine.logits(PROMPT)
        for n in (1, 4):
            # The CPU copies blocks out of a memory map; the (emulated) GPU reads into staging.
            restore = _interrupt_at(monkeypatch, FileTier if emulated else MappedFileTier, "read_into", n,
                                    CorruptCheckpointError("injected read error"))
            with pytest.raises(CorruptCheckpointError):
                engine.logits(list(reversed(PROMPT)))  # another selection: misses
            restore()
            torch.testing.assert_close(engine.logits(PROMPT), logits, rtol=1e-5, atol=1e-5)


HOOKS = [(BudgetedStore, "slots"), (BudgetedStore, "done"), (BudgetedStore, "prefetch"),
         (Transferer, "submit"), (Transferer, "wait"), (Transferer, "mark_read")]


@pytest.mark.parametrize("cls,name", HOOKS, ids=[f"{c.__name__}.{n}" for c, n in HOOKS])
def test_ctrl_c_anywhere_in_a_budgeted_step(olmoe, reference, min_budget, monkeypatch, cls, name):
    """Ctrl-C at the n-th call of each runtime entry point, copies landing late: the next
    generation gives the reference reply (tester's item 1 through the API)."""
    want, _ = reference
    with emulate(latency_s=0.002, jitter_s=0.002):
        engine = edge_prism.load(olmoe, memory_budget=min_budget(olmoe), prefetch=True)
        for n in (1, 4, 9, 17, 30):
            restore = _interrupt_at(monkeypatch, cls, name, n)
            try:
                engine.generate_ids(PROMPT, max_new_tokens=8, temperature=0)
            except KeyboardInterrupt:
                pass
            restore()
            assert engine.generate_ids(PROMPT, max_new_tokens=8, temperature=0) == want, (name, n)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# -- the REPL: two Ctrl-C, then a new message -----------------------------------------------------
_REPL = """
import sys
from edge_prism.runtime.device import emulate
from edge_prism.cli import main
with emulate(latency_s=0.001):  # slow copies: replies take seconds, interrupts land mid-load
    sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("gap", [0.3, 0.01], ids=["0.35s-0.65s", "second-while-stopping"])
def test_repl_survives_two_ctrl_c_under_a_small_budget(olmoe, min_budget, gap):
    budget = str(min_budget(olmoe) + 1)  # just above the minimum
    args = ["chat", "-m", str(olmoe), "--memory-budget", budget, "-n", "400", "-t", "0"]
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", _REPL, *args], stdin=slave, stdout=slave, stderr=slave,
                            close_fds=True)
    os.close(slave)
    out = b""

    def read_until(done, timeout: float) -> bool:
        nonlocal out
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if done(out):
                return True
            ready, _, _ = select.select([master], [], [], 0.05)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:
                    return False
                if not chunk:
                    return False
                out += chunk
        return False

    def prompt_after(mark: int, *, summary: bool = False):
        def done(text: bytes) -> bool:
            tail = text[mark:]
            return tail.rstrip().endswith(b">") and (not summary or b"tokens/s" in tail)
        return done

    try:
        assert read_until(prompt_after(0), 120), out.decode(errors="replace")
        mark = len(out)
        os.write(master, b"tell me a long story\n")
        for delay in (0.35, gap):  # two Ctrl-C 0.35 s into the reply and ``gap`` later
            time.sleep(delay)
            proc.send_signal(signal.SIGINT)
        assert read_until(prompt_after(mark, summary=True), 60), out.decode(errors="replace")
        time.sleep(0.2)
        read_until(lambda text: False, 0.2)  # whatever the second Ctrl-C printed
        mark = len(out)
        os.write(master, b"and now a new message\n")
        assert read_until(prompt_after(mark, summary=True), 120), out.decode(errors="replace")
        reply = out[mark:].decode(errors="replace")
        os.write(master, b"/exit\n")
        code = proc.wait(timeout=30)
        read_until(lambda text: False, 0.5)
        assert code == 0, out.decode(errors="replace")[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    text = out.decode(errors="replace")
    assert "error" not in text and "Traceback" not in text, text
    assert "tokens/s" in reply, reply  # the new message got a reply and its summary line
