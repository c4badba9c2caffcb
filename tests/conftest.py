"""
Shared test set-up.

Installed third-party plugins stay out of the tests (``BATCHD_LOAD_PLUGINS``
set but empty loads none of them); the built-ins always load. Fixtures live
in ``tests/fixtures/`` by area so each owner edits only their own module.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("BATCHD_LOAD_PLUGINS", "")


@pytest.fixture
def anyio_backend() -> str:
    """Async tests run on asyncio: asyncpg, aiokafka and aiohttp need it."""
    return "asyncio"

pytest_plugins = (
    "tests.fixtures.emulator",
    "tests.fixtures.old_sdk",
    "tests.fixtures.postgres",
    "tests.fixtures.kafka",
    "tests.fixtures.engine",
    "tests.fixtures.pg_e2e",
    "tests.fixtures.service",
    "tests.fixtures.cluster",
    "tests.fixtures.cluster_workers",
    "tests.fixtures.tcp_proxy",
)
