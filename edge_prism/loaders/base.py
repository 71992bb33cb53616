"""What every loader returns: an HF-style config, lazily readable tensors, a tokenizer."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from edge_prism.tokenizer import Tokenizer


class TensorSource(Protocol):
    """Named tensors of a checkpoint, read on demand (memory-mapped where the format allows).

    Names follow the Hugging Face convention of the family
    (``model.layers.0.mlp.experts.3.gate_proj.weight``).
    """

    def names(self) -> list[str]:
        """All tensor names."""
        ...

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of ``name`` without reading its data."""
        ...

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name`` as a floating-point tensor on the CPU (may view an mmap)."""
        ...


@dataclass
class RawCheckpoint:
    """A loaded-but-not-built checkpoint: what a loader hands to the family table."""

    path: Path
    config: dict
    tensors: TensorSource
    tokenizer: "Tokenizer | None"
    files: list[Path] = field(default_factory=list)
