"""Where edge-prism keeps what it builds: the cache root (no torch, no other module of the package)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """Where built prism checkpoints and measured profiles are kept: $EDGE_PRISM_CACHE, else
    $XDG_CACHE_HOME/edge-prism, else ~/.cache/edge-prism."""
    return Path(os.environ.get("EDGE_PRISM_CACHE") or
                Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edge-prism")
