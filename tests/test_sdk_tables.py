"""
The SDK's request tables (daemon/emulator/sdk_tables.py) read in a child process and
cached equal the ones read from the SDK in-process, and a process that reads them through
the cache never imports the SDK (so ``batchd run`` does not carry its ~90 MB).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from batchd.daemon.emulator import sdk_tables as module
from batchd.daemon.emulator.sdk_tables import SdkTables, read_from_sdk

_PROBE = (
    "import sys\n"
    "from batchd.daemon.emulator.sdk_tables import sdk_tables\n"
    "tables = sdk_tables()\n"
    "print(sorted(tables.fields)[0], 'anthropic' in sys.modules)\n"
)


def _probe(cache: Path) -> tuple[str, str]:
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True,
                         text=True, timeout=120, check=True).stdout.split()
    return out[0], out[1]


def test_the_child_reads_what_the_sdk_says() -> None:
    in_process = read_from_sdk()
    assert module._from_child() == in_process
    assert SdkTables.from_json(in_process.to_json()) == in_process
    assert {"model", "messages", "max_tokens", "thinking"} <= in_process.fields


def test_a_process_without_the_sdk_uses_the_cache(tmp_path: Path) -> None:
    first, sdk_imported = _probe(tmp_path)
    assert sdk_imported == "False"
    cached = list((tmp_path / "batchd").glob("sdk-tables-*.json"))
    assert len(cached) == 1
    assert SdkTables.from_json(cached[0].read_bytes()) == read_from_sdk()
    # The next process reads the file (here: one whose first field is a marker).
    tables = SdkTables.from_json(cached[0].read_bytes())
    marked = SdkTables(**{**tables.__dict__, "fields": frozenset({"!marker"})})
    cached[0].write_bytes(marked.to_json())
    assert _probe(tmp_path) == ("!marker", "False")
    assert first != "!marker"
