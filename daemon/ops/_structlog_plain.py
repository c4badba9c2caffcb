"""
Import structlog without its rich integration (imported for this side effect).

``import structlog`` looks for ``rich`` and, when it is installed (batchd uses it
to draw ``status`` and ``estimate``), builds rich traceback and pretty-printing
support at import: ~5 MB and ~0.1 s in every batchd process, for a feature batchd
does not use (``format_exc_info`` renders exceptions as text before the console
renderer sees them; with rich, that renderer then warned about it). Hiding
``rich`` while structlog is first imported leaves structlog on its plain
tracebacks; ``rich`` itself imports normally afterwards. The CLI imports this
module once the arguments are parsed, before a command that logs (``batchd status``
does not) imports anything that uses structlog.
"""

from __future__ import annotations

import sys

__all__ = ()

if "structlog" not in sys.modules:
    # Hidden even when rich is already imported (``batchd status`` draws with it before a
    # rare log line imports structlog through daemon/ops/lazy_log.py).
    _rich = sys.modules.get("rich")
    sys.modules["rich"] = None  # type: ignore[assignment]
    try:
        import structlog  # noqa: F401
    finally:
        if _rich is None:
            del sys.modules["rich"]
        else:
            sys.modules["rich"] = _rich
