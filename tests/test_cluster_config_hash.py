"""
Every worker of a pipeline runs it with the same shared config (docs/cluster.md, "One
config per pipeline"): the first worker records it, a worker whose model or template
differs is refused at start naming each field with both values, fields that are each
machine's own may differ, and ``batchd cluster init --accept-config`` changes it for all
once no worker is alive.

Real ``batchd run`` workers against the real PostgreSQL (a schema per test) and the
emulator.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import anyio
import asyncpg
import orjson
import pytest

from batchd.daemon.cli import main
from batchd.daemon.cluster import workers
from batchd.daemon.cluster.pipeline_config import ConfigDrift, check_or_record
from batchd.daemon.cluster.schema import Sql
from batchd.daemon.emulator import EmulatorThread
from tests.fixtures.cluster import ClusterEnv
from tests.fixtures.cluster_workers import DSN_VAR, Cluster, _query

OTHER_MODEL = "claude-sonnet-4-6"


def edit(path: Path, *changes: tuple[str, str]) -> None:
    text = path.read_text()
    for old, new in changes:
        assert old in text, (old, text)
        text = text.replace(old, new, 1)
    path.write_text(text)


def run(cluster: Cluster, i: int, *args: str) -> subprocess.CompletedProcess[str]:
    ws = cluster.workers[i]
    argv = list(args) or ["run", str(ws.config_path), "--until-drained"]
    return subprocess.run(ws.command(*argv), cwd=ws.root, env=cluster.env(ws),
                          capture_output=True, text=True, timeout=60)


def registered(cluster: Cluster) -> int:
    rows = _query(cluster.dsn, f'SELECT count(*) AS n FROM "{cluster.schema}".worker')
    return int(rows[0]["n"])


class TestOneConfigPerPipeline:
    def test_another_model_and_template_are_refused_naming_the_fields(
        self, cluster_factory: Callable[..., Cluster], emulator: EmulatorThread
    ) -> None:
        cluster = cluster_factory(rows=60, workers=2)
        edit(cluster.workers[1].config_path, ('"claude-haiku-4-5"', f'"{OTHER_MODEL}"'),
             ('"user" = "{body}"', '"user" = "Label this: {body}"'))
        first = run(cluster, 0)  # records the pipeline's config, and drains it
        assert first.returncode == 0, first.stderr[-3000:]
        before = registered(cluster)

        refused = run(cluster, 1)
        assert refused.returncode == 2, refused.stderr[-3000:]
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1, refused.stderr
        line = lines[0]
        assert str(cluster.workers[1].config_path) in line
        assert "[[pipeline]] 'tickets' differs from the config the cluster recorded" in line
        assert (f"request.model: cluster has 'claude-haiku-4-5', this config "
                f"'{OTHER_MODEL}'") in line
        assert "request.user: cluster has '{body}', this config 'Label this: {body}'" in line
        assert "batchd cluster init CONFIG --accept-config" in line
        assert "max_in_flight" not in line and "state_dir" not in line
        assert registered(cluster) == before  # refused before it registered as a worker

        # A deliberate change for every worker: accepted while none is alive; then the
        # old config is the one refused.
        accepted = run(cluster, 1, "cluster", "init", str(cluster.workers[1].config_path),
                       "--accept-config")
        assert accepted.returncode == 0, accepted.stderr
        assert "accepted the config of pipelines 'tickets' for every worker" in accepted.stdout
        old = run(cluster, 0)
        assert old.returncode == 2
        assert (f"request.model: cluster has '{OTHER_MODEL}', this config "
                "'claude-haiku-4-5'") in old.stderr
        again = run(cluster, 1)
        assert again.returncode == 0, again.stderr[-3000:]

    def test_per_worker_fields_may_differ(
        self, cluster_factory: Callable[..., Cluster], emulator: EmulatorThread
    ) -> None:
        """Linger, max_in_flight, log level, poll and lease timings, the budget: each its own."""
        cluster = cluster_factory(rows=300, workers=2)
        edit(cluster.workers[1].config_path,
             ('"linger" = "0.2s"', '"linger" = "0.4s"'),
             ('"max_in_flight" = 3', '"max_in_flight" = 2'),
             ('"poll_interval" = "0.2s"', '"poll_interval" = "0.3s"'),
             ('"takeover_grace" = "1s"', '"takeover_grace" = "2s"'),
             ('"max_attempts" = 3', '"max_attempts" = 3\n"budget_usd" = 500.0'))
        text = cluster.workers[1].config_path.read_text()
        cluster.workers[1].config_path.write_text('log_level = "debug"\n' + text)
        cluster.start(0)
        cluster.start(1)
        cluster.wait([0, 1])
        cluster.check(emulator)


def test_accept_is_refused_while_a_worker_is_alive(
    pg_dsn: str, pg_schema: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.test_cluster_cli import postgres, write

    monkeypatch.setenv(DSN_VAR, pg_dsn)
    path = write(tmp_path, postgres(pg_schema))
    assert main(["cluster", "init", str(path)]) == 0
    sql = Sql(pg_schema)

    async def register() -> str:
        conn = await asyncpg.connect(pg_dsn)
        try:
            return await workers.register(conn, sql, "host:1", ttl=30)
        finally:
            await conn.close()

    alive = anyio.run(register)
    capsys.readouterr()
    code = main(["cluster", "init", str(path), "--accept-config"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"cannot accept a new pipeline config while workers are alive ({alive})" in err
    rows = _query(pg_dsn, f'SELECT count(*) AS n FROM "{pg_schema}".pipeline_config')
    assert rows[0]["n"] == 0


def test_validate_connect_names_a_differing_config_and_records_nothing(
    pg_dsn: str, pg_schema: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tests.test_cluster_cli import postgres, write

    monkeypatch.setenv(DSN_VAR, pg_dsn)
    path = write(tmp_path, postgres(pg_schema))
    assert main(["cluster", "init", str(path), "--accept-config"]) == 0
    edit(path, ('"claude-haiku-4-5"', f'"{OTHER_MODEL}"'))
    capsys.readouterr()
    code = main(["validate", "--connect", "--json", str(path)])
    report = orjson.loads(capsys.readouterr().out)
    drifts = [p for p in report["problems"] if p["table"] == "[[pipeline]]"]
    assert code == 2 and len(drifts) == 1, report
    assert (f"request.model: cluster has 'claude-haiku-4-5', this config '{OTHER_MODEL}'"
            in drifts[0]["message"])
    rows = _query(pg_dsn, f'SELECT fields FROM "{pg_schema}".pipeline_config')
    assert orjson.loads(rows[0]["fields"])["request.model"] == "claude-haiku-4-5"


@pytest.mark.anyio
class TestRecordedConfig:
    async def test_secrets_are_masked_and_env_names_shown(self, cluster: ClusterEnv) -> None:
        mine = {"source.type": "postgres", "source.password": "hunter2",
                "source.dsn": "env:SOURCE_DSN", "request.model": "claude-haiku-4-5"}
        recorded = await check_or_record(cluster.conn, cluster.sql, {"p": mine},
                                         recorded_by="a:1")
        assert recorded == ["p"]
        assert await check_or_record(cluster.conn, cluster.sql, {"p": mine},
                                     recorded_by="b:2") == []  # the same: accepted
        other = {**mine, "source.password": "hunter3", "source.dsn": "env:OTHER_DSN"}
        with pytest.raises(ConfigDrift) as info:
            await check_or_record(cluster.conn, cluster.sql, {"p": other}, recorded_by="c:3")
        message = str(info.value)
        assert "hunter" not in message
        assert "source.password: cluster has <hidden, sha256 " in message
        assert "source.dsn: cluster has 'env:SOURCE_DSN', this config 'env:OTHER_DSN'" in message
        assert "request.model" not in message and "(by a:1" in message
