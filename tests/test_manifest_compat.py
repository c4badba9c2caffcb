"""Manifests written by an earlier release replay to the same state, whatever the code became."""

from __future__ import annotations

import dataclasses
import enum
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from batchd.daemon.wal.manifest import replay

DATA = Path(__file__).parent / "data" / "manifests"


def _plain(value: Any) -> Any:
    """The replayed state as JSON data, in a form independent of the classes that hold it."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, set | frozenset):
        return sorted((_plain(v) for v in value), key=repr)
    if isinstance(value, list | tuple) or (
        hasattr(value, "__iter__") and not isinstance(value, str | bytes)
    ):
        return [_plain(v) for v in value]
    return value


@pytest.mark.parametrize("name", ["release-0.1-demo", "release-0.1-paused"])
def test_a_release_manifest_replays_to_the_state_it_had(tmp_path: Path, name: str) -> None:
    """The demo's manifest (retries, dead letters) and a paused-then-resumed one, as written."""
    manifest = tmp_path / "manifest.jsonl"
    shutil.copy(DATA / f"{name}.jsonl", manifest)
    state, _ = replay(manifest, truncate=False)
    expected = json.loads((DATA / f"{name}.state.json").read_text())
    assert json.loads(json.dumps(_plain(state), sort_keys=True, default=str)) == expected
