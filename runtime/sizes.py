"""Byte sizes as users write them (``512MiB``, ``1.5GiB``, ``2GB``, ``25%``) and as we print them."""

from __future__ import annotations

import logging
import re

from edge_prism.errors import ConfigError

logger = logging.getLogger(__name__)

# Binary units are what memory is sold in; decimal units are accepted because disks and
# vendors quote them, and a user who types "2GB" means 2 * 10**9, not 2 GiB.
_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}

_SIZE_RE = re.compile(r"^(?P<num>\d+(?:\.\d*)?|\.\d+)(?P<unit>[a-z]*|%)$")


def parse_size(text: str | int, *, total: int | None = None, what: str = "size") -> int:
    """Parse a byte count: ``123``, ``64KiB``, ``512MiB``, ``1.5GiB``, ``2GB`` or ``25%``.

    Units are case-insensitive and spaces are ignored. ``GiB`` and friends are binary,
    ``GB`` and friends decimal. A percentage is of ``total`` (for example the device's
    free memory) and needs it. ``what`` names the option in the error message.
    Fractions of a byte are rounded down.
    """
    if isinstance(text, bool):  # bool is an int subclass; True bytes is a typo, not a size
        raise _invalid(what, text)
    if isinstance(text, int):
        if text < 0:
            raise _invalid(what, text)
        return text
    if not isinstance(text, str):
        raise _invalid(what, text)

    compact = "".join(text.split()).lower()
    match = _SIZE_RE.match(compact)
    if match is None:
        raise _invalid(what, text)
    number = float(match["num"])
    unit = match["unit"] or "b"

    if unit == "%":
        if total is None:
            raise ConfigError(
                f"invalid {what} '{text}': a percentage needs something to be a percentage of here; "
                "use a byte count such as 512MiB or 1.5GiB"
            )
        if number > 100:
            raise ConfigError(f"invalid {what} '{text}': a percentage must be at most 100%")
        return int(total * number / 100)

    factor = _UNITS.get(unit)
    if factor is None:
        raise _invalid(what, text)
    return int(number * factor)


def format_size(n: int) -> str:
    """Format a byte count for people: ``96 B``, ``64.0 KiB``, ``512.0 MiB``, ``1.50 GiB``."""
    sign = "-" if n < 0 else ""
    size = abs(n)
    if size < 2**10:
        return f"{sign}{size} B"
    if size < 2**20:
        return f"{sign}{size / 2**10:.1f} KiB"
    if size < 2**30:
        return f"{sign}{size / 2**20:.1f} MiB"
    if size < 2**40:
        return f"{sign}{size / 2**30:.2f} GiB"
    return f"{sign}{size / 2**40:.2f} TiB"


def _invalid(what: str, text: object) -> ConfigError:
    return ConfigError(f"invalid {what} '{text}': use a byte count, 512MiB, 1.5GiB or 25%")
