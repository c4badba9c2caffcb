"""From a source record to a sealed chunk: shaping, keys, the ledger and the spool."""
