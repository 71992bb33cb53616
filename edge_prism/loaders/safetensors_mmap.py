"""Memory-mapped safetensors files: tensors are views on the mapping, never read whole.

The safetensors header is parsed here (8-byte little-endian length, then JSON) so that
every tensor's byte range is checked against the file size before any data is touched:
a truncated or corrupt file fails at open with a message naming it.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import torch

from edge_prism.errors import CorruptCheckpointError, EdgePrismError, FileAccessError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100 * 1024 * 1024


_REDOWNLOAD = "the file is truncated or corrupt, download or convert it again"


def _corrupt(path: Path, why: str, fix: str = _REDOWNLOAD) -> CorruptCheckpointError:
    return CorruptCheckpointError(f"{path}: {why}; {fix}")


def unreadable(path: Path, error: OSError) -> EdgePrismError:
    """The error for a file that exists but cannot be opened: a permission, a directory where
    a file belongs, an I/O error. The file itself is not known to be damaged."""
    if isinstance(error, PermissionError):
        return FileAccessError(f"{path}: cannot read it (permission denied); make it readable "
                               f"(chmod a+r {path}) or run as a user who can read it")
    if isinstance(error, IsADirectoryError):
        return CorruptCheckpointError(f"{path}: is a directory, not a file; put the real file there")
    return FileAccessError(f"{path}: cannot read it ({error.strerror or error}); check the disk and "
                           "the file's permissions")


class SafetensorsFile:
    """One safetensors file, mapped read-only (copy-on-write, so views are writable tensors).

    ``fix`` ends the message when the file is damaged (what to do about it).
    """

    def __init__(self, path: Path, *, fix: str = _REDOWNLOAD):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                size = f.seek(0, 2)
                if size < 8:
                    raise _corrupt(self.path, f"only {size} bytes", fix)
                f.seek(0)
                (hlen,) = struct.unpack("<Q", f.read(8))
                if hlen > min(size - 8, _MAX_HEADER):
                    raise _corrupt(self.path, f"header length {hlen} exceeds the file", fix)
                header = json.loads(f.read(hlen))
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size > 8 + hlen else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _corrupt(self.path, "unreadable header", fix) from None
        except OSError as e:
            raise unreadable(self.path, e) from None
        if not isinstance(header, dict):
            raise _corrupt(self.path, "header is not a JSON object", fix)
        self.metadata = header.pop("__metadata__", None) or {}
        self._base = 8 + hlen
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                start, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise _corrupt(self.path, f"bad header entry for tensor '{name}'", fix) from None
            numel = 1
            for s in shape:
                numel *= s
            if end - start != numel * dtype.itemsize or start < 0 or self._base + end > size:
                raise _corrupt(self.path, f"tensor '{name}' lies outside the file or has the wrong size", fix)
            self._entries[name] = (dtype, shape, start, end)

    def names(self) -> list[str]:
        """Tensor names in this file."""
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of ``name``."""
        return self._entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        """Stored dtype of ``name``."""
        return self._entries[name][0]

    def byte_range(self, name: str) -> tuple[int, int]:
        """Absolute (offset, nbytes) of ``name``'s data in the file."""
        _, _, start, end = self._entries[name]
        return self._base + start, end - start

    def get(self, name: str) -> torch.Tensor:
        """A tensor viewing the mapping (no copy)."""
        dtype, shape, start, end = self._entries[name]
        if end == start:
            return torch.empty(shape, dtype=dtype)
        flat = torch.frombuffer(self._map, dtype=dtype, count=(end - start) // dtype.itemsize,
                                offset=self._base + start)
        return flat.view(shape)


class SafetensorsSource:
    """A TensorSource over one or many safetensors files (sharded checkpoints)."""

    def __init__(self, files: list[Path], *, fix: str = _REDOWNLOAD):
        self.files = [SafetensorsFile(p, fix=fix) for p in files]
        self._where: dict[str, SafetensorsFile] = {}
        for f in self.files:
            for name in f.names():
                self._where[name] = f

    def names(self) -> list[str]:
        """All tensor names."""
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of ``name``."""
        return self._where[name].shape(name)

    def get(self, name: str) -> torch.Tensor:
        """``name`` as a view on its file's mapping."""
        return self._where[name].get(name)

    def file_of(self, name: str) -> SafetensorsFile:
        """The file holding ``name``."""
        return self._where[name]
