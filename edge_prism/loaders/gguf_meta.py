"""Typed access to a GGUF file's metadata, shared by the GGUF loader and the tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edge_prism.errors import CorruptCheckpointError


class GgufMeta:
    """Metadata fields of a ``gguf.GGUFReader`` as Python values; errors name file and key."""

    def __init__(self, reader, path: Path) -> None:
        self._fields = reader.fields
        self._path = path

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key``, or ``default`` when the file does not have it."""
        field = self._fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except (ValueError, IndexError, UnicodeDecodeError) as exc:
            raise CorruptCheckpointError(
                f"{self._path}: GGUF metadata {key!r} is damaged ({exc}); re-download or re-convert the file"
            ) from exc

    def require(self, key: str) -> Any:
        """The value of ``key``; a clear error when it is missing."""
        value = self.get(key)
        if value is None:
            raise CorruptCheckpointError(
                f"{self._path}: required GGUF metadata {key!r} is missing; re-convert the model with llama.cpp"
            )
        return value
