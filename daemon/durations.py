"""
Human durations and sizes in config files (``30s``, ``24h``, ``256MB``).

Operators write these by hand; a typo must name itself instead of becoming
a silently wrong number. The one duration parser: the config, the plugin
options, the connectors and the emulator's flags and faults all read through it.
"""

from __future__ import annotations

import math
import re

__all__ = ("parse_duration", "parse_size")

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB)?\s*$", re.IGNORECASE)
_BYTES = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    None: 1,
}


def parse_duration(value: str | float | int, *, what: str = "duration") -> float:
    """Seconds from ``30``, ``1.5``, ``500ms``, ``30s``, ``5m``, ``24h`` or ``29d``."""
    if isinstance(value, bool):
        raise ValueError(f"{what}: expected a duration like '30s', got {value!r}")
    if isinstance(value, int | float):
        if value < 0 or not math.isfinite(value):
            raise ValueError(f"{what}: must be a finite number of seconds >= 0, got {value!r}")
        return float(value)
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError(f"{what}: expected a duration like '500ms', '30s' or '24h', got {value!r}")
    return float(match.group(1)) * _SECONDS[match.group(2)]


def parse_size(value: str | int, *, what: str = "size") -> int:
    """Bytes from ``1048576``, ``200MB`` or ``256MiB``."""
    if isinstance(value, bool):
        raise ValueError(f"{what}: expected a size like '200MB', got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{what}: must not be negative, got {value!r}")
        return value
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(f"{what}: expected a size like '200MB' or '256MiB', got {value!r}")
    unit = match.group(2).lower() if match.group(2) else None
    return int(float(match.group(1)) * _BYTES[unit])
