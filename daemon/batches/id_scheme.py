"""
The identity of the scheme a pipeline's custom_ids are made with.

Reconciling after a restored backup matches the batches on the API to rebuilt chunks
by custom_id; rebuilt under another scheme, the chunks share none with those batches,
which then look like another tool's and their rows would be paid again. The manifest
records the scheme (:class:`~batchd.daemon.wal.records.IdScheme`) so the reconciler can
tell. Only what changes the custom_ids counts: the ``custom_id`` template and the key
they fall back to (a hash of it). The chunking (``max_requests``, ``max_bytes``,
``linger``) does not: chunks rebuilt for unknown batches follow those batches' bounds.
"""

from __future__ import annotations

import hashlib

import orjson

from batchd.daemon.config import PipelineConfig
from batchd.daemon.wal.records import IdScheme

__all__ = ("id_scheme",)


def id_scheme(pipeline: PipelineConfig) -> IdScheme:
    """The scheme this configuration makes the pipeline's custom_ids with."""
    template = None if pipeline.custom_id is None else pipeline.custom_id.source
    key = pipeline.source.options.get("key")
    identity = orjson.dumps({"custom_id": template, "key": key if isinstance(key, str) else None},
                            option=orjson.OPT_SORT_KEYS)
    return IdScheme(pipeline=pipeline.name, fingerprint=hashlib.sha256(identity).hexdigest()[:16],
                    template=template)
