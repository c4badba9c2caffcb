"""
A local Message Batches API for the demo, the tests and the benchmarks.

No machine here reaches Anthropic's API, so everything batchd does is driven
through this emulator by the real ``anthropic`` SDK over real HTTP. It
validates, times, answers and fails like the API (see docs/emulator.md).
"""

from batchd.daemon.emulator.config import EmulatorConfig, FaultSettings
from batchd.daemon.emulator.runner import Emulator, EmulatorThread, run_emulator

__all__ = (
    "Emulator",
    "EmulatorConfig",
    "EmulatorThread",
    "FaultSettings",
    "run_emulator",
)
