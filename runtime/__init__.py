"""The memory runtime: keeps sub-experts resident in a fixed budget and streams the rest.

[HostTier: file | host RAM] -> [Transferer: demand before speculation, pinned staging,
CopyStream] -> [SlotPool] <- [ResidencyPolicy: key -> slot]

``device`` is the only module that touches ``torch.cuda`` (and holds the emulated
asynchronous device the tests run the CUDA ordering on); ``policy`` is tensor-free
bookkeeping; ``transfer`` is the mechanism that moves bytes; ``store`` ties them into the
model's ExpertStore; ``accounting`` counts every byte an engine holds before it is built;
``sizes`` parses budgets.
"""

from .accounting import MemoryReport
from .device import (
    ComputeMark,
    CopyHandle,
    CopyStream,
    DeviceBuffer,
    EmulatedDevice,
    default_dtype,
    emulate,
    free_memory_bytes,
    gpu_info,
    host_available_bytes,
    host_buffer,
    measure_h2d_bandwidth,
    pin,
    resolve_device,
    synchronize,
)
from .policy import POLICIES, ResidencyPolicy
from .sizes import format_size, parse_size
from .transfer import BlockSource, FileTier, HostTier, MemoryTier, SlotPool, Ticket, Transferer

__all__ = [
    "BlockSource",
    "ComputeMark",
    "CopyHandle",
    "CopyStream",
    "DeviceBuffer",
    "EmulatedDevice",
    "FileTier",
    "HostTier",
    "MemoryReport",
    "MemoryTier",
    "POLICIES",
    "ResidencyPolicy",
    "SlotPool",
    "Ticket",
    "Transferer",
    "default_dtype",
    "emulate",
    "format_size",
    "free_memory_bytes",
    "gpu_info",
    "host_available_bytes",
    "host_buffer",
    "measure_h2d_bandwidth",
    "parse_size",
    "pin",
    "resolve_device",
    "synchronize",
]
