"""
The dashboard's smallest pieces, shared by its sections: escaped and redacted text,
and an age a person reads at a glance.
"""

from __future__ import annotations

import html
from typing import Any

from batchd.daemon.ops._logging import redact_text

__all__ = ("age", "escape")


def escape(value: Any) -> str:
    """Escaped and redacted text for HTML."""
    return html.escape(redact_text(str(value)), quote=True)


def age(seconds: float | None) -> str:
    """``42s``, ``12m`` or ``1.5h``; ``-`` when unknown."""
    if seconds is None:
        return "-"
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"
