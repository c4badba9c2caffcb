"""
The emulator as one object: store, faults, responder and HTTP counters.

The aiohttp handlers, the admin endpoints and the in-process `Emulator`
handle all go through this object, so a test that turns a knob through Python
and one that turns it over HTTP reach the same state.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from batchd.daemon.emulator.config import EmulatorConfig, FaultSettings
from batchd.daemon.emulator.faults import FaultInjector
from batchd.daemon.emulator.responder import Responder
from batchd.daemon.emulator.rules import load_rules
from batchd.daemon.emulator.store import Store
from batchd.daemon.emulator.tiers import RpmWindow
from batchd.daemon.models.catalog import load_catalog

__all__ = ("EmulatorService",)


class EmulatorService:
    """Everything one running emulator knows."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        rules, default = load_rules(config.rules)
        self._own_dir = config.state_dir is None
        if config.state_dir is None:
            self.state_dir = Path(tempfile.mkdtemp(prefix="batchd-emulator-"))
        else:
            self.state_dir = Path(config.state_dir)
            self.state_dir.mkdir(parents=True, exist_ok=True)
        self.catalog = load_catalog(*config.models)
        self.faults = FaultInjector(config.initial_faults(), config.seed)
        responder = Responder(rules, default, self.catalog)
        self.store = Store(config, self.state_dir, responder, self.faults)
        self.http_requests: Counter[str] = Counter()
        self.http_errors: Counter[str] = Counter()
        self.api_versions: Counter[str] = Counter()
        self.auth_schemes: Counter[str] = Counter()
        self.rpm = RpmWindow()

    def count_client(self, version: str, auth_scheme: str) -> None:
        """Record which API version and key header a /v1 call used."""
        self.api_versions[version] += 1
        self.auth_schemes[auth_scheme] += 1

    def count_http_error(self, status: int, code_or_type: str) -> None:
        """Record a /v1 error answer as ``"<status>:<error_code or type>"``."""
        self.http_errors[f"{status}:{code_or_type}"] += 1

    def stats(self) -> dict[str, Any]:
        """What was received and injected: the tests' proof that nothing was sent twice."""
        stats = self.store.stats()
        stats["http_requests"] = dict(self.http_requests)
        stats["http_errors"] = dict(self.http_errors)
        stats["api_versions"] = dict(self.api_versions)
        stats["auth_schemes"] = dict(self.auth_schemes)
        return stats

    def set_faults(self, **values: Any) -> dict[str, Any]:
        """
        Change some fault settings (the others keep their values) and return them all.

        Raises:
            ValueError: naming the setting at fault; nothing changes then.
        """
        self.faults.replace(FaultSettings.from_mapping(values, base=self.faults.settings))
        return self.faults.settings.as_dict()

    def get_faults(self) -> dict[str, Any]:
        return self.faults.settings.as_dict()

    def advance_clock(self, seconds: float) -> float:
        """Move the virtual clock forward; returns the total offset."""
        if seconds < 0:
            raise ValueError(f"advance_seconds must be >= 0, got {seconds}")
        self.store.clock_offset += seconds
        return self.store.clock_offset

    async def reset(self) -> None:
        """Forget every batch, counter, fault change and clock offset."""
        await self.store.reset()
        self.http_requests.clear()
        self.http_errors.clear()
        self.api_versions.clear()
        self.auth_schemes.clear()
        self.rpm.clear()
        self.faults.injected.clear()
        self.faults = FaultInjector(self.config.initial_faults(), self.config.seed)
        self.store.faults = self.faults

    async def close(self) -> None:
        """Wait for background jobs and remove a temporary state dir."""
        await self.store.close()
        if self._own_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)
