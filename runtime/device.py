"""Everything that touches ``torch.cuda``: device choice, memory queries, pinned memory,
the copy stream and its events.

The rest of the package asks this module and never calls ``torch.cuda`` itself, so the
CPU backend and the CUDA backend differ in one place. On a CPU device every class here
is a synchronous stand-in with the same API.
"""

from __future__ import annotations

import logging
import statistics
import time
from typing import Iterable

import psutil
import torch

from edge_prism.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "resolve_device",
    "default_dtype",
    "free_memory_bytes",
    "host_available_bytes",
    "gpu_info",
    "pin",
    "pinned_empty",
    "is_pinned",
    "synchronize",
    "CopyStream",
    "CopyHandle",
    "ComputeMark",
    "measure_h2d_bandwidth",
]


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


def default_dtype(device: torch.device) -> torch.dtype:
    """The compute dtype to use on ``device`` when the user gives none.

    float32 on the CPU (CPU half-precision matmuls are slow and less exact); bfloat16 on
    GPUs that run it natively (compute capability 8.0 and up: Ampere, Orin, Hopper),
    else float16, since emulated bfloat16 is far slower than float16 on older GPUs.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return torch.float32
    major, _minor = torch.cuda.get_device_capability(device)
    return torch.bfloat16 if major >= 8 else torch.float16


def free_memory_bytes(device: torch.device) -> int:
    """Bytes that can still be allocated on ``device`` (the driver's view on CUDA)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return host_available_bytes()


def host_available_bytes() -> int:
    """Host RAM available to new allocations without swapping, as the OS reports it."""
    return int(psutil.virtual_memory().available)


def gpu_info() -> list[dict]:
    """NVIDIA GPUs as NVML sees them: ``index``, ``name``, ``total``, ``free`` (bytes), ``driver``.

    Returns ``[]`` when NVML cannot start (no driver, a CPU-only machine, a Jetson, whose
    driver has no NVML): callers use this for reports, and a report must not fail.
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


def pin(t: torch.Tensor) -> torch.Tensor:
    """A page-locked copy of host tensor ``t`` on machines with CUDA, ``t`` itself otherwise.

    Only page-locked memory can be copied to the GPU asynchronously. A tensor already
    pinned is returned as is, so calling this twice costs nothing.
    """
    if not torch.cuda.is_available() or t.device.type != "cpu" or t.is_pinned():
        return t
    return t.pin_memory()


def pinned_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised host tensor, page-locked on machines with CUDA (no extra copy)."""
    return torch.empty(shape, dtype=dtype, pin_memory=torch.cuda.is_available())


def is_pinned(t: torch.Tensor) -> bool:
    """Whether host tensor ``t`` is page-locked (always False without CUDA)."""
    return torch.cuda.is_available() and t.device.type == "cpu" and t.is_pinned()


def synchronize(device: torch.device) -> None:
    """Block the host until all work queued on ``device`` is done (no-op on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CopyHandle:
    """One copy issued by a :class:`CopyStream`: an event recorded after it on the copy stream.

    On the CPU the copy already happened, so the handle is always done.
    """

    __slots__ = ("event",)

    def __init__(self, event: "torch.cuda.Event | None") -> None:
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

    def __init__(self, event: "torch.cuda.Event | None") -> None:
        self.event = event

    def done(self) -> bool:
        """Whether the kernels before the mark have finished, without blocking."""
        return self.event is None or self.event.query()


class CopyStream:
    """A dedicated host-to-device copy stream, so weight copies overlap compute.

    Ordering is by events only, never by device-wide synchronisation:
    the compute stream waits on a copy's :class:`CopyHandle` before reading the slot it
    filled (:meth:`make_compute_wait`), and a copy into a slot waits on the
    :class:`ComputeMark` recorded after the last kernel that read the slot
    (``copy(..., after=marks)``), so a slot is never overwritten under a running kernel.

    On a CPU device there is no stream: :meth:`copy` copies synchronously and the rest
    are no-ops, so callers need no branches.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.stream = torch.cuda.Stream(device=self.device) if self.device.type == "cuda" else None

    def copy(
        self, dst: torch.Tensor, src: torch.Tensor, *, after: Iterable[ComputeMark] = ()
    ) -> CopyHandle:
        """Copy ``src`` into ``dst`` on the copy stream and return at once (CUDA).

        The copy first waits for the compute marks in ``after``. ``src`` must be pinned for
        the copy to be truly asynchronous, and both tensors must stay alive and unchanged
        until the handle is done. On the CPU: ``dst.copy_(src)`` now.
        """
        if self.stream is None:
            dst.copy_(src)
            return CopyHandle(None)
        with torch.cuda.stream(self.stream):
            for mark in after:
                if mark.event is not None:
                    self.stream.wait_event(mark.event)
            dst.copy_(src, non_blocking=True)
            # blocking=True: hosts that wait on copies (transfer workers, wait()) sleep
            # instead of spinning a core, which matters on 2-6 core edge devices.
            event = torch.cuda.Event(blocking=True)
            event.record(self.stream)
        return CopyHandle(event)

    def make_compute_wait(self, handle: CopyHandle) -> None:
        """Make the compute (current) stream wait for that copy only; the host does not block."""
        if handle.event is not None:
            torch.cuda.current_stream(self.device).wait_event(handle.event)

    # Same operation under the name the first design sketch used.
    wait_on_compute = make_compute_wait

    def record_compute_done(self) -> ComputeMark:
        """Mark the compute stream now, after launching kernels that read slots.

        A later copy into one of those slots passes the mark in ``after`` and so waits
        until the kernels finished reading.
        """
        if self.stream is None:
            return ComputeMark(None)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return ComputeMark(event)


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
