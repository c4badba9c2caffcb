"""
The cluster store's errors, in one module so every part (and later the runtime)
can raise and catch them without importing each other.

Each message names the thing at fault (schema, chunk, shard, scope, worker) so an
operator can act on one log line.
"""

from __future__ import annotations

from batchd.plugins.errors import BatchdError, ConfigError, FatalError

__all__ = (
    "ClusterError",
    "FencedOut",
    "IllegalTransition",
    "LeaseExpired",
    "LimitRefused",
    "LimitUndefined",
    "SchemaVersionError",
    "SpoolCorrupt",
    "WorkerGone",
)


class ClusterError(BatchdError):
    """Base of the cluster store's errors."""


class FencedOut(ClusterError):
    """
    The caller's lease (owner + epoch, or the stage it expected) no longer holds.

    Control flow rather than a failure: the driver that gets it drops the chunk
    (or shard, or slot) and does nothing more for it; whoever holds the lease now
    carries on. It is counted on the worker's row.
    """

    def __init__(self, what: str, reason: str) -> None:
        super().__init__(f"{what}: fenced out ({reason})")
        self.what = what
        self.reason = reason


class IllegalTransition(ClusterError):
    """The record is a transition the manifest's replay code refuses; nothing was written."""


class LeaseExpired(ClusterError):
    """The local lease deadline passed: no external action may start or finish."""


class WorkerGone(ClusterError):
    """The worker's row is gone or stopped: it must register again (and owns nothing)."""


class LimitUndefined(ClusterError):
    """A reservation named a limit scope that has no counter row."""


class LimitRefused(ClusterError):
    """
    A transition's reservation did not fit its limit's cap: the transition was not
    recorded (a seal past the budget). Carries the counter's figures for the message.
    """

    def __init__(self, scope: str, amount: float, *, cap: float | None, spent: float,
                 reserved: float, external: float = 0.0) -> None:
        super().__init__(f"limit {scope}: {amount:.4f} more does not fit its cap")
        self.scope, self.amount, self.cap = scope, amount, cap
        self.spent, self.reserved, self.external = spent, reserved, external


class SpoolCorrupt(FatalError):
    """
    A spool's stored blocks do not match their checksum: the chunk is quarantined,
    never sent.
    """


class SchemaVersionError(ConfigError):
    """
    The cluster schema is at a version this batchd cannot use.

    A ConfigError (exit 2) because restarting cannot fix it: either ``batchd
    cluster init`` must upgrade the schema, or this batchd is older than the
    schema and must be upgraded.
    """
