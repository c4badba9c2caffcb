"""
The key ledger belongs with one manifest; resuming with any other is refused.

A manifest remembers the id of the ledger it was written with (record ``ledger_bound``).
At start the pair is checked: a ledger missing beside a manifest that has history (it
was deleted, or a backup restored only part of the state) would forget which keys were
already sent, so a key repeated later in the source would be paid again; a ledger with
another id was copied from elsewhere. Both stop the start with one line saying how to
rebuild the ledger (``batchd repair``, :mod:`batchd.daemon.commands.repair`).
"""

from __future__ import annotations

from pathlib import Path

from batchd.daemon.intake.ledger import LEDGER_NAME, KeyLedger
from batchd.daemon.wal.manifest import Manifest
from batchd.daemon.wal.records import LedgerBound
from batchd.daemon.wal.state_db import check_ledger
from batchd.plugins.errors import ConfigError

__all__ = ("open_bound_ledger",)

_REPAIR = "run `batchd repair CONFIG` to rebuild it from the manifest, the spool and the source"


async def open_bound_ledger(state_dir: Path, manifest: Manifest) -> KeyLedger:
    """
    Open the ledger that goes with ``manifest`` (creating it for a new state dir).

    Raises:
        ConfigError: the ledger is missing, is another state's, or outlived its manifest.
    """
    path = state_dir / LEDGER_NAME
    state = manifest.state
    history = state.seq > 0
    existed = path.exists()
    if history and not existed:
        raise ConfigError(
            f"{path} is missing, but {manifest.path} has history: without it batchd "
            f"cannot tell which keys it already sent; restore it from the same backup as "
            f"the manifest, or {_REPAIR}"
        )
    # Garbage, a directory, or an emptied file where the ledger was: repair, not a loop.
    check_ledger(path, allow_empty=not history)
    ledger = KeyLedger(path)
    try:
        ledger_id = ledger.id
        if not history and existed and not ledger.is_empty():
            raise ConfigError(
                f"{path} holds keys but {manifest.path} is empty: the manifest was deleted "
                f"or replaced. Restore it, or delete {path} too to start over from nothing"
            )
        if history and state.ledger_id is not None and state.ledger_id != ledger_id:
            raise ConfigError(
                f"{path} is not the key ledger of {manifest.path} (ledger {ledger_id}, the "
                f"manifest was written with {state.ledger_id}): it was copied from another "
                f"state dir or another backup; put back the matching one, or {_REPAIR}"
            )
        if state.ledger_id != ledger_id:  # a new state dir, or one from before ledger ids
            await manifest.append(LedgerBound(ledger=ledger_id))
    except BaseException:
        ledger.close()
        raise
    return ledger
