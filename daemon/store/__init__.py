"""
The state store: one contract for the durable state, a local and a cluster store.

=============  ============================================================
``contract``   the ``StateStore`` Protocol, ``Applied`` and the shared types
``local``      ``LocalStore``: today's manifest, key ledger and spool dir
``postgres``   ``PgStore``: the same contract on ``daemon/cluster`` (asyncpg)
=============  ============================================================

Nothing in the runtime uses these yet (issue 15, docs/cluster.md): they exist
so that the wiring can move the runtime onto the contract one call at a time.
``postgres`` is imported only by name, so a install without the ``postgres``
extra can use the local store.
"""
