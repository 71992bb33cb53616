"""edge-prism: Mixture-of-Experts language models on devices that cannot hold them.

checkpoint -> [loaders] -> [refactor: experts -> sub-experts] -> [runtime: budgeted slots +
transfers] -> [prefetch: predicted sub-experts ahead of use] -> Engine.generate / chat
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["load", "Engine", "RuntimeConfig", "SubExpertId", "__version__"]

from edge_prism.types import SubExpertId

if TYPE_CHECKING:
    from edge_prism.api import RuntimeConfig, load
    from edge_prism.engine import Engine


def __getattr__(name: str):
    # Import torch-heavy modules on first use so `edge-prism --help` starts fast.
    if name in ("load", "RuntimeConfig"):
        from edge_prism import api

        return getattr(api, name)
    if name == "Engine":
        from edge_prism.engine import Engine

        return Engine
    raise AttributeError(f"module 'edge_prism' has no attribute {name!r}")
