"""The memory runtime: keeps sub-experts resident in a fixed budget and streams the rest.

[HostTier: file | host RAM] -> [Transferer: pinned staging, CopyStream] -> [SlotPool] <- [ResidencyPolicy: key -> slot]

``device`` is the only module that touches ``torch.cuda``; ``policy`` is tensor-free
bookkeeping; ``transfer`` is the mechanism that moves bytes; ``sizes`` parses budgets.
"""

from .device import (
    ComputeMark,
    CopyHandle,
    CopyStream,
    default_dtype,
    free_memory_bytes,
    gpu_info,
    host_available_bytes,
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
    "FileTier",
    "HostTier",
    "MemoryTier",
    "POLICIES",
    "ResidencyPolicy",
    "SlotPool",
    "Ticket",
    "Transferer",
    "default_dtype",
    "format_size",
    "free_memory_bytes",
    "gpu_info",
    "host_available_bytes",
    "measure_h2d_bandwidth",
    "parse_size",
    "pin",
    "resolve_device",
    "synchronize",
]
