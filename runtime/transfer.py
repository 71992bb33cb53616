"""Moving sub-expert blocks from the host tiers into device slots: mechanism only.

Which block goes into which slot is decided elsewhere (:mod:`.policy`); this module
owns the slot buffer, the host tiers, the worker threads, the pinned staging buffers
and the ordering between copies and the kernels that read slots.

    HostTier (FileTier: pread | MemoryTier: host tensor)
        -> [asynchronous device, file: pinned staging buffer]
        -> demand copy stream (now) | speculative copy stream (held back on the host)
        -> SlotPool slot

Demand loads (the compute is about to read them) never queue behind speculative ones
(prefetches): speculation waits in a host-side queue that workers serve only when no
demand load is waiting, and on the direct path at most ``SPECULATIVE_DEPTH`` speculative
copies are on the device at a time, so a demand copy waits for at most that many even on
a device that runs copies first-in first-out whatever the stream priority. A speculative
load still in the host queue can be cancelled, and is promoted to demand when waited on.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import threading
import time
import warnings
import weakref
from collections import deque
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from edge_prism.errors import ConfigError, CorruptCheckpointError, PrismCheckpointError

from .device import (DEMAND_PRIORITY, SPECULATIVE_PRIORITY, ComputeMark, CopyHandle, CopyStream, DeviceBuffer,
                     default_workers, init_helper_thread, is_async, is_pinned, new_event, pinned_empty)

logger = logging.getLogger(__name__)

SPECULATIVE_DEPTH = 2  # speculative copies on the device at once (direct path)
MARKS = 64  # compute marks made once and re-recorded in turn


class SlotPool:
    """``num_slots`` equal slots in one device buffer allocated once; a slot holds one block.

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
        self.num_slots, self.dtype, self.device = num_slots, dtype, torch.device(device)
        self._memory = DeviceBuffer((num_slots, *self.block_shape), dtype, device)
        self.buffer = self._memory.tensor
        self._views = self.buffer.unbind(0)

    @property
    def slot_nbytes(self) -> int:
        """Bytes of one slot (one sub-expert block)."""
        return math.prod(self.block_shape) * self.dtype.itemsize

    def slot(self, i: int) -> torch.Tensor:
        """View of slot ``i``: ``[*block_shape]``."""
        return self._views[i]

    def release(self) -> None:
        """Give the memory back (after every copy into it has completed)."""
        self.buffer, self._views = None, ()
        self._memory.release()


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
    position, so one tier serves many threads at once; where the OS has no positioned read
    (Windows), reads seek and read under a lock.
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
            fd = open_binary(self.path)
        except OSError as err:
            raise PrismCheckpointError(
                f"cannot open {self.path}: {err.strerror}; check the path or re-create the prism checkpoint"
            ) from err
        self._fd = fd
        self._close = weakref.finalize(self, os.close, fd)  # closes the file even if close() is never called
        self._seek_lock = threading.Lock()
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

    def _check(self, dst: torch.Tensor) -> None:
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

    def read_into(self, index: int, dst: torch.Tensor) -> None:
        """Read block ``index`` into host tensor ``dst`` (contiguous, block shape and dtype)."""
        self._check(dst)
        # numpy has no bfloat16, so reads go through a byte view of the same memory.
        target = memoryview(dst.detach().reshape(-1).view(torch.uint8).numpy())
        if read_fully(self._fd, target, self.offsets[index], self._seek_lock) < self.block_nbytes:
            raise CorruptCheckpointError(
                f"{self.path}: unexpected end of file in block {index}; re-create the prism checkpoint"
            )

    def close(self) -> None:
        """Close the file; the tier cannot read afterwards."""
        self._close()

    def __enter__(self) -> "FileTier":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class MappedFileTier(FileTier):
    """A FileTier that copies blocks out of a read-only memory map of the file instead of
    calling ``preadv``: the page cache without a system call and a kernel copy per block.

    For the CPU device, where every miss is a copy from the page cache into a slot: 7 us
    against 19 us per 104 KB block of the default prism (2-core AVX-512 EPYC, file cached).
    The mapped pages are the kernel's page cache, shared and clean: the process's RSS counts
    those it has touched (up to the file's size), but the kernel reclaims them under memory
    pressure as it would the cache behind ``preadv``; slots, the budgeted memory, are the
    same either way. The file must not be truncated while mapped (replacing it, as every
    writer of prism files does, is safe: the mapping keeps the old file).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        try:
            self._map = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as err:
            self.close()
            raise PrismCheckpointError(f"cannot map {self.path}: {err}; re-create the prism checkpoint") from err
        # numpy copies at memory speed and releases the GIL (torch's copy_ of a small block holds it).
        self._array = np.frombuffer(self._map, dtype=np.uint8)
        self._blocks: tuple[torch.Tensor, ...] | None = None

    def blocks(self) -> tuple[torch.Tensor, ...]:
        """Every block as a tensor viewing the mapped file, in index order (made once).

        Read-only memory: for kernels that read a block where it lies (the CPU reads misses
        in place, see store.BudgetedStore); writing through one raises a segmentation fault,
        so nothing may write to them.
        """
        if self._blocks is None:
            with warnings.catch_warnings():  # torch warns that the buffer is not writable: it is read only
                warnings.simplefilter("ignore", UserWarning)
                data = torch.from_numpy(self._array)
            self._blocks = tuple(data[o:o + self.block_nbytes].view(self.dtype).view(self.block_shape)
                                 for o in self.offsets)
        return self._blocks

    def read_into(self, index: int, dst: torch.Tensor) -> None:
        """Copy block ``index`` into host tensor ``dst`` (contiguous, block shape and dtype)."""
        self._check(dst)
        offset = self.offsets[index]
        target = dst.detach().reshape(-1).view(torch.uint8).numpy()
        np.copyto(target, self._array[offset:offset + self.block_nbytes])

    def close(self) -> None:
        """Unmap and close the file."""
        self._array = self._blocks = None
        m = getattr(self, "_map", None)
        if m is not None:
            try:
                m.close()
            except BufferError:  # a view is still alive somewhere: the finalizer of the map unmaps it
                pass
        super().close()


class MemoryTier:
    """Blocks held in one host tensor ``[num_blocks, *block_shape]``.

    On CUDA machines hand in page-locked memory (:func:`.device.host_buffer`) so copies
    are asynchronous; on the CPU this is typically an mmap-backed tensor of the checkpoint.
    """

    def __init__(self, blocks: torch.Tensor) -> None:
        if blocks.device.type != "cpu":
            raise ValueError(f"MemoryTier holds host blocks, got a tensor on {blocks.device}")
        self.blocks = blocks
        self.block_shape = tuple(blocks.shape[1:])
        self.dtype = blocks.dtype
        self._views = blocks.unbind(0)  # made once: no allocation per copy

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def block(self, index: int) -> torch.Tensor:
        """Block ``index``: ``[*block_shape]``, a view."""
        return self._views[index]

    def read_into(self, index: int, dst: torch.Tensor) -> None:
        """Copy block ``index`` into ``dst``."""
        dst.copy_(self._views[index])

    def nbytes(self) -> int:
        """Bytes held."""
        return self.blocks.numel() * self.blocks.element_size()


# Ticket states.
QUEUED, RUNNING, ISSUED, DONE, CANCELLED, FAILED = range(6)


class Ticket:
    """One submitted transfer of block ``index`` into ``slot``; pass it to :meth:`Transferer.wait`."""

    __slots__ = ("index", "slot", "speculative", "state", "handle", "error", "prev", "_owner")

    def __init__(self, index: int, slot: int, speculative: bool, owner: "Transferer",
                 prev: "Ticket | None") -> None:
        self.index, self.slot, self.speculative = index, slot, speculative
        self.state = QUEUED
        self.handle: CopyHandle | None = None
        self.error: BaseException | None = None
        self.prev = prev  # an earlier transfer into the same slot still running when this one was submitted
        self._owner = weakref.ref(owner)

    def done(self) -> bool:
        """Whether the block is in its slot (or its transfer failed or was cancelled), without blocking."""
        state = self.state
        if state == ISSUED:
            return self.handle is None or self.handle.done()
        return state in (DONE, CANCELLED, FAILED)

    def failed(self) -> bool:
        """Whether the transfer failed (wait() raises its error)."""
        return self.state == FAILED

    def cancel(self) -> bool:
        """Cancel the transfer if it has not started; True when cancelled."""
        owner = self._owner()
        return owner is not None and owner._cancel(self)

    def __repr__(self) -> str:
        names = ("queued", "running", "issued", "done", "cancelled", "failed")
        return f"Ticket(index={self.index}, slot={self.slot}, {names[self.state]})"


class _Queue:
    """State shared with the worker threads (which hold the transferer only weakly)."""

    def __init__(self) -> None:
        self.cv = threading.Condition()
        self.demand: deque[Ticket] = deque()
        self.speculative: deque[Ticket] = deque()
        self.closed = False
        self.staging: list[tuple[torch.Tensor, CopyHandle]] = []  # free staging buffers


class Transferer:
    """Moves blocks from a host tier into a slot pool without blocking the caller.

    - Synchronous CPU device: worker threads read blocks straight into slot views
      (``preadv`` and ``copy_`` release the GIL).
    - Asynchronous device, tier of host tensors (:class:`MemoryTier`): a demand copy is
      issued by the caller's thread on the demand stream at once; speculative copies are
      issued by one thread, at most ``SPECULATIVE_DEPTH`` on the device at a time.
    - Asynchronous device, any other tier (:class:`FileTier`): a worker reads the block into
      a pinned staging buffer, then issues the copy; a staging buffer is reused only after
      the copy out of it has completed, and one is always left for demand loads.

    Transfers into the same slot land in submission order (a speculative one still queued
    is cancelled by a newer one: its slot was given to another block). A copy into a slot
    waits for the latest :meth:`mark_read` covering that slot, so it never overwrites data
    a running kernel still reads. :meth:`close` (or collection) waits for every issued copy
    before the slot and host memory can be reused.
    """

    def __init__(
        self,
        pool: SlotPool,
        tier: HostTier,
        device: torch.device,
        *,
        workers: int | None = None,
    ) -> None:
        self.device = torch.device(device)
        if self.device.type != pool.device.type:
            raise ValueError(f"slot pool is on {pool.device} but the transferer is for {self.device}")
        workers = default_workers(self.device) if workers is None else workers
        if workers < 1:
            raise ConfigError(f"invalid number of transfer workers {workers}: use 1 or more")
        self.pool = pool
        self.tier = tier
        self.bytes_moved = 0
        self._async = is_async(self.device)
        self._demand = CopyStream(self.device, priority=DEMAND_PRIORITY)
        self._speculative = CopyStream(self.device, priority=SPECULATIVE_PRIORITY) if self._async else self._demand
        self._q = _Queue()
        n = pool.num_slots
        self._last: list[Ticket | None] = [None] * n
        self._slot_handles = [CopyHandle(new_event(self.device)) for _ in range(n)] if self._async else []
        # Compute marks: made once, re-recorded in turn; a slot remembers (mark, generation).
        self._marks = [ComputeMark(new_event(self.device)) for _ in range(MARKS)] if self._async else []
        self._mark_gen = [0] * len(self._marks)
        self._mark_next = 0
        self._slot_marks: list[tuple[int, int] | None] = [None] * n
        # The slot buffer was allocated on the compute stream, possibly from memory that
        # kernels queued there still use; copies wait for those (until they are done).
        initial = self._demand.record_compute_done()
        self._all_mark: ComputeMark | None = initial if initial.event is not None else None
        if self._async:
            for stream in (self._demand, self._speculative):
                stream.record_use(pool.buffer)  # no reuse of the slots under a late copy
        self._direct = self._async and isinstance(tier, BlockSource)
        self._checked_pinned = False
        if self._async and not self._direct:
            # One more buffer than workers, so a worker can read the next block while the
            # previous block's copy is still running; one more kept for demand loads.
            self._q.staging = [(pinned_empty(pool.block_shape, pool.dtype), CopyHandle(new_event(self.device)))
                               for _ in range(workers + 2)]
        ref = weakref.ref(self)
        if self._direct:
            targets = [(_speculative_issuer, "edge-prism-prefetch")]
        else:
            targets = [(_worker, "edge-prism-transfer")] * workers
        self._threads = [threading.Thread(target=fn, args=(ref, self._q), name=name, daemon=True)
                         for fn, name in targets]
        for t in self._threads:
            t.start()
        self._finalizer = weakref.finalize(self, _shutdown, self._q, [self._demand, self._speculative])
        logger.debug(
            "transferer on %s: %s, %d slot(s) of %d bytes",
            self.device,
            "direct copies" if self._direct else f"{workers} worker(s)" + (", pinned staging" if self._async else ""),
            pool.num_slots,
            pool.slot_nbytes,
        )

    # -- submitting ----------------------------------------------------------------------------

    @property
    def lanes(self) -> int:
        """Missing blocks loaded at once: 1 on an asynchronous device (every demand copy runs
        on the one demand stream, in order); on the CPU the workers and the waiting compute
        thread (see :meth:`wait`), each reading a block straight into its slot."""
        return 1 if self._async else len(self._threads) + 1

    def submit(self, index: int, slot: int, *, speculative: bool = False) -> Ticket:
        """Start moving block ``index`` into ``slot``; returns at once.

        ``speculative``: a prefetch; it waits behind every demand load and can be cancelled.
        """
        q = self._q
        with q.cv:
            if q.closed:
                raise RuntimeError("the transferer is closed")
            prev = self._last[slot]
            if prev is not None and prev.state == QUEUED and prev.speculative:
                self._dequeue(prev)  # superseded: its slot now belongs to another block
                prev = None
            ticket = Ticket(index, slot, speculative, self, prev if prev is not None and prev.state in (
                QUEUED, RUNNING) else None)
            self._last[slot] = ticket
            if self._direct and not speculative:
                self._issue(ticket, self._demand, self.tier.block(index))  # type: ignore[attr-defined]
            else:
                (q.speculative if speculative else q.demand).append(ticket)
                q.cv.notify_all()
        return ticket

    def wait(self, tickets: Iterable[Ticket]) -> float:
        """Make compute wait for ``tickets``; returns seconds the host blocked in here.

        Speculative tickets still queued become demand loads. CPU: blocks until the blocks
        are in their slots, reading queued demand loads itself beside the workers (the
        compute thread has nothing else to do, and on a CPU its core is idle while it
        waits). Asynchronous devices: blocks only until the copies are issued (file reads
        done), then makes compute wait on their events; the time compute then stalls is in
        :meth:`stall_seconds`. Raises the error of a failed transfer.
        """
        tickets = list(tickets)
        start = time.perf_counter()
        q = self._q
        error: BaseException | None = None
        with q.cv:
            for t in tickets:
                if t.state == QUEUED and t.speculative:
                    self._promote(t)
            while any(t.state in (QUEUED, RUNNING) for t in tickets):
                ticket = None if self._async else _ready(q.demand)
                if ticket is not None:
                    q.demand.remove(ticket)
                    ticket.state = RUNNING
                    q.cv.release()
                    try:
                        self._serve(ticket)
                    finally:
                        q.cv.acquire()
                    continue
                q.cv.wait()
            for t in tickets:
                if t.state == FAILED:
                    error = t.error
                    break
        waited = time.perf_counter() - start
        if error is not None:
            raise error
        self._demand.compute_wait([t.handle for t in tickets if t.handle is not None])
        return waited

    def stall_seconds(self) -> float:
        """Seconds compute waited for copies after :meth:`wait` returned (asynchronous devices)."""
        return self._demand.stall_seconds()

    def reset_stall(self) -> None:
        """Zero :meth:`stall_seconds`."""
        self._demand.reset_stall()

    def mark_read(self, slots: Iterable[int] | None = None) -> ComputeMark:
        """Record that kernels launched so far read ``slots`` (None: every slot).

        Call it after launching kernels that read slots and before releasing their keys
        in the policy: later copies into those slots then wait for the kernels. A no-op
        on the CPU, where kernels have finished when they return.
        """
        if not self._async:
            return ComputeMark(None)
        with self._q.cv:
            i = self._mark_next
            self._mark_next = (i + 1) % MARKS
            mark = self._marks[i]
            if not mark.done():  # recorded MARKS calls ago: a GPU is never that far behind
                mark.event.synchronize()
            self._mark_gen[i] += 1
            self._demand.record_compute_done(mark)
            if slots is None:
                self._all_mark = mark
                self._slot_marks = [None] * len(self._slot_marks)
            else:
                for slot in slots:
                    self._slot_marks[slot] = (i, self._mark_gen[i])
        return mark

    def idle(self) -> bool:
        """Whether nothing is queued, running or in flight."""
        with self._q.cv:
            return not (self._q.demand or self._q.speculative) and all(t is None or t.done() for t in self._last)

    def close(self) -> None:
        """Cancel queued transfers, stop the threads and wait for every issued copy."""
        _stop(self._q)
        for t in self._threads:
            if t is not threading.current_thread():
                t.join()
        self._finalizer()  # once no thread can issue more: wait for the copies issued
        close = getattr(self.tier, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "Transferer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals (under the queue's lock unless said otherwise) ------------------------------
    def _cancel(self, ticket: Ticket) -> bool:
        with self._q.cv:
            if ticket.state != QUEUED:
                return False
            self._dequeue(ticket)
            return True

    def _dequeue(self, ticket: Ticket) -> None:
        for d in (self._q.speculative, self._q.demand):
            try:
                d.remove(ticket)
            except ValueError:
                continue
        ticket.state, ticket.prev = CANCELLED, None
        self._q.cv.notify_all()

    def _promote(self, ticket: Ticket) -> None:
        self._q.speculative.remove(ticket)
        ticket.speculative = False
        if self._direct:
            self._issue(ticket, self._demand, self.tier.block(ticket.index))  # type: ignore[attr-defined]
        else:
            self._q.demand.appendleft(ticket)
            self._q.cv.notify_all()

    def _after(self, slot: int) -> list[ComputeMark]:
        after = []
        if self._all_mark is not None:
            if self._all_mark.done():
                self._all_mark = None
            else:
                after.append(self._all_mark)
        entry = self._slot_marks[slot]
        if entry is not None and self._mark_gen[entry[0]] == entry[1]:
            after.append(self._marks[entry[0]])
        return after

    def _issue(self, ticket: Ticket, stream: CopyStream, src: torch.Tensor) -> None:
        """Issue the copy of ``src`` into the ticket's slot (asynchronous devices)."""
        if not self._checked_pinned and self.device.type == "cuda":
            self._checked_pinned = True
            if not is_pinned(src):
                logger.warning("host blocks are not pinned: copies to %s will not overlap compute", self.device)
        handle = self._slot_handles[ticket.slot]
        stream.copy(self.pool.slot(ticket.slot), src, after=self._after(ticket.slot), after_copies=[handle],
                    handle=handle)
        ticket.handle, ticket.state, ticket.prev = handle, ISSUED, None
        self.bytes_moved += self.pool.slot_nbytes
        self._q.cv.notify_all()

    def _serve(self, ticket: Ticket) -> None:
        """Run ``ticket`` (state RUNNING; called without the lock); a failure is handed to
        whoever waits on it."""
        try:
            self._run(ticket)
        except BaseException as err:
            with self._q.cv:
                ticket.error, ticket.state, ticket.prev = err, FAILED, None
                self._q.cv.notify_all()

    def _run(self, ticket: Ticket) -> None:
        """A worker moves ``ticket`` (state RUNNING; called without the lock)."""
        q = self._q
        if not self._async:
            with q.cv:
                while ticket.prev is not None and ticket.prev.state in (QUEUED, RUNNING):
                    q.cv.wait()
            self.tier.read_into(ticket.index, self.pool.slot(ticket.slot))
            with q.cv:
                ticket.state, ticket.prev = DONE, None
                self.bytes_moved += self.pool.slot_nbytes
                q.cv.notify_all()
            return
        with q.cv:
            # Speculation leaves the last free staging buffer to demand loads.
            while len(q.staging) < (2 if ticket.speculative else 1):
                q.cv.wait()
            buffer, buffer_handle = q.staging.pop()
        try:
            buffer_handle.wait()  # the copy out of this buffer has completed
            self.tier.read_into(ticket.index, buffer)
            with q.cv:
                while ticket.prev is not None and ticket.prev.state in (QUEUED, RUNNING):
                    q.cv.wait()
                stream = self._speculative if ticket.speculative else self._demand
                self._issue(ticket, stream, buffer)
                stream.record(buffer_handle)  # the buffer is free again once this copy has run
        finally:
            with q.cv:
                q.staging.append((buffer, buffer_handle))
                q.cv.notify_all()


def _ready(queue: deque[Ticket]) -> Ticket | None:
    """The first queued ticket not held back by an earlier transfer into its slot."""
    for t in queue:
        if t.prev is None or t.prev.state not in (QUEUED, RUNNING):
            return t
    return None


def _worker(ref: "weakref.ref[Transferer]", q: _Queue) -> None:
    """Serve demand loads first, speculative ones when no demand load waits."""
    init_helper_thread()
    while True:
        with q.cv:
            while not (q.demand or q.speculative) and not q.closed:
                q.cv.wait()
            if q.closed:
                return
            ticket = (q.demand or q.speculative).popleft()
            ticket.state = RUNNING
        transferer = ref()
        if transferer is None:
            return
        try:
            transferer._serve(ticket)
        finally:
            del transferer


def _speculative_issuer(ref: "weakref.ref[Transferer]", q: _Queue) -> None:
    """Direct path: issue queued speculative copies, at most SPECULATIVE_DEPTH on the device."""
    init_helper_thread()
    inflight: deque[CopyHandle] = deque()
    while True:
        if len(inflight) >= SPECULATIVE_DEPTH:
            inflight.popleft().wait()  # sleeps on a blocking event, outside the lock
            continue
        with q.cv:
            while not q.speculative and not q.closed:
                q.cv.wait()
            if q.closed:
                return
            transferer = ref()
            if transferer is None:
                return
            ticket = q.speculative.popleft()
            try:
                transferer._issue(ticket, transferer._speculative, transferer.tier.block(ticket.index))
                inflight.append(ticket.handle)
            except BaseException as err:
                ticket.error, ticket.state, ticket.prev = err, FAILED, None
                q.cv.notify_all()
            del transferer


def _shutdown(q: _Queue, streams: list[CopyStream]) -> None:
    """Cancel what is queued, stop the threads, wait for the copies already issued."""
    _stop(q)
    for stream in streams:
        stream.synchronize()


def _stop(q: _Queue) -> None:
    with q.cv:
        q.closed = True
        for d in (q.demand, q.speculative):
            for t in d:
                t.state, t.prev = CANCELLED, None
            d.clear()
        q.cv.notify_all()


def open_binary(path: str | os.PathLike) -> int:
    """A read-only descriptor of ``path`` (not inherited; binary mode on Windows, which
    otherwise translates CRLF and Ctrl-Z)."""
    return os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))


def read_fully(fd: int, target: memoryview, offset: int, lock: threading.Lock) -> int:
    """Fill ``target`` from byte ``offset`` of ``fd`` (positioned reads, safe across threads;
    seek and read under ``lock`` where the OS has none); returns the bytes read, fewer than
    ``len(target)`` only at the end of the file."""
    done = 0
    while done < len(target):
        n = _read_at(fd, target[done:], offset + done, lock)
        if n == 0:
            break
        done += n
    return done


def _read_at(fd: int, target: memoryview, offset: int, lock: threading.Lock) -> int:
    """Read into ``target`` from byte ``offset`` of ``fd``; returns bytes read."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [target], offset)
    if hasattr(os, "pread"):  # platforms without preadv: one extra copy
        data = os.pread(fd, len(target), offset)
        target[: len(data)] = data
        return len(data)
    with lock:  # no positioned read (Windows): seek and read, one thread at a time
        os.lseek(fd, offset, os.SEEK_SET)
        data = os.read(fd, len(target))
    target[: len(data)] = data
    return len(data)


__all__ = ["SlotPool", "HostTier", "BlockSource", "FileTier", "MappedFileTier", "MemoryTier", "Ticket", "Transferer",
           "SPECULATIVE_DEPTH"]
