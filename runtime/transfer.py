"""Moving sub-expert blocks from the host tiers into device slots: mechanism only.

Which block goes into which slot is decided elsewhere (:mod:`.policy`); this module
owns the slot buffer, the host tiers, the worker threads, the pinned staging buffers
and the ordering between copies and the kernels that read slots.

    HostTier (FileTier: pread | MemoryTier: host tensor)
        -> [CUDA, file: pinned staging buffer] -> CopyStream (async, events)
        -> SlotPool slot
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import math
import os
import queue
import threading
import time
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from edge_prism.errors import ConfigError, CorruptCheckpointError, PrismCheckpointError

from .device import ComputeMark, CopyHandle, CopyStream, is_pinned, pinned_empty

logger = logging.getLogger(__name__)


class SlotPool:
    """``num_slots`` equal slots in one buffer allocated once; a slot holds one sub-expert block.

    Allocating up front keeps the hot path free of allocations and the memory budget an
    honest upper bound. ``slot(i)`` returns a view made once, so it costs no allocation
    either; batched kernels gather from ``buffer`` by slot index.
    """

    def __init__(
        self, num_slots: int, block_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> None:
        if num_slots < 0:
            raise ConfigError(f"invalid number of slots {num_slots}: use an integer >= 0")
        self.block_shape = tuple(block_shape)
        self.buffer = torch.empty((num_slots, *self.block_shape), dtype=dtype, device=device)
        self._views = self.buffer.unbind(0)

    @property
    def num_slots(self) -> int:
        """How many blocks the pool holds."""
        return self.buffer.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        """Element type of every slot."""
        return self.buffer.dtype

    @property
    def device(self) -> torch.device:
        """Device the slots live on."""
        return self.buffer.device

    @property
    def slot_nbytes(self) -> int:
        """Bytes of one slot (one sub-expert block)."""
        return math.prod(self.block_shape) * self.buffer.element_size()

    def slot(self, i: int) -> torch.Tensor:
        """View of slot ``i``: ``[*block_shape]``."""
        return self._views[i]


@runtime_checkable
class HostTier(Protocol):
    """Where a sub-expert block lives while it is not in a slot."""

    def read_into(self, index: int, dst: torch.Tensor) -> None:
        """Copy block ``index`` into host tensor ``dst`` (contiguous, block shape and dtype); synchronous."""
        ...


@runtime_checkable
class BlockSource(HostTier, Protocol):
    """A host tier whose blocks are host tensors already; on CUDA they are copied straight
    from there (no staging), so they should be pinned."""

    def block(self, index: int) -> torch.Tensor:
        """Block ``index`` as a host tensor view: ``[*block_shape]``."""
        ...


class FileTier:
    """Blocks stored contiguously in a file at known offsets, read on demand with ``preadv``.

    Each read lands straight in the destination tensor's memory (a slot on the CPU, a
    pinned staging buffer on CUDA), so blocks outside the budget never occupy process
    memory (the page cache is the kernel's to manage). ``pread`` has no shared file
    position, so one tier serves many threads at once.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        offsets: Sequence[int],
        nbytes: Sequence[int] | int,
        dtype: torch.dtype,
        block_shape: tuple[int, ...],
    ) -> None:
        self.path = Path(path)
        self.dtype = dtype
        self.block_shape = tuple(block_shape)
        self.offsets = [int(o) for o in offsets]
        sizes = [int(nbytes)] * len(self.offsets) if isinstance(nbytes, int) else [int(n) for n in nbytes]
        if len(sizes) != len(self.offsets):
            raise ValueError(f"{len(self.offsets)} offsets but {len(sizes)} block sizes")
        self.block_nbytes = math.prod(self.block_shape) * dtype.itemsize
        for index, size in enumerate(sizes):
            if size != self.block_nbytes:
                raise CorruptCheckpointError(
                    f"{self.path}: block {index} is {size} bytes, but a {dtype} block of shape "
                    f"{self.block_shape} is {self.block_nbytes}; re-create the prism checkpoint"
                )
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as err:
            raise PrismCheckpointError(
                f"cannot open {self.path}: {err.strerror}; check the path or re-create the prism checkpoint"
            ) from err
        self._fd = fd
        self._close = weakref.finalize(self, os.close, fd)  # closes the file even if close() is never called
        file_size = os.fstat(fd).st_size
        for index, offset in enumerate(self.offsets):
            if offset < 0 or offset + self.block_nbytes > file_size:
                self.close()
                raise CorruptCheckpointError(
                    f"{self.path}: block {index} ends at byte {offset + self.block_nbytes} but the file "
                    f"has {file_size} bytes (truncated?); re-create the prism checkpoint"
                )

    def __len__(self) -> int:
        return len(self.offsets)

    def read_into(self, index: int, dst: torch.Tensor) -> None:
        """Read block ``index`` into host tensor ``dst`` (contiguous, block shape and dtype)."""
        if (
            dst.device.type != "cpu"
            or dst.dtype != self.dtype
            or not dst.is_contiguous()
            or dst.numel() * dst.element_size() != self.block_nbytes
        ):
            raise ValueError(
                f"read_into needs a contiguous host {self.dtype} tensor of {self.block_nbytes} bytes, "
                f"got {dst.dtype} {tuple(dst.shape)} on {dst.device}"
            )
        # numpy has no bfloat16, so reads go through a byte view of the same memory.
        target = memoryview(dst.detach().reshape(-1).view(torch.uint8).numpy())
        offset = self.offsets[index]
        done = 0
        while done < self.block_nbytes:
            n = _pread_into(self._fd, target[done:], offset + done)
            if n == 0:
                raise CorruptCheckpointError(
                    f"{self.path}: unexpected end of file in block {index}; re-create the prism checkpoint"
                )
            done += n

    def close(self) -> None:
        """Close the file; the tier cannot read afterwards."""
        self._close()

    def __enter__(self) -> "FileTier":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MemoryTier:
    """Blocks held in one host tensor ``[num_blocks, *block_shape]``.

    On CUDA machines hand in pinned memory (:func:`.device.pin`) so copies are
    asynchronous; on the CPU this is typically an mmap-backed tensor of the checkpoint.
    """

    def __init__(self, blocks: torch.Tensor) -> None:
        if blocks.device.type != "cpu":
            raise ValueError(f"MemoryTier holds host blocks, got a tensor on {blocks.device}")
        self.blocks = blocks
        self.block_shape = tuple(blocks.shape[1:])
        self.dtype = blocks.dtype

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def block(self, index: int) -> torch.Tensor:
        """Block ``index``: ``[*block_shape]``, a view."""
        return self.blocks[index]

    def read_into(self, index: int, dst: torch.Tensor) -> None:
        """Copy block ``index`` into ``dst``."""
        dst.copy_(self.blocks[index])


class Ticket:
    """One submitted transfer of block ``index`` into ``slot``; pass it to :meth:`Transferer.wait`."""

    __slots__ = ("index", "slot", "_future", "_handle")

    def __init__(
        self, index: int, slot: int, future: "cf.Future[CopyHandle | None] | None", handle: CopyHandle | None
    ) -> None:
        self.index = index
        self.slot = slot
        self._future = future
        self._handle = handle

    def done(self) -> bool:
        """Whether the block is in its slot (or its transfer failed; wait() then raises), without blocking."""
        handle = self._handle
        if self._future is not None:
            if self._future.cancelled():
                return True
            if not self._future.done():
                return False
            if self._future.exception() is not None:
                return True
            handle = self._future.result()
        return handle is None or handle.done()

    def cancel(self) -> bool:
        """Cancel the transfer if it has not started (worker queue); True when cancelled."""
        return self._future is not None and self._future.cancel()

    def __repr__(self) -> str:
        return f"Ticket(index={self.index}, slot={self.slot}, done={self.done()})"


class Transferer:
    """Moves blocks from a host tier into a slot pool without blocking the caller.

    - CPU device: a thread pool reads blocks straight into slot views (``preadv`` and
      ``copy_`` release the GIL); a ticket is a future.
    - CUDA device, tier with host tensors (:class:`MemoryTier`): an async copy from the
      pinned block on the copy stream, issued by the caller's thread; a ticket is an event.
    - CUDA device, any other tier (:class:`FileTier`): a worker reads the block into one
      of ``workers + 1`` pinned staging buffers, then issues the async copy to the slot; a
      staging buffer is reused only after the copy out of it has completed.

    Two transfers into the same slot land in submission order. A copy into a slot waits
    for the latest :meth:`mark_read` covering that slot, so it never overwrites data a
    running kernel still reads.
    """

    def __init__(
        self,
        pool: SlotPool,
        tier: HostTier,
        device: torch.device,
        *,
        workers: int = 2,
        stream: CopyStream | None = None,
    ) -> None:
        self.device = torch.device(device)
        if self.device.type != pool.device.type:
            raise ValueError(f"slot pool is on {pool.device} but the transferer is for {self.device}")
        if workers < 1:
            raise ConfigError(f"invalid number of transfer workers {workers}: use 1 or more")
        self.pool = pool
        self.tier = tier
        self.bytes_moved = 0
        self._stream = stream if stream is not None else CopyStream(self.device)
        self._lock = threading.Lock()
        self._last: list[Ticket | None] = [None] * pool.num_slots
        self._slot_marks: list[ComputeMark | None] = [None] * pool.num_slots
        # The slot buffer was allocated on the compute stream, possibly from memory that
        # kernels queued there still use; the first copies must wait for those (CUDA).
        initial = self._stream.record_compute_done()
        self._all_mark: ComputeMark | None = initial if initial.event is not None else None
        cuda = self.device.type == "cuda"
        # On CUDA, host-tensor blocks are copied by the caller's thread: issuing an async
        # copy is microseconds, a thread hop would cost more.
        self._direct = cuda and isinstance(tier, BlockSource)
        self._executor: cf.ThreadPoolExecutor | None = None
        self._staging: queue.SimpleQueue | None = None
        self._checked_pinned = False
        if not self._direct:
            self._executor = cf.ThreadPoolExecutor(workers, thread_name_prefix="edge-prism-transfer")
        if cuda and not self._direct:
            # One more buffer than workers, so a worker can read the next block while the
            # previous block's copy is still running.
            self._staging = queue.SimpleQueue()
            for _ in range(workers + 1):
                self._staging.put((pinned_empty(pool.block_shape, pool.dtype), None))
        logger.debug(
            "transferer on %s: %s, %d slot(s) of %d bytes",
            self.device,
            "direct copies" if self._direct else f"{workers} worker(s)" + (", pinned staging" if cuda else ""),
            pool.num_slots,
            pool.slot_nbytes,
        )

    def submit(self, index: int, slot: int) -> Ticket:
        """Start moving block ``index`` into ``slot``; returns at once."""
        with self._lock:
            after = [m for m in (self._all_mark, self._slot_marks[slot]) if m is not None]
            if self._direct:
                src = self.tier.block(index)  # type: ignore[attr-defined]
                if not self._checked_pinned:
                    self._checked_pinned = True
                    if not is_pinned(src):
                        logger.warning("host blocks are not pinned: copies to %s will not overlap compute", self.device)
                handle = self._stream.copy(self.pool.slot(slot), src, after=after)
                self.bytes_moved += self.pool.slot_nbytes
                ticket = Ticket(index, slot, None, handle)
            else:
                assert self._executor is not None
                previous = self._last[slot]
                before = previous._future if previous is not None else None
                if before is not None and before.done():
                    before = None
                future = self._executor.submit(self._move, index, slot, before, after)
                ticket = Ticket(index, slot, future, None)
            self._last[slot] = ticket
        return ticket

    def wait(self, tickets: Iterable[Ticket]) -> float:
        """Make compute wait for ``tickets``; returns seconds the host spent in here.

        CPU: blocks until the blocks are in their slots. CUDA: blocks only until the
        copies are issued (file reads done), then makes the compute stream wait on their
        events. Raises the error of a failed transfer.
        """
        start = time.perf_counter()
        for ticket in tickets:
            handle = ticket._future.result() if ticket._future is not None else ticket._handle
            if handle is not None:
                self._stream.make_compute_wait(handle)
        return time.perf_counter() - start

    def mark_read(self, slots: Iterable[int] | None = None) -> ComputeMark:
        """Record that kernels launched so far read ``slots`` (None: every slot).

        Call it after launching kernels that read slots and before releasing their keys
        in the policy: later copies into those slots then wait for the kernels. A no-op
        on the CPU, where kernels have finished when they return.
        """
        mark = self._stream.record_compute_done()
        if mark.event is None:
            return mark
        with self._lock:
            if slots is None:
                self._all_mark = mark
            else:
                for slot in slots:
                    self._slot_marks[slot] = mark
        return mark

    def close(self) -> None:
        """Finish queued transfers and stop the workers."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def __enter__(self) -> "Transferer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _move(
        self, index: int, slot: int, before: "cf.Future | None", after: list[ComputeMark]
    ) -> CopyHandle | None:
        if before is not None:
            # A transfer into the same slot was submitted earlier: let it land (CPU) or be
            # issued (CUDA, the stream keeps the order) first. It was queued earlier, so it
            # is already running or done: no deadlock.
            cf.wait([before])
        dst = self.pool.slot(slot)
        handle: CopyHandle | None = None
        if self._staging is None:
            self.tier.read_into(index, dst)
        else:
            buffer, last_copy = self._staging.get()
            try:
                if last_copy is not None:
                    last_copy.wait()  # the staging buffer is still being copied out of
                self.tier.read_into(index, buffer)
                handle = self._stream.copy(dst, buffer, after=after)
            finally:
                self._staging.put((buffer, handle))
        with self._lock:
            self.bytes_moved += self.pool.slot_nbytes
        return handle


def _pread_into(fd: int, target: memoryview, offset: int) -> int:
    if hasattr(os, "preadv"):
        return os.preadv(fd, [target], offset)
    data = os.pread(fd, len(target), offset)  # platforms without preadv: one extra copy
    target[: len(data)] = data
    return len(data)


__all__ = ["SlotPool", "HostTier", "BlockSource", "FileTier", "MemoryTier", "Ticket", "Transferer"]
