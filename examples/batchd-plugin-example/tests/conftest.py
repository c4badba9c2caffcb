"""Async tests run on asyncio through anyio's pytest plugin, as batchd itself does."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    """The event loop batchd runs on."""
    return "asyncio"
