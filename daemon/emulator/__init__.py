"""
A local Message Batches API for the demo, the tests and the benchmarks.

No machine here reaches Anthropic's API, so everything batchd does is driven
through this emulator by the real ``anthropic`` SDK over real HTTP. It
validates, times, answers and fails like the API (see docs/emulator.md).

The names below are imported on first use (PEP 562): ``batchd --help`` reads
the emulator's flags from ``emulator.cli`` without paying for aiohttp and the
emulator's server (~0.3 s), which only ``batchd emulator`` and tests need.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from batchd.daemon.emulator.config import EmulatorConfig, FaultSettings
    from batchd.daemon.emulator.runner import Emulator, EmulatorThread, run_emulator

__all__ = (
    "Emulator",
    "EmulatorConfig",
    "EmulatorThread",
    "FaultSettings",
    "run_emulator",
)

_WHERE = {
    "Emulator": "runner",
    "EmulatorConfig": "config",
    "EmulatorThread": "runner",
    "FaultSettings": "config",
    "run_emulator": "runner",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
