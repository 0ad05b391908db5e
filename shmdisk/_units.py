"""Sizes as people type them and as the command line prints them.

Sizes on the command line are whole sectors (``65536``) or byte counts with a binary unit
(``64M``, ``64MiB``, ``64MB``, ``1.5G``, ``4096B``). Units are powers of 1024 whichever spelling is
used, as in ``lsblk``, ``qemu-img`` and ``truncate``: nobody sizes a disk in powers of 1000.
"""

from __future__ import annotations

import re

__all__ = [
    "UNITS",
    "format_bytes",
    "format_bytes_long",
    "parse_bytes",
    "parse_size",
]

UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50, "E": 1 << 60}

_SIZE_RE = re.compile(
    r"""^\s*
        (?P<number>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)
        \s*
        (?P<unit>[KMGTPE]?)(?P<suffix>I?B)?
        \s*$""",
    re.IGNORECASE | re.VERBOSE,
)


def parse_bytes(text: str) -> tuple[int, bool]:
    """Parse ``text`` into ``(value, has_unit)``.

    ``has_unit`` is false for a bare integer (which callers read as sectors) and true when a unit
    or a ``B`` suffix made the value a byte count. Raises ``ValueError`` with a message fit for the
    user on anything else, including a fraction that does not come out as whole bytes.
    """
    match = _SIZE_RE.match(text)
    if match is None:
        raise ValueError(f"invalid size {text!r} (examples: 65536, 64M, 1.5GiB, 4096B)")
    number, unit, suffix = match.group("number", "unit", "suffix")
    unit = unit.upper()
    if suffix is not None and suffix.upper() == "IB" and not unit:
        raise ValueError(f"invalid size {text!r}: 'iB' needs a unit such as KiB or MiB")
    has_unit = bool(unit) or suffix is not None
    if not has_unit:
        if "." in number:
            raise ValueError(f"invalid size {text!r}: a sector count must be a whole number")
        return int(number), False
    # Exact arithmetic: 1.5G must be 1610612736 bytes, not whatever a float rounds it to.
    whole, _, frac = number.partition(".")
    scale = UNITS[unit]
    numerator = int(whole or "0") * 10 ** len(frac) + int(frac or "0")
    value, remainder = divmod(numerator * scale, 10 ** len(frac))
    if remainder:
        raise ValueError(f"invalid size {text!r}: not a whole number of bytes")
    return value, True


def parse_size(text: str, sector_size: int) -> int:
    """Parse a disk size into sectors: a bare integer is sectors, anything with a unit is bytes.

    A byte count must be a whole number of sectors; the error says which sizes would work.
    """
    value, has_unit = parse_bytes(text)
    if not has_unit:
        return value
    sectors, remainder = divmod(value, sector_size)
    if remainder:
        lower = sectors * sector_size
        raise ValueError(
            f"size {text!r} ({value} bytes) is not a whole number of {sector_size}-byte sectors"
            f" (nearest: {lower} or {lower + sector_size} bytes)"
        )
    return sectors


def format_bytes(n: int) -> str:
    """Compact size as ``lsblk`` prints it: ``512B``, ``4K``, ``1.5G``, ``64M``."""
    if n < 1024:
        return f"{n}B"
    value = float(n)
    for unit in "KMGTPE":
        value /= 1024
        # Judged as printed: 1048575 bytes is "1M", not "1024K".
        if round(value, 1) < 1024 or unit == "E":
            break
    # One decimal place at most, and none when it would be ".0": "64M", not "64.0M".
    text = f"{value:.1f}"
    if text.endswith(".0"):
        text = text[:-2]
    if len(text) > 4 and "." in text:
        text = text.split(".")[0]
    return text + unit


def format_bytes_long(n: int) -> str:
    """Size for prose: ``512 bytes``, ``64 MiB``, ``1.5 GiB``."""
    if n < 1024:
        return f"{n} byte" + ("" if n == 1 else "s")
    compact = format_bytes(n)
    return f"{compact[:-1]} {compact[-1]}iB"
