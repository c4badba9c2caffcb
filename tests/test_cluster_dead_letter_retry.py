"""
``batchd dead-letters retry`` in cluster mode: the request goes into the cluster's store,
the worker reading the source takes it (the keys forgotten in the shared ledger, under its
shard lease) and resends exactly those rows, once. Before this, a request file waited in
one machine's state dir, and its keys, forgotten only in a local ledger the shared claims
never read, were skipped as a source's replays: nothing was sent.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
from collections import Counter
from contextlib import closing
from dataclasses import replace
from pathlib import Path

import anyio
import pytest

from batchd.daemon.cluster import key_ledger, retry_requests
from batchd.daemon.cluster.errors import FencedOut
from batchd.daemon.commands.dead_letters import request_retry_in_cluster
from batchd.daemon.config import load_config
from batchd.daemon.emulator import EmulatorThread
from batchd.plugins.errors import ConfigError
from tests.fixtures.cluster import ClusterEnv
from tests.fixtures.cluster_workers import Cluster, ClusterFactory
from tests.fixtures.engine import csv_keys

ROWS = 120


def _retry(cluster: Cluster, i: int) -> subprocess.CompletedProcess[str]:
    ws = cluster.workers[i]
    return subprocess.run(
        ws.command("dead-letters", "retry", str(ws.config_path), "tickets", "--all"),
        env=cluster.env(ws), capture_output=True, text=True, timeout=60)


_JSONL_DEAD = '[pipeline.dead_letter]\n"type" = "jsonl"\n"path" = "out/dead-letters"\n'
_SQLITE_DEAD = ('[pipeline.dead_letter]\n"type" = "sqlite"\n"kind" = "dead_letter"\n'
                '"path" = "out/dead.sqlite"\n')


def _dead_keys(cluster: Cluster, i: int, kind: str) -> set[str]:
    ws = cluster.workers[i]
    if kind == "jsonl":
        return ws.outputs().dead_keys
    path = ws.root / "out" / "dead.sqlite"
    if not path.exists():
        return set()
    with closing(sqlite3.connect(path)) as db:
        return {str(key) for (key,) in db.execute("SELECT key FROM dead_letter")}


@pytest.mark.parametrize("kind", ["jsonl", "sqlite"])
def test_dead_letters_of_every_machine_are_resent_once_by_the_sources_reader(
    cluster_factory: ClusterFactory, emulator: EmulatorThread, kind: str
) -> None:
    """JSONL dead letters name their chunk (the part file); a SQLite row only its batch."""
    emulator.set_faults(invalid_request=0.15)
    cluster = cluster_factory(rows=ROWS, workers=2)
    if kind == "sqlite":
        for ws in cluster.workers:
            text = ws.config_path.read_text()
            assert _JSONL_DEAD in text
            ws.config_path.write_text(text.replace(_JSONL_DEAD, _SQLITE_DEAD))
    for i in range(2):
        cluster.start(i)
    cluster.wait([0, 1])
    dead = [_dead_keys(cluster, i, kind) for i in range(2)]
    answered = set().union(*(ws.outputs().result_keys for ws in cluster.workers))
    assert len(dead[0] | dead[1]) >= 3, "the fault should dead-letter a few rows"
    assert not (dead[0] | dead[1]) & answered

    for i in range(2):  # listed from each machine's own sink, none answered yet
        assert _listed(cluster, i) == dead[i]

    emulator.set_faults(invalid_request=0.0)  # the operator fixed what the API refused
    before = Counter(emulator.stats()["received"])
    requests = 0
    for i in range(2):  # each machine's dead-letter sink holds its own rows
        if not dead[i]:
            continue
        for _ in range(2):  # asked twice before any worker runs: still sent once
            done = _retry(cluster, i)
            assert done.returncode == 0, done.stderr
            assert f"requested a retry of {len(dead[i])} keys in the cluster" in done.stdout
            requests += 1
    pending = cluster.query("SELECT count(*) AS n FROM {s}.retry_request WHERE taken_at IS NULL")
    assert pending[0]["n"] == requests

    for i in range(2):
        cluster.start(i)
    cluster.wait([0, 1])
    answered = set().union(*(ws.outputs().result_keys for ws in cluster.workers))
    assert answered == set(csv_keys(cluster.input)), cluster.logs()
    sent = Counter(emulator.stats()["received"])
    sent.subtract(before)
    resent = {cid for cid, n in sent.items() if n}
    assert resent == {f"t-{key}" for key in dead[0] | dead[1]}, cluster.logs()
    assert set(sent.values()) <= {0, 1}  # each resent exactly once
    taken = cluster.query("SELECT taken_by FROM {s}.retry_request")
    assert all(row["taken_by"] for row in taken)
    assert "dead letters resubmitted" in cluster.logs()

    # Answered since: no longer listed (the shared ledger says a later chunk owns them),
    # so nothing is left to retry.
    for i in range(2):
        assert _listed(cluster, i) == set()
        if dead[i]:
            again = _retry(cluster, i)
            assert again.returncode == 0 and "no dead letters to retry" in again.stderr


def _listed(cluster: Cluster, i: int) -> set[str]:
    ws = cluster.workers[i]
    done = subprocess.run(
        ws.command("dead-letters", "list", str(ws.config_path), "tickets", "--json"),
        env=cluster.env(ws), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return {json.loads(line)["key"] for line in done.stdout.splitlines()}


@pytest.mark.anyio
async def test_a_take_forgets_only_keys_still_their_dead_letters_and_only_under_the_lease(
    cluster: ClusterEnv,
) -> None:
    reader = await cluster.worker("reader")
    other = await cluster.worker("other")
    lease = await cluster.shard(reader)
    await key_ledger.claim_keys(cluster.conn, cluster.sql, lease, "p-000001",
                                [(k, {"line": n}) for n, k in enumerate("abce")])
    DeadRow = retry_requests.DeadRow
    first = await retry_requests.request_retry(cluster.conn, cluster.sql, "p", [
        DeadRow("b", "p-000001", None), DeadRow("a", "p-000001", None),
        DeadRow("c", "p-000000", None),  # dead in p-000000, sent again since by p-000001
        DeadRow("d", "p-000000", None),  # the ledger's retention forgot it: sent again
    ], "ops")
    second = await retry_requests.request_retry(cluster.conn, cluster.sql, "p", [
        DeadRow("a", "p-000001", None),  # asked twice: sent once, by the first request
        DeadRow("e", None, None),  # of unknown origin: the operator's word
    ], "ops")
    with pytest.raises(FencedOut):  # not the shard's holder: nothing taken, nothing forgotten
        await retry_requests.take_retries(cluster.conn, cluster.sql, replace(lease, owner=other))
    with pytest.raises(FencedOut):  # an older epoch of the same worker
        await retry_requests.take_retries(cluster.conn, cluster.sql,
                                          replace(lease, epoch=lease.epoch - 1))
    assert len(await cluster.conn.fetch(cluster.sql("SELECT key FROM {s}.key_ledger"))) == 4
    taken = await retry_requests.take_retries(cluster.conn, cluster.sql, lease)
    assert [(r.id, r.keys, r.answered) for r in taken] == [
        (first, ("a", "b", "d"), ("c",)), (second, ("e",), ())]
    left = await cluster.conn.fetch(cluster.sql("SELECT key FROM {s}.key_ledger"))
    assert [r["key"] for r in left] == ["c"]
    assert await retry_requests.take_retries(cluster.conn, cluster.sql, lease) == []


def test_a_source_split_in_shards_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "kafka.toml"
    path.write_text("""
state_dir = "state"
[cluster]
store = "postgres"
dsn = "postgresql://nobody@127.0.0.1:1/none"
[[pipeline]]
name = "events"
[pipeline.source]
type = "kafka"
bootstrap_servers = "127.0.0.1:1"
topics = ["events"]
group_id = "batchd"
key_field = "id"
[pipeline.request]
model = "claude-haiku-4-5"
max_tokens = 8
user = "{text}"
[[pipeline.sink]]
type = "jsonl"
path = "out"
""")
    config = load_config(path)
    with pytest.raises(ConfigError, match=r"split in shards \(kafka\).*no dead-letter retry"):
        anyio.run(request_retry_in_cluster, config, config.pipeline("events"), ["k1"])
