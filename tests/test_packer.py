"""The packer's chunk sizing after 429s at create: shrink once per episode, grow back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from batchd.daemon.config import load_config
from batchd.daemon.intake.ledger import KeyLedger
from batchd.daemon.intake.packer import _REGROW_AFTER, Packer

CONFIG = """
[[pipeline]]
name = "p"
[pipeline.source]
type = "csv"
path = "in.csv"
key = "id"
[pipeline.request]
model = "claude-haiku-4-5"
max_tokens = 8
user = "{body}"
[pipeline.batching]
max_requests = 1000
[[pipeline.sink]]
type = "jsonl"
path = "out"
"""


@pytest.fixture
def packer(tmp_path: Path) -> Packer:
    (tmp_path / "p.toml").write_text(CONFIG)
    config = load_config(tmp_path / "p.toml")

    async def nothing(*_: Any) -> None:
        return None

    return Packer(config.pipelines[0], source=None,  # type: ignore[arg-type]
                  ledger=KeyLedger(tmp_path / "k.sqlite"), spool_dir=tmp_path,
                  seal=nothing, room=nothing, resume=(None, 0, 0))


class TestChunkSizing:
    def test_shrinks_once_per_episode(self, packer: Packer) -> None:
        """A burst of 429s halves the chunk size once, not once per refusal."""
        for _ in range(10):
            packer.shrink()
        assert packer.max_requests == 500

    def test_grows_back_after_a_quiet_period(self, packer: Packer) -> None:
        """Without 429s for a while, chunks grow back to the configured size, no further."""
        packer.shrink()
        assert packer.max_requests == 500
        packer._regrow()
        assert packer.max_requests == 500  # too soon
        for _ in range(5):
            packer._shrunk_at -= _REGROW_AFTER
            packer._regrow()
        assert packer.max_requests == 1000
