"""Slot pool, host tiers and the transferer: the right bytes land in the right slots."""

from __future__ import annotations

import concurrent.futures as cf
import random
import threading
import time

import pytest
import torch

from edge_prism.errors import ConfigError, CorruptCheckpointError, PrismCheckpointError
from edge_prism.runtime.device import is_pinned, pin, resolve_device
from edge_prism.runtime.transfer import FileTier, HostTier, MappedFileTier, MemoryTier, SlotPool, Transferer

CPU = torch.device("cpu")
SHAPE = (3, 8, 16)  # like a packed sub-expert: gate rows, up rows, down columns

cuda = pytest.mark.cuda
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def random_blocks(n: int, dtype: torch.dtype, shape=SHAPE, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=generator).to(dtype)


def write_blocks(path, blocks: torch.Tensor, seed: int = 0) -> list[int]:
    """Write blocks in shuffled order with random gaps; return each block's offset."""
    rng = random.Random(seed)
    order = list(range(len(blocks)))
    rng.shuffle(order)
    offsets = [0] * len(blocks)
    with open(path, "wb") as f:
        f.write(b"HEADER" * rng.randint(1, 50))
        for i in order:
            f.write(b"\0" * rng.randint(0, 100))
            offsets[i] = f.tell()
            f.write(blocks[i].contiguous().view(torch.uint8).numpy().tobytes())
        f.write(b"TRAILER")
    return offsets


def file_tier(tmp_path, blocks: torch.Tensor, name: str = "blocks.bin") -> FileTier:
    path = tmp_path / name
    offsets = write_blocks(path, blocks)
    nbytes = blocks[0].numel() * blocks.element_size()
    return FileTier(path, offsets, nbytes, blocks.dtype, tuple(blocks.shape[1:]))


# ---- SlotPool -----------------------------------------------------------------------


def test_slot_pool_views_share_one_buffer():
    pool = SlotPool(4, SHAPE, torch.float32, CPU)
    assert pool.buffer.shape == (4, *SHAPE)
    assert pool.slot_nbytes == 3 * 8 * 16 * 4
    for i in range(4):
        view = pool.slot(i)
        assert view.shape == SHAPE and view.is_contiguous()
        assert view.data_ptr() == pool.buffer.data_ptr() + i * pool.slot_nbytes
    pool.slot(2).fill_(7)
    assert torch.all(pool.buffer[2] == 7)


def test_slot_pool_rejects_negative_sizes():
    with pytest.raises(ConfigError):
        SlotPool(-1, SHAPE, torch.float32, CPU)


# ---- FileTier -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_file_tier_round_trip(tmp_path, dtype):
    blocks = random_blocks(9, dtype)
    with file_tier(tmp_path, blocks) as tier:
        assert isinstance(tier, HostTier) and len(tier) == 9
        for i in range(9):
            dst = torch.empty(SHAPE, dtype=dtype)
            tier.read_into(i, dst)
            assert torch.equal(dst, blocks[i])


def test_file_tier_reads_from_many_threads(tmp_path):
    blocks = random_blocks(32, torch.bfloat16)
    tier = file_tier(tmp_path, blocks)

    def read(i: int) -> bool:
        dst = torch.empty(SHAPE, dtype=torch.bfloat16)
        tier.read_into(i, dst)
        return torch.equal(dst, blocks[i])

    indices = [random.Random(1).randrange(32) for _ in range(400)]
    with cf.ThreadPoolExecutor(8) as pool:
        assert all(pool.map(read, indices))
    tier.close()


def test_file_tier_reads_into_a_slot_view(tmp_path):
    blocks = random_blocks(4, torch.float32)
    tier = file_tier(tmp_path, blocks)
    pool = SlotPool(2, SHAPE, torch.float32, CPU)
    tier.read_into(3, pool.slot(1))
    assert torch.equal(pool.buffer[1], blocks[3])


def test_file_tier_missing_file(tmp_path):
    with pytest.raises(PrismCheckpointError, match="nope.bin"):
        FileTier(tmp_path / "nope.bin", [0], 4, torch.float32, (1,))


def test_file_tier_truncated_file(tmp_path):
    blocks = random_blocks(2, torch.float32)
    path = tmp_path / "short.bin"
    offsets = write_blocks(path, blocks)
    nbytes = blocks[0].numel() * 4
    with open(path, "r+b") as f:
        f.truncate(max(offsets) + nbytes // 2)
    with pytest.raises(CorruptCheckpointError, match="short.bin.*truncated"):
        FileTier(path, offsets, nbytes, torch.float32, SHAPE)


def test_file_tier_block_size_must_match_shape(tmp_path):
    blocks = random_blocks(2, torch.float32)
    path = tmp_path / "b.bin"
    offsets = write_blocks(path, blocks)
    with pytest.raises(CorruptCheckpointError, match="block 1"):
        FileTier(path, offsets, [blocks[0].numel() * 4, 12], torch.float32, SHAPE)


def test_file_tier_rejects_wrong_destination(tmp_path):
    tier = file_tier(tmp_path, random_blocks(2, torch.float32))
    with pytest.raises(ValueError):
        tier.read_into(0, torch.empty(SHAPE, dtype=torch.bfloat16))
    with pytest.raises(ValueError):
        tier.read_into(0, torch.empty((16, 8, 3)).transpose(0, 2))  # not contiguous


# ---- MemoryTier ---------------------------------------------------------------------


def test_memory_tier_reads_blocks():
    blocks = random_blocks(5, torch.bfloat16)
    tier = MemoryTier(blocks)
    assert len(tier) == 5 and tier.block(2).data_ptr() == blocks[2].data_ptr()
    dst = torch.empty(SHAPE, dtype=torch.bfloat16)
    tier.read_into(4, dst)
    assert torch.equal(dst, blocks[4])


# ---- Transferer on the CPU ----------------------------------------------------------


def make_tier(kind: str, tmp_path, blocks: torch.Tensor):
    if kind == "mapped":
        path = tmp_path / "mapped.bin"
        offsets = write_blocks(path, blocks)
        return MappedFileTier(path, offsets, blocks[0].numel() * blocks.element_size(), blocks.dtype,
                              tuple(blocks.shape[1:]))
    return MemoryTier(blocks) if kind == "memory" else file_tier(tmp_path, blocks)


@pytest.mark.parametrize("kind", ["memory", "file", "mapped"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transferer_moves_right_blocks_into_right_slots(tmp_path, kind, dtype):
    blocks = random_blocks(40, dtype)
    pool = SlotPool(8, SHAPE, dtype, CPU)
    pointer = pool.buffer.data_ptr()
    rng = random.Random(3)
    with Transferer(pool, make_tier(kind, tmp_path, blocks), CPU, workers=4) as transferer:
        expected: dict[int, int] = {}
        for _round in range(5):
            tickets = []
            for slot in range(pool.num_slots):
                index = rng.randrange(len(blocks))
                tickets.append(transferer.submit(index, slot))
                expected[slot] = index
            waited = transferer.wait(tickets)
            assert waited >= 0
            assert all(t.done() for t in tickets)
            for slot, index in expected.items():
                assert torch.equal(pool.slot(slot), blocks[index]), (slot, index)
        assert transferer.bytes_moved == 5 * 8 * pool.slot_nbytes
    assert pool.buffer.data_ptr() == pointer  # never reallocated


def test_transferer_submits_from_several_threads(tmp_path):
    blocks = random_blocks(64, torch.float32)
    pool = SlotPool(64, SHAPE, torch.float32, CPU)
    transferer = Transferer(pool, file_tier(tmp_path, blocks), CPU, workers=3)
    tickets: list = []
    lock = threading.Lock()

    def submit_range(start: int) -> None:
        for slot in range(start, 64, 4):
            ticket = transferer.submit(63 - slot, slot)
            with lock:
                tickets.append(ticket)

    threads = [threading.Thread(target=submit_range, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    transferer.wait(tickets)
    for slot in range(64):
        assert torch.equal(pool.slot(slot), blocks[63 - slot])
    transferer.close()


class SlowFirstTier:
    """Fake tier: block i fills the slot with i; block 0 is slow to read."""

    def __init__(self) -> None:
        self.reads: list[int] = []
        self.started = False

    def read_into(self, index: int, dst: torch.Tensor) -> None:
        if index == 0:
            self.started = True
            time.sleep(0.2)
        dst.fill_(index)
        self.reads.append(index)


def test_transfers_into_the_same_slot_land_in_submission_order():
    pool = SlotPool(2, (4,), torch.float32, CPU)
    tier = SlowFirstTier()
    with Transferer(pool, tier, CPU, workers=2) as transferer:
        first = transferer.submit(0, 1)  # slow
        second = transferer.submit(5, 1)  # fast, but must land after the first
        other = transferer.submit(3, 0)  # another slot is not held up
        transferer.wait([other])
        assert torch.all(pool.slot(0) == 3)
        transferer.wait([first, second])
    assert torch.all(pool.slot(1) == 5)
    assert tier.reads.index(0) < tier.reads.index(5)


def test_on_the_cpu_the_waiting_thread_reads_queued_demand_loads_itself():
    pool = SlotPool(2, (4,), torch.float32, CPU)
    tier = SlowFirstTier()
    with Transferer(pool, tier, CPU, workers=1) as transferer:
        slow = transferer.submit(0, 0)  # the one worker is busy with this for 0.2 s
        while not tier.started:
            time.sleep(0.001)
        fast = transferer.submit(3, 1)
        transferer.wait([fast])
        assert fast.done() and not slow.done()  # read by this thread, not queued behind the worker
        transferer.wait([slow])
    assert torch.all(pool.slot(1) == 3) and torch.all(pool.slot(0) == 0)
    assert tier.reads == [3, 0]


def test_a_mapped_tier_refuses_what_a_file_tier_refuses(tmp_path):
    blocks = random_blocks(4, torch.float32)
    path = tmp_path / "short.bin"
    offsets = write_blocks(path, blocks)
    with open(path, "r+b") as f:
        f.truncate(3 * blocks[0].numel() * 4 + 8)
    with pytest.raises(CorruptCheckpointError, match="truncated"):
        MappedFileTier(path, offsets, blocks[0].numel() * 4, torch.float32, tuple(blocks.shape[1:]))
    tier = make_tier("mapped", tmp_path, blocks)
    with pytest.raises(ValueError, match="contiguous host"):
        tier.read_into(0, torch.empty(3))
    tier.close()


class FailingTier:
    def read_into(self, index: int, dst: torch.Tensor) -> None:
        raise CorruptCheckpointError(f"block {index} is damaged")


def test_a_failed_transfer_raises_in_wait():
    pool = SlotPool(1, (4,), torch.float32, CPU)
    with Transferer(pool, FailingTier(), CPU) as transferer:
        ticket = transferer.submit(7, 0)
        with pytest.raises(CorruptCheckpointError, match="block 7"):
            transferer.wait([ticket])
        assert ticket.done()
        assert transferer.bytes_moved == 0


def test_mark_read_is_harmless_on_cpu():
    pool = SlotPool(2, (4,), torch.float32, CPU)
    with Transferer(pool, MemoryTier(torch.arange(8.0).reshape(2, 4)), CPU) as transferer:
        assert transferer.mark_read([0]).done()
        assert transferer.mark_read().done()
        transferer.wait([transferer.submit(1, 0)])
    assert torch.equal(pool.slot(0), torch.tensor([4.0, 5.0, 6.0, 7.0]))


def test_transferer_rejects_bad_arguments():
    pool = SlotPool(1, (4,), torch.float32, CPU)
    with pytest.raises(ConfigError):
        Transferer(pool, MemoryTier(torch.zeros(1, 4)), CPU, workers=0)


# ---- CUDA ---------------------------------------------------------------------------


@cuda
@needs_cuda
@pytest.mark.parametrize("kind", ["memory", "file"])
def test_cuda_copies_land_in_slots(tmp_path, kind):
    device = resolve_device("cuda")
    blocks = random_blocks(24, torch.bfloat16, shape=(3, 64, 256))
    tier = MemoryTier(pin(blocks)) if kind == "memory" else file_tier(tmp_path, blocks)
    pool = SlotPool(6, (3, 64, 256), torch.bfloat16, device)
    pointer = pool.buffer.data_ptr()
    with Transferer(pool, tier, device, workers=2) as transferer:
        expected: dict[int, int] = {}
        for round_ in range(4):
            tickets = []
            for slot in range(6):
                index = (round_ * 7 + slot * 5) % 24
                tickets.append(transferer.submit(index, slot))
                expected[slot] = index
            transferer.wait(tickets)
            gathered = pool.buffer.float().sum(dim=(1, 2, 3))  # compute stream, after the wait
            reference = torch.stack([blocks[expected[s]].float().sum() for s in range(6)])
            torch.testing.assert_close(gathered.cpu(), reference, rtol=1e-3, atol=1e-2)
        for slot, index in expected.items():
            assert torch.equal(pool.slot(slot).cpu(), blocks[index])
    assert pool.buffer.data_ptr() == pointer


@cuda
@needs_cuda
@pytest.mark.parametrize("kind", ["memory", "file"])
def test_cuda_slot_is_not_overwritten_while_a_kernel_reads_it(tmp_path, kind):
    device = resolve_device("cuda")
    n = 4096
    blocks = random_blocks(2, torch.float32, shape=(n, n), seed=5)
    tier = MemoryTier(pin(blocks)) if kind == "memory" else file_tier(tmp_path, blocks)
    pool = SlotPool(1, (n, n), torch.float32, device)
    x = torch.randn(8192, n, device=device)
    reference = x @ blocks[0].to(device)
    with Transferer(pool, tier, device) as transferer:
        transferer.wait([transferer.submit(0, 0)])
        # Several long matmuls read slot 0 (hundreds of ms queued); the 64 MiB copy of
        # block 1 takes a few ms and would land in the middle of them without the mark.
        outputs = [x @ pool.slot(0) for _ in range(8)]
        transferer.mark_read([0])
        ticket = transferer.submit(1, 0)
        transferer.wait([ticket])
        after = x @ pool.slot(0)
    for out in outputs:
        torch.testing.assert_close(out, reference)
    torch.testing.assert_close(after, x @ blocks[1].to(device))


@cuda
@needs_cuda
def test_cuda_staging_buffers_and_memory_tier_are_pinned(tmp_path):
    device = resolve_device("cuda")
    blocks = random_blocks(2, torch.float32)
    assert is_pinned(pin(blocks))
    transferer = Transferer(SlotPool(1, SHAPE, torch.float32, device), file_tier(tmp_path, blocks), device)
    assert all(buffer.is_pinned() for buffer, _ in transferer._q.staging)
    transferer.close()
    from edge_prism.runtime.device import host_buffer

    registered = host_buffer((1024, 1024), torch.float32, device)  # registered in place, exact size
    assert is_pinned(registered) and registered.numel() * 4 == 4 * 2**20
