"""Everything that touches ``torch.cuda``: device choice, memory queries, pinned memory,
copy streams, events and device buffers.

The rest of the package asks this module and never calls ``torch.cuda`` itself, so the
backends differ in one place. Three kinds of device run the same runtime code:

- ``cuda``: copy streams, events, page-locked host memory;
- ``cpu``: synchronous stand-ins with the same API (a copy has landed when it returns);
- ``emulated`` (tests): the CUDA ordering on the CPU. Inside :func:`emulate`, a CPU device
  is asynchronous: copies run later on a copy-engine thread with an injectable latency and
  bandwidth, events complete when the work before them has run, "device" buffers come from
  an arena that hands freed memory to the next allocation at once (as the caching
  allocator does) unless a copy stream's use was recorded. Kernels run on the host, so
  the host is the compute stream: waiting for a copy blocks it.

Ordering rules the runtime keeps, whatever the device (tested with adversarial delays on
the emulated device): no read of a slot before its copy's event; no copy into a slot
before the last reader's mark; demand copies never queue behind speculative ones; no
device buffer is freed while a copy into it may still run.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import random
import statistics
import threading
import time
import weakref
from collections import deque
from typing import Callable, Iterable, Iterator

import psutil
import torch

from edge_prism.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "resolve_device",
    "default_dtype",
    "check_compute_dtype",
    "compute_capability",
    "is_integrated",
    "is_async",
    "shares_host_memory",
    "device_name",
    "free_memory_bytes",
    "host_available_bytes",
    "default_workers",
    "gpu_info",
    "pin",
    "pinned_empty",
    "host_buffer",
    "is_pinned",
    "synchronize",
    "compute_sync",
    "new_event",
    "DeviceBuffer",
    "CopyStream",
    "CopyHandle",
    "ComputeMark",
    "HostCopy",
    "to_device_async",
    "EmulatedDevice",
    "emulate",
    "measure_h2d_bandwidth",
]

# Stream priorities (lower is more urgent): demand copies go first where the device
# schedules by priority; the transferer also holds speculation back on the host.
DEMAND_PRIORITY = -1
SPECULATIVE_PRIORITY = 0


def resolve_device(name: str) -> torch.device:
    """Turn a ``--device`` value into a device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    ``auto`` picks the current CUDA device when there is one, else the CPU. ``cuda`` is
    resolved to an explicit index so that devices compare equal later.
    """
    value = name.strip().lower() if isinstance(name, str) else name
    if value == "auto":
        return _current_cuda() if torch.cuda.is_available() else torch.device("cpu")
    if value == "cpu":
        return torch.device("cpu")
    index_text = value.removeprefix("cuda:") if isinstance(value, str) and value.startswith("cuda:") else None
    if value != "cuda" and not (index_text and index_text.isascii() and index_text.isdigit()):
        raise ConfigError(f"invalid device '{name}': use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"device '{name}' was requested but CUDA is not available here "
            "(no NVIDIA driver, or a CPU-only torch build); use --device cpu"
        )
    if index_text is None:
        return _current_cuda()
    index = int(index_text)
    count = torch.cuda.device_count()
    if index >= count:
        raise ConfigError(
            f"device '{name}' does not exist: this machine has {count} CUDA device(s), "
            f"cuda:0 to cuda:{count - 1}"
        )
    return torch.device("cuda", index)


def compute_capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) of a CUDA device (the emulated one's when emulating); None on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return tuple(torch.cuda.get_device_capability(device))  # type: ignore[return-value]
    emu = _emulated_for(device)
    return emu.capability if emu is not None else None


def default_dtype(device: torch.device) -> torch.dtype:
    """The compute dtype to use on ``device`` when the user gives none.

    float32 on the CPU (CPU half-precision matmuls are slow and less exact); bfloat16 on
    GPUs that run it natively (compute capability 8.0 and up: Ampere, Orin, Hopper),
    else float16 (the model then keeps its residual stream in float32; see
    ``model.Transformer``), since emulated bfloat16 is far slower than float16 on older GPUs.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return torch.float32
    major, _minor = torch.cuda.get_device_capability(device)
    return torch.bfloat16 if major >= 8 else torch.float16


def check_compute_dtype(device: torch.device, dtype: torch.dtype) -> None:
    """Refuse a compute dtype the device cannot run natively (bfloat16 below SM 8.0)."""
    cap = compute_capability(device)
    if dtype == torch.bfloat16 and cap is not None and cap[0] < 8:
        raise ConfigError(f"--dtype bfloat16 needs compute capability 8.0 or newer, but {device} is "
                          f"{cap[0]}.{cap[1]}; use --dtype float16 (the default there) or float32")


def is_integrated(device: torch.device) -> bool:
    """Whether ``device`` shares its memory with the host (a Jetson's iGPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.get_device_properties(device).is_integrated)
    emu = _emulated_for(device)
    return emu is not None and emu.integrated


def shares_host_memory(device: torch.device) -> bool:
    """Whether ``device``'s memory is the host's (the CPU itself, an integrated GPU)."""
    device = torch.device(device)
    if device.type == "cuda" or _emulated_for(device) is not None:
        return is_integrated(device)
    return True


def is_async(device: torch.device) -> bool:
    """Whether copies to ``device`` complete after they are issued (CUDA, emulated)."""
    device = torch.device(device)
    return device.type == "cuda" or _emulated_for(device) is not None


def device_name(device: torch.device) -> str:
    """A stable name of the physical device, for caches keyed by device.

    CUDA: the CUDA runtime's name of this ordinal plus its UUID where torch reports one
    (NVML's device order is not the CUDA ordinal, and a Jetson has no NVML). CPU: the CPU
    model and its core count.
    """
    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        uuid = getattr(props, "uuid", None)
        return f"{props.name}-{uuid}" if uuid else props.name
    emu = _emulated_for(device)
    if emu is not None:
        return emu.name
    name = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import platform

    return f"cpu-{name or platform.processor() or platform.machine()}-{os.cpu_count()}c"


def free_memory_bytes(device: torch.device) -> int:
    """Bytes that can still be allocated on ``device``.

    Discrete GPUs: the driver's view. Integrated GPUs (Tegra): the larger of the driver's
    view and the host's available memory, since ``cudaMemGetInfo`` there leaves out page
    cache the kernel would reclaim. CPU: host RAM available.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        if is_integrated(device):
            return max(int(free), host_available_bytes())
        return int(free)
    emu = _emulated_for(device)
    if emu is not None and emu.free_memory is not None:
        return emu.free_memory
    return host_available_bytes()


def host_available_bytes() -> int:
    """Host RAM available to new allocations without swapping, as the OS reports it."""
    return int(psutil.virtual_memory().available)


def default_workers(device: torch.device) -> int:
    """Transfer worker threads for ``device``, sized to the machine.

    On the CPU the workers read into slots on the same cores torch computes on, so they get
    what torch's threads leave (at least one): on 2 cores running 2 torch threads, one
    worker, not the three threads that made budgeted decode collapse under contention.
    A GPU computes elsewhere, so up to half the cores read and issue copies.
    """
    cores = os.cpu_count() or 1
    if is_async(device) and torch.device(device).type == "cuda":
        return max(1, min(4, cores // 2))
    return max(1, min(4, cores - torch.get_num_threads()))


def init_helper_thread() -> None:
    """Call first in every thread of ours that runs torch ops (transfer workers, emulators).

    A thread that enters an OpenMP parallel region gets a thread team of its own; once the
    process has more OpenMP threads than cores, libgomp stops spinning between regions, and
    every kernel of the compute thread then waits for its team to wake: decode on 2 cores
    measured 17 -> 56 ms per token after one parallel copy in a second thread. One thread
    here keeps this thread out of OpenMP; torch's setting is per thread, the compute
    thread keeps its own.
    """
    torch.set_num_threads(1)


def gpu_info() -> list[dict]:
    """NVIDIA GPUs as NVML sees them: ``index``, ``name``, ``total``, ``free`` (bytes), ``driver``.

    Returns ``[]`` when NVML cannot start (no driver, a CPU-only machine, a Jetson, whose
    driver has no NVML): callers use this for reports, and a report must not fail.
    NVML's ``index`` is not the CUDA ordinal; use :func:`device_name` for a CUDA device.
    """
    try:
        import pynvml
    except ImportError:
        logger.debug("pynvml is not installed; reporting no GPUs")
        return []
    try:
        pynvml.nvmlInit()
    except (pynvml.NVMLError, OSError) as err:
        logger.debug("NVML unavailable (%s); reporting no GPUs", err)
        return []
    gpus: list[dict] = []
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(
                {
                    "index": index,
                    "name": _text(pynvml.nvmlDeviceGetName(handle)),
                    "total": int(memory.total),
                    "free": int(memory.free),
                    "driver": driver,
                }
            )
    except pynvml.NVMLError as err:
        logger.warning("NVML query failed part way (%s); reporting %d GPU(s)", err, len(gpus))
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError:
            pass
    return gpus


# -- host memory ---------------------------------------------------------------------------
def pin(t: torch.Tensor) -> torch.Tensor:
    """A page-locked copy of host tensor ``t`` on machines with CUDA, ``t`` itself otherwise.

    Only page-locked memory can be copied to the GPU asynchronously. A tensor already
    pinned is returned as is. The copy comes from torch's caching host allocator, which
    rounds sizes up to a power of two: for large buffers use :func:`host_buffer`.
    """
    if not torch.cuda.is_available() or t.device.type != "cpu" or t.is_pinned():
        return t
    return t.pin_memory()


def pinned_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised small host tensor, page-locked on machines with CUDA (staging buffers).

    From torch's caching host allocator: it records the streams of asynchronous copies out
    of it, so the memory is never reused under a running copy.
    """
    return torch.empty(shape, dtype=dtype, pin_memory=torch.cuda.is_available())


def host_buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised host tensor of exactly ``shape`` for copies to ``device``.

    On CUDA it is ordinary memory registered with ``cudaHostRegister`` (page-locked in
    place, exact size, unregistered when the tensor is freed), so a host tier of N bytes
    costs N bytes at its peak: reading into pageable memory and then pinning a copy costs
    two copies, and the caching host allocator rounds a pinned allocation up to a power of
    two (up to 3x the bytes in all). Callers fill it in place. Elsewhere: plain memory.
    The caller keeps the tensor alive until copies out of it have completed.
    """
    t = torch.empty(shape, dtype=dtype)
    if torch.device(device).type != "cuda" or t.numel() == 0:
        return t
    cudart = torch.cuda.cudart()
    nbytes = t.numel() * t.element_size()
    err = cudart.cudaHostRegister(t.data_ptr(), nbytes, 0)
    if int(err) != 0:
        logger.warning("cudaHostRegister of %d bytes failed (error %d): copies from this host tier "
                       "will not overlap compute", nbytes, int(err))
        return t
    weakref.finalize(t, cudart.cudaHostUnregister, t.data_ptr())
    return t


def is_pinned(t: torch.Tensor) -> bool:
    """Whether host tensor ``t`` is page-locked (always False without CUDA)."""
    return torch.cuda.is_available() and t.device.type == "cpu" and t.is_pinned()


def synchronize(device: torch.device) -> None:
    """Block the host until all work queued on ``device`` is done, copy streams included."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return
    emu = _emulated_for(device)
    if emu is not None:
        emu.synchronize()


def compute_sync(device: torch.device) -> None:
    """Block the host until the compute stream's work is done (not the copy streams: a
    speculative prefetch still running is no part of a token's latency). For timing."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


# -- events, copy streams, device buffers ----------------------------------------------------
def new_event(device: torch.device, *, timing: bool = False):
    """An event for ``device``, made once and re-recorded (None on the synchronous CPU).

    blocking=True: hosts that wait on copies sleep instead of spinning a core, which
    matters on 2-6 core edge devices.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.Event(blocking=True, enable_timing=timing)
    emu = _emulated_for(device)
    return emu.event() if emu is not None else None


class CopyHandle:
    """One copy issued by a :class:`CopyStream`: the event recorded after it.

    The event may be re-recorded by a later copy into the same slot (events are made once);
    the handle then reports the later copy, which the stream orders after this one.
    On the synchronous CPU the copy already happened, so the handle is always done.
    """

    __slots__ = ("event",)

    def __init__(self, event) -> None:
        self.event = event

    def done(self) -> bool:
        """Whether the copy has finished, without blocking."""
        return self.event is None or self.event.query()

    def wait(self) -> None:
        """Block the host until the copy has finished."""
        if self.event is not None:
            self.event.synchronize()


class ComputeMark:
    """An event on the compute stream after kernels that read slots (see :meth:`CopyStream.record_compute_done`)."""

    __slots__ = ("event",)

    def __init__(self, event) -> None:
        self.event = event

    def done(self) -> bool:
        """Whether the kernels before the mark have finished, without blocking."""
        return self.event is None or self.event.query()


class DeviceBuffer:
    """A device tensor whose memory belongs to this object: freed when it is released or
    collected. Copy streams recorded with :meth:`CopyStream.record_use` keep the memory from
    being handed to another allocation before their queued copies have run."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        device = torch.device(device)
        emu = _emulated_for(device)
        self.device = device
        if emu is None:
            self.tensor: torch.Tensor | None = torch.empty(shape, dtype=dtype, device=device)
        else:
            self.tensor, block = emu.allocate(shape, dtype)
            weakref.finalize(self, emu.free, block)

    def release(self) -> None:
        """Drop this object's reference to the memory (views held elsewhere stay valid on
        CUDA; the memory returns to the allocator once they are gone)."""
        self.tensor = None


class CopyStream:
    """A dedicated host-to-device copy stream, so weight copies overlap compute.

    Ordering is by events only, never by device-wide synchronisation: the compute stream
    waits on a copy's :class:`CopyHandle` before reading the slot it filled
    (:meth:`compute_wait`), and a copy into a slot waits on the :class:`ComputeMark`
    recorded after the last kernel that read the slot (``copy(..., after=marks)``) and on
    the slot's previous copy if another stream issued it (``after_copies``).

    ``priority``: :data:`DEMAND_PRIORITY` for loads the compute is waiting for. On a CPU
    device there is no stream: :meth:`copy` copies synchronously and the rest are no-ops.
    """

    def __init__(self, device: torch.device, *, priority: int = SPECULATIVE_PRIORITY) -> None:
        self.device = torch.device(device)
        self._emu = _emulated_for(self.device)
        if self.device.type == "cuda":
            self.stream = torch.cuda.Stream(device=self.device, priority=priority)
        elif self._emu is not None:
            self.stream = self._emu.stream(priority)
        else:
            self.stream = None
        self.asynchronous = self.stream is not None
        self._stall_s = 0.0
        self._open: deque = deque()  # (start, end) timing events of stalls not yet read
        self._spare: list = []  # timing event pairs to reuse

    def copy(self, dst: torch.Tensor, src: torch.Tensor, *, after: Iterable[ComputeMark] = (),
             after_copies: Iterable[CopyHandle] = (), handle: CopyHandle | None = None) -> CopyHandle:
        """Copy ``src`` into ``dst`` on this stream and return at once (asynchronous devices).

        The copy first waits for the compute marks in ``after`` and the copies in
        ``after_copies``. It records ``handle``'s event (made once, reused) or a new one.
        ``src`` must be pinned for a CUDA copy to be truly asynchronous, and both tensors
        must stay alive and unchanged until the handle is done. CPU: ``dst.copy_(src)`` now.
        """
        if self.stream is None:
            dst.copy_(src)
            return handle if handle is not None else CopyHandle(None)
        if handle is None:
            handle = CopyHandle(new_event(self.device))
        waits = [m.event for m in after if m.event is not None]
        waits += [h.event for h in after_copies if h.event is not None]
        if self._emu is not None:
            self._emu.enqueue_copy(self.stream, dst, src, waits, handle.event)
            return handle
        with torch.cuda.stream(self.stream):
            for event in waits:
                self.stream.wait_event(event)
            dst.copy_(src, non_blocking=True)
            handle.event.record(self.stream)
        return handle

    def record(self, handle: CopyHandle) -> CopyHandle:
        """Record ``handle``'s event on this stream now: done once the copies issued so far are."""
        if self.stream is None:
            return handle
        if self._emu is not None:
            self._emu.record_stream_event(self.stream, handle.event)
        else:
            handle.event.record(self.stream)
        return handle

    def compute_wait(self, handles: Iterable[CopyHandle]) -> None:
        """Make compute (the current stream) wait for ``handles``; the host does not block on
        CUDA. The time compute stalls on copies not yet done is measured on the device (a
        pair of timing events around the wait) and read by :meth:`stall_seconds`. Emulated:
        the host is the compute stream, so it blocks and the stall is its wait."""
        if self.stream is None:
            return
        pending = [h for h in handles if h.event is not None and not h.event.query()]
        if not pending:
            return  # landed already: nothing to wait for, nothing to time
        if self._emu is not None:
            start = time.perf_counter()
            for h in pending:
                h.event.synchronize()
            self._stall_s += time.perf_counter() - start
            return
        compute = torch.cuda.current_stream(self.device)
        start, end = self._timing_pair()
        start.record(compute)
        for h in pending:
            compute.wait_event(h.event)
        end.record(compute)
        self._open.append((start, end))

    def make_compute_wait(self, handle: CopyHandle) -> None:
        """Make the compute stream wait for one copy (see :meth:`compute_wait`)."""
        self.compute_wait([handle])

    def record_compute_done(self, mark: ComputeMark | None = None) -> ComputeMark:
        """Mark the compute stream now, after launching kernels that read slots.

        A later copy into one of those slots passes the mark in ``after`` and so waits
        until the kernels finished reading. ``mark``: re-record this one (made once).
        """
        if self.stream is None:
            return mark if mark is not None else ComputeMark(None)
        if mark is None:
            mark = ComputeMark(new_event(self.device))
        if self._emu is not None:
            self._emu.record_compute(mark.event)
        else:
            mark.event.record(torch.cuda.current_stream(self.device))
        return mark

    def record_use(self, t: torch.Tensor) -> None:
        """The allocator must not reuse ``t``'s memory before this stream's work queued at
        the time ``t`` is freed has run (``Tensor.record_stream``)."""
        if self.stream is None:
            return
        if self._emu is not None:
            self._emu.record_use(t, self.stream)
        else:
            t.record_stream(self.stream)

    def synchronize(self) -> None:
        """Block the host until every copy issued on this stream has run."""
        if self.stream is not None:
            self.stream.synchronize()

    def stall_seconds(self) -> float:
        """Seconds compute has waited for copies so far (resolves the timed waits: call it
        when reporting, not per token)."""
        while self._open:
            start, end = self._open.popleft()
            end.synchronize()
            self._stall_s += start.elapsed_time(end) / 1e3
            self._spare.append((start, end))
        return self._stall_s

    def reset_stall(self) -> None:
        """Zero the stall counter."""
        self.stall_seconds()
        self._stall_s = 0.0

    def _timing_pair(self):
        if self._spare:
            return self._spare.pop()
        if len(self._open) >= 64:  # read the oldest rather than make more (long finished)
            start, end = self._open.popleft()
            end.synchronize()
            self._stall_s += start.elapsed_time(end) / 1e3
            return start, end
        return new_event(self.device, timing=True), new_event(self.device, timing=True)


class HostCopy:
    """A device tensor on its way to host memory: started without blocking, read after
    :meth:`wait` (CUDA: a pinned buffer and an event on the compute stream)."""

    def __init__(self, t: torch.Tensor) -> None:
        self.event = None
        if t.device.type != "cuda":
            self.host = t
            return
        self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        self.host.copy_(t, non_blocking=True)
        self.event = torch.cuda.Event(blocking=True)
        self.event.record(torch.cuda.current_stream(t.device))

    def wait(self) -> torch.Tensor:
        """The host tensor, once the copy has landed (blocks only for this copy)."""
        if self.event is not None:
            self.event.synchronize()
        return self.host


def to_device_async(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Host tensor ``t`` on ``device`` as ``dtype``, copied from pinned memory without blocking."""
    device = torch.device(device)
    if device.type != "cuda":
        return t.to(device=device, dtype=dtype)
    staged = torch.empty(t.shape, dtype=dtype, pin_memory=True)
    staged.copy_(t)
    return staged.to(device, non_blocking=True)


# -- the emulated device (tests) ------------------------------------------------------------
class _EmuStream:
    """One emulated stream: ops run in issue order; ``issued``/``completed`` count them."""

    def __init__(self, emu: "EmulatedDevice", priority: int) -> None:
        self.emu, self.priority = emu, priority
        self.ops: deque = deque()
        self.issued = 0
        self.completed = 0

    def synchronize(self) -> None:
        self.emu._wait_for(lambda: self.completed >= self.issued)


class _EmuEvent:
    """An event of the emulated device. Recording it snapshots a condition (stream position
    or compute time); waits capture the snapshot, as ``cudaStreamWaitEvent`` does."""

    def __init__(self, emu: "EmulatedDevice") -> None:
        self.emu = emu
        self.token: tuple | None = None  # None: never recorded (done, as on CUDA)
        self.time: float | None = None  # when it completed (timing)

    def query(self) -> bool:
        return self.emu._satisfied(self.token)

    def synchronize(self) -> None:
        self.emu._wait_for(lambda: self.emu._satisfied(self.token))

    def elapsed_time(self, end: "_EmuEvent") -> float:
        return 1000.0 * ((end.time or 0.0) - (self.time or 0.0))


class _Block:
    __slots__ = ("raw", "streams", "ready", "nbytes")

    def __init__(self, raw: torch.Tensor) -> None:
        self.raw, self.streams, self.ready, self.nbytes = raw, set(), [], raw.numel()


class EmulatedDevice:
    """The CUDA code path's ordering, run on the CPU (see :func:`emulate`).

    - One copy engine (a thread) runs copies from every stream: the oldest runnable one
      first (``honour_priority=False``, what one DMA engine does with copies already
      issued), or the most urgent stream's (``True``). A copy takes
      ``latency_s + nbytes / bytes_per_s`` (+ up to ``jitter_s``, seeded).
    - Compute is the host thread: a compute mark completes ``compute_lag_s`` after it is
      recorded (a GPU running behind the host), or after work queued with :meth:`launch`.
    - Device memory comes from an arena that reuses a freed block of the same size at once,
      unless a stream's use was recorded (then once that stream's work queued at the time of
      the free has run), as the CUDA caching allocator does.
    - ``log``: (destination address, stream priority) of every copy in the order it ran.
    """

    def __init__(self, *, latency_s: float = 0.0, bytes_per_s: float | None = None, jitter_s: float = 0.0,
                 compute_lag_s: float = 0.0, honour_priority: bool = False, integrated: bool = False,
                 free_memory: int | None = None, capability: tuple[int, int] = (8, 0),
                 name: str = "emulated-gpu", seed: int = 0) -> None:
        self.latency_s, self.bytes_per_s, self.jitter_s = latency_s, bytes_per_s, jitter_s
        self.compute_lag_s, self.honour_priority = compute_lag_s, honour_priority
        self.integrated, self.free_memory, self.capability, self.name = integrated, free_memory, capability, name
        self._rng = random.Random(seed)
        self._cv = threading.Condition()
        self._streams: list[_EmuStream] = []
        self._order = itertools.count()
        self._compute = _EmuStream(self, 0)  # work queued with launch()
        self._free_blocks: dict[int, list[_Block]] = {}
        self._live: dict[int, _Block] = {}  # data_ptr -> block
        self.log: list[tuple[int, int]] = []
        self.copies = 0
        self._closed = False
        self._thread = threading.Thread(target=self._engine, name="emulated-copy-engine", daemon=True)
        self._thread.start()
        self._compute_thread = threading.Thread(target=self._compute_engine, name="emulated-compute",
                                                daemon=True)
        self._compute_thread.start()

    # -- streams and events ----------------------------------------------------------------
    def stream(self, priority: int) -> _EmuStream:
        """A new stream of the copy engine."""
        s = _EmuStream(self, priority)
        with self._cv:
            self._streams.append(s)
        return s

    def event(self) -> _EmuEvent:
        """A new event (done until recorded)."""
        return _EmuEvent(self)

    def enqueue_copy(self, stream: _EmuStream, dst: torch.Tensor, src: torch.Tensor, waits: list,
                     event: _EmuEvent | None) -> None:
        """Queue ``dst.copy_(src)`` on ``stream`` after the events ``waits`` (snapshotted now)."""
        tokens = [e.token for e in waits if e.token is not None]
        nbytes = src.numel() * src.element_size()
        with self._cv:
            stream.issued += 1
            stream.ops.append((next(self._order), tokens, dst, src, nbytes))
            if event is not None:
                event.token = ("stream", stream, stream.issued)
                event.time = None
            self._cv.notify_all()

    def record_stream_event(self, stream: _EmuStream, event: _EmuEvent) -> None:
        """Record ``event`` on ``stream`` after the copies queued there so far."""
        with self._cv:
            event.token = ("stream", stream, stream.issued)

    def record_compute(self, event: _EmuEvent) -> None:
        """Record ``event`` on the compute stream (the host)."""
        with self._cv:
            event.token = ("compute", time.perf_counter() + self.compute_lag_s, self._compute.issued)
            event.time = time.perf_counter()

    def launch(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the emulated compute stream, after ``compute_lag_s`` (a kernel that
        reads device memory later than the host issued it)."""
        with self._cv:
            self._compute.issued += 1
            self._compute.ops.append((time.perf_counter() + self.compute_lag_s, fn))
            self._cv.notify_all()

    def synchronize(self) -> None:
        """Block until every queued copy and launched function has run."""
        self._wait_for(lambda: all(s.completed >= s.issued for s in (*self._streams, self._compute)))

    def pending(self) -> int:
        """Copies queued or running."""
        with self._cv:
            return sum(s.issued - s.completed for s in self._streams)

    def close(self) -> None:
        """Stop the engine threads once the queued work has run (they are joined: a daemon
        thread still running at interpreter exit can abort the process)."""
        self.synchronize()
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        for t in (self._thread, self._compute_thread):
            if t is not threading.current_thread():
                t.join()

    # -- memory ------------------------------------------------------------------------------
    def allocate(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, _Block]:
        """"Device" memory: a freed block of the same size if no recorded stream still uses it."""
        nbytes = math.prod(shape) * dtype.itemsize
        with self._cv:
            block = None
            for i, b in enumerate(self._free_blocks.get(nbytes, [])):
                if all(self._satisfied(t) for t in b.ready):
                    block = self._free_blocks[nbytes].pop(i)
                    break
            if block is None:
                block = _Block(torch.empty(nbytes, dtype=torch.uint8))
            block.streams, block.ready = set(), []
            self._live[block.raw.data_ptr()] = block
        return block.raw.view(dtype).view(shape), block

    def free(self, block: _Block) -> None:
        """Give ``block`` back; reusable once the streams recorded on it have run what is queued now."""
        with self._cv:
            self._live.pop(block.raw.data_ptr(), None)
            block.ready = [("stream", s, s.issued) for s in block.streams]
            self._free_blocks.setdefault(block.nbytes, []).append(block)

    def record_use(self, t: torch.Tensor, stream: _EmuStream) -> None:
        """``Tensor.record_stream`` for the block holding ``t``."""
        ptr = t.data_ptr()
        with self._cv:
            for start, block in self._live.items():
                if start <= ptr < start + block.nbytes:
                    block.streams.add(stream)
                    return

    # -- internals ---------------------------------------------------------------------------
    def _satisfied(self, token: tuple | None) -> bool:
        if token is None:
            return True
        if token[0] == "stream":
            return token[1].completed >= token[2]
        return time.perf_counter() >= token[1] and self._compute.completed >= token[2]

    def _wait_for(self, predicate: Callable[[], bool]) -> None:
        with self._cv:
            while not predicate():
                self._cv.wait(timeout=0.001)

    def _next_op(self):
        heads = [s for s in self._streams if s.ops and all(self._satisfied(t) for t in s.ops[0][1])]
        if not heads:
            return None
        key = (lambda s: (s.priority, s.ops[0][0])) if self.honour_priority else (lambda s: s.ops[0][0])
        return min(heads, key=key)

    def _engine(self) -> None:
        init_helper_thread()
        while True:
            with self._cv:
                stream = self._next_op()
                while stream is None:
                    if self._closed:
                        return
                    self._cv.wait(timeout=0.001)
                    stream = self._next_op()
                _seq, _tokens, dst, src, nbytes = stream.ops[0]
                delay = self.latency_s + (nbytes / self.bytes_per_s if self.bytes_per_s else 0.0)
                delay += self._rng.uniform(0.0, self.jitter_s) if self.jitter_s else 0.0
            if delay > 0:
                time.sleep(delay)
            dst.copy_(src)
            with self._cv:
                stream.ops.popleft()
                stream.completed += 1
                self.copies += 1
                self.log.append((dst.data_ptr(), stream.priority))
                self._cv.notify_all()

    def _compute_engine(self) -> None:
        init_helper_thread()
        while True:
            with self._cv:
                while not self._compute.ops:
                    if self._closed:
                        return
                    self._cv.wait(timeout=0.001)
                due, fn = self._compute.ops[0]
            wait = due - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            fn()
            with self._cv:
                self._compute.ops.popleft()
                self._compute.completed += 1
                self._cv.notify_all()


_emulation: EmulatedDevice | None = None


def _emulated_for(device: torch.device) -> EmulatedDevice | None:
    return _emulation if _emulation is not None and torch.device(device).type == "cpu" else None


@contextlib.contextmanager
def emulate(device: EmulatedDevice | None = None, **options) -> Iterator[EmulatedDevice]:
    """Inside this block a CPU device behaves as an asynchronous GPU (tests only).

    Runtime objects made inside keep their emulated streams after the block ends; the
    block's exit waits for the queued copies. ``options``: :class:`EmulatedDevice`'s.
    """
    global _emulation
    emu = device if device is not None else EmulatedDevice(**options)
    previous, _emulation = _emulation, emu
    try:
        yield emu
    finally:
        _emulation = previous
        if device is None:
            emu.close()


def measure_h2d_bandwidth(device: torch.device, nbytes: int = 64 * 2**20, repeats: int = 5) -> float:
    """Host-to-device copy bandwidth in bytes/s, the median of ``repeats`` timed copies.

    CUDA: from pinned host memory, timed with events (the path the transferer uses).
    CPU: host memcpy bandwidth, the speed at which a sub-expert moves into a slot there.
    """
    device = torch.device(device)
    if nbytes <= 0 or repeats <= 0:
        raise ConfigError(f"bandwidth probe needs nbytes > 0 and repeats > 0, got {nbytes} and {repeats}")
    src = pinned_empty((nbytes,), torch.uint8)
    src.fill_(1)  # touch every page so the first timed copy does not pay for page faults
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=True)  # warm-up: allocator, driver paths
    synchronize(device)

    seconds: list[float] = []
    for _ in range(repeats):
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            stream = torch.cuda.current_stream(device)
            start.record(stream)
            with torch.cuda.stream(stream):
                dst.copy_(src, non_blocking=True)
            end.record(stream)
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            seconds.append(time.perf_counter() - t0)
    median = max(statistics.median(seconds), 1e-9)
    bandwidth = nbytes / median
    logger.debug("h2d bandwidth on %s: %.2f GB/s", device, bandwidth / 1e9)
    return bandwidth


def _current_cuda() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


def _text(value: str | bytes) -> str:
    # Older nvidia-ml-py releases return bytes for names and versions.
    return value.decode() if isinstance(value, bytes) else value
