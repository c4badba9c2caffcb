"""
Option checks shared by the source and the sink.

An option table comes straight from the operator's TOML file, so every
mistake must be a :class:`batchd.ConfigError` that names the plugin, the key
and what would have been accepted; batchd adds the file and table in front.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import batchd

__all__ = ("check_keys", "positive_int", "text_option")


def check_keys(
    what: str, options: Mapping[str, Any], required: Iterable[str], optional: Iterable[str]
) -> None:
    """Refuse unknown and missing keys, listing the valid ones (typos are the usual cause)."""
    required = tuple(required)
    valid = ", ".join(sorted((*required, *optional)))
    for name in options:
        if name not in required and name not in optional:
            raise batchd.ConfigError(f"{what}: unknown option {name!r} (valid: {valid})")
    for name in required:
        if name not in options:
            raise batchd.ConfigError(f"{what}: missing required option {name!r} (valid: {valid})")


def text_option(what: str, options: Mapping[str, Any], name: str, default: str | None) -> str:
    """A non-empty string option."""
    value = options.get(name, default)
    if not isinstance(value, str) or not value:
        raise batchd.ConfigError(
            f"{what}: option {name!r} must be a non-empty string, got {value!r}"
        )
    return value


def positive_int(what: str, options: Mapping[str, Any], name: str, default: int) -> int:
    """A positive integer option; TOML ``true`` is not a number here, although bool is an int."""
    value = options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise batchd.ConfigError(
            f"{what}: option {name!r} must be a positive integer, got {value!r}"
        )
    return value
