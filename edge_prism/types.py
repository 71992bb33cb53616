"""Small typed keys shared by the refactoring engine, the runtime, the prefetcher and the files."""

from __future__ import annotations

from typing import NamedTuple


class SubExpertId(NamedTuple):
    """One sub-expert: a fixed group of one expert's intermediate neurons.

    ``layer`` counts decoder layers from 0, ``expert`` the experts of that layer's FFN
    (a dense FFN is expert 0), ``part`` the sub-experts of that expert, hottest first
    in a prism checkpoint.
    """

    layer: int
    expert: int
    part: int
