"""
The operator's side of cluster mode: the ``[cluster]`` table, ``batchd cluster init``
and ``status``, ``validate --connect``, and ``run`` refusing a store it cannot use yet.

Against the real PostgreSQL, each test in its own schema; the workers in the status
tests are registered with ``daemon/cluster/workers.py`` as a daemon would.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import orjson
import pytest

from batchd.connectors._pg import describe
from batchd.daemon.cli import main
from batchd.daemon.cluster import create_slot, limits, workers
from batchd.daemon.cluster.defaults import (
    DEFAULT_LEASE_MARGIN,
    DEFAULT_LEASE_TTL,
    DEFAULT_TAKEOVER_GRACE,
)
from batchd.daemon.cluster.migrations import LATEST_VERSION, version
from batchd.daemon.cluster.schema import Sql
from batchd.daemon.config import ClusterConfig, load_config
from batchd.plugins.errors import ConfigError
from tests.fixtures.cluster import ClusterEnv
from tests.fixtures.engine import BATCHD, REPO, Workspace, dump_toml

DSN_VAR = "BATCHD_TEST_CLUSTER_DSN"


def write(tmp_path: Path, cluster: dict[str, Any] | None, **top: Any) -> Path:
    """A working single-pipeline config with *cluster* as its ``[cluster]`` table."""
    ws = Workspace(tmp_path)
    ws.write_tickets(3)
    data: dict[str, Any] = {"state_dir": "state", **top}
    if cluster is not None:
        data["cluster"] = cluster
    data["pipeline"] = [ws.pipeline()]
    return ws.write_raw(dump_toml(data))


def postgres(schema: str, **more: Any) -> dict[str, Any]:
    return {"store": "postgres", "dsn": f"env:{DSN_VAR}", "schema": schema, **more}


def batchd(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``batchd *args`` in this process: (exit code, stdout, stderr)."""
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def error_of(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert str(path) in message and "[cluster]" in message and "\n" not in message
    return message


@pytest.fixture
def dsn_env(pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The test database's DSN in the environment variable the configs name."""
    monkeypatch.setenv(DSN_VAR, pg_dsn)
    return pg_dsn


class TestClusterTable:
    def test_defaults_without_a_table(self, tmp_path: Path) -> None:
        """No [cluster]: the local store, and the timings of daemon/cluster/defaults.py."""
        config = load_config(write(tmp_path, None))
        assert config.cluster == ClusterConfig()
        assert (config.cluster.store, config.cluster.shared) == ("local", False)
        assert (config.cluster.lease_ttl, config.cluster.takeover_grace,
                config.cluster.lease_margin) == (DEFAULT_LEASE_TTL, DEFAULT_TAKEOVER_GRACE,
                                                 DEFAULT_LEASE_MARGIN)
        assert config.cluster.schema == "batchd"

    def test_reads_every_key_and_the_dsn_from_the_environment(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Durations in human units; the DSN from env:NAME, and never in the repr."""
        monkeypatch.setenv(DSN_VAR, "postgresql://u:s3cret-pw@db.example/x")
        config = load_config(write(tmp_path, postgres(
            "ops_1", workspace="team-a", lease_ttl="1m", takeover_grace=45,
            lease_margin="2500ms")))
        c = config.cluster
        assert (c.store, c.schema, c.workspace) == ("postgres", "ops_1", "team-a")
        assert (c.lease_ttl, c.takeover_grace, c.lease_margin) == (60.0, 45.0, 2.5)
        assert c.dsn == "postgresql://u:s3cret-pw@db.example/x"
        assert "s3cret" not in repr(config)

    def test_a_short_ttl_gets_a_margin_that_fits(self, tmp_path: Path) -> None:
        """The default margin shrinks with a short TTL instead of refusing the file."""
        config = load_config(write(tmp_path, {"lease_ttl": "6s"}))
        assert config.cluster.lease_margin == 1.0

    @pytest.mark.parametrize(("table", "key", "words"), [
        ({"store": "postgres"}, "dsn", 'required when store = "postgres"'),
        ({"store": "postgress"}, "store", "did you mean 'postgres'"),
        ({"lease_tll": "10s"}, "lease_tll", "did you mean 'lease_ttl'"),
        ({"schema": "Batchd-X"}, "schema", "plain lowercase identifier"),
        ({"lease_ttl": "1s"}, "lease_ttl", "between 3s and 600s"),
        ({"lease_ttl": "2h"}, "lease_ttl", "between 3s and 600s"),
        ({"takeover_grace": "forever"}, "takeover_grace", "expected a duration"),
        ({"lease_margin": "15s"}, "lease_margin", "less than 0.5 of lease_ttl"),
        ({"workspace": "a b"}, "workspace", "must match"),
        ({"dsn": "env:BATCHD_TEST_NOT_SET"}, "dsn", "'BATCHD_TEST_NOT_SET', which is not set"),
        ({"dsn": 5}, "dsn", "non-empty string"),
    ])
    def test_mistakes_name_the_key(
        self, tmp_path: Path, table: dict[str, Any], key: str, words: str
    ) -> None:
        assert f"[cluster]: {key}: " in (message := error_of(write(tmp_path, table)))
        assert words in message

    def test_validate_lists_cluster_mistakes_beside_the_others(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """One run of validate reports the [cluster] mistake and an [api] one, exit 2."""
        path = write(tmp_path, {"lease_tll": "10s"}, api={"max_retries": -1})
        code, out, _ = batchd(capsys, "validate", str(path))
        assert code == 2
        assert "[cluster]: lease_tll: unknown key (did you mean 'lease_ttl'?)" in out
        assert "[api]: max_retries: must not be negative" in out

    def test_a_missing_dsn_stops_every_command_with_exit_2(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        path = write(tmp_path, {"store": "postgres"})
        for args in (("cluster", "init", str(path)), ("cluster", "status", str(path)),
                     ("run", str(path))):
            code, _, err = batchd(capsys, *args)
            assert code == 2, args
            assert "[cluster]: dsn: is required" in err

    def test_validate_warns_that_run_refuses_the_store(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Valid otherwise: validate passes with a warning naming [cluster] store."""
        monkeypatch.setenv(DSN_VAR, "postgresql://127.0.0.1:1/none")
        code, out, _ = batchd(capsys, "validate", str(write(tmp_path, postgres("x"))))
        assert code == 0, out
        assert "warning: " in out and "[cluster]: store: " in out and "not wired" in out


class TestRunRefuses:
    def test_run_with_the_postgres_store_is_exit_2_in_one_line(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A real `batchd run`: one line, exit 2, no state written, nothing run locally."""
        ws = Workspace(tmp_path)
        path = write(tmp_path, postgres("x"))
        env = {**ws.env(), DSN_VAR: "postgresql://127.0.0.1:1/none"}
        proc = subprocess.run([*BATCHD, "run", str(path), "--until-drained"], env=env,
                              capture_output=True, text=True, timeout=60, cwd=REPO)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert "[cluster]: store: cluster mode's store is not wired into `batchd run` yet" \
            in lines[0]
        assert "docs/cluster.md" in lines[0]
        assert not (tmp_path / "state" / "manifest.jsonl").exists()
        assert not (tmp_path / "out").exists()

    def test_the_local_store_is_not_refused(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        code, out, _ = batchd(capsys, "validate", str(write(tmp_path, {"store": "local"})))
        assert code == 0 and "warning" not in out


@pytest.mark.usefixtures("dsn_env")
class TestInit:
    def test_init_twice(
        self, tmp_path: Path, pg_dsn: str, pg_schema: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Creates the schema at the latest version, then finds nothing to do."""
        path = write(tmp_path, postgres(pg_schema))
        code, out, _ = batchd(capsys, "cluster", "init", str(path))
        assert code == 0
        assert out.strip() == (f"created cluster schema {pg_schema!r} at version "
                               f"{LATEST_VERSION} in {describe(pg_dsn)}")
        assert _version(pg_dsn, pg_schema) == LATEST_VERSION
        code, out, _ = batchd(capsys, "cluster", "init", str(path))
        assert code == 0
        assert f"is already at version {LATEST_VERSION}; nothing to do" in out

    def test_a_newer_schema_is_refused_naming_both_versions(
        self, tmp_path: Path, pg_dsn: str, pg_schema: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        path = write(tmp_path, postgres(pg_schema))
        assert batchd(capsys, "cluster", "init", str(path))[0] == 0
        newer = LATEST_VERSION + 1
        _execute(pg_dsn, f'INSERT INTO "{pg_schema}".schema_version (version, description)'
                         f" VALUES ({newer}, 'from a newer batchd')")
        for action in ("init", "status"):
            code, out, err = batchd(capsys, "cluster", action, str(path))
            assert code == 2, action
            assert out == ""
            assert f"{path}: [cluster]: schema: " in err
            assert f"at version {newer}, newer than this batchd knows (version " \
                   f"{LATEST_VERSION})" in err
        assert _version(pg_dsn, pg_schema) == newer

    def test_status_of_an_uninitialised_schema_says_to_init(
        self, tmp_path: Path, pg_schema: str, capsys: pytest.CaptureFixture[str]
    ) -> None:
        code, _, err = batchd(capsys, "cluster", "status", str(write(tmp_path,
                                                                     postgres(pg_schema))))
        assert code == 2
        assert "[cluster]: schema: " in err and "run: batchd cluster init" in err

    def test_a_refused_login_names_the_dsn_without_the_password(
        self, tmp_path: Path, pg_schema: str, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A database that does not exist: exit 2 naming [cluster] dsn; no secret shown."""
        monkeypatch.setenv(DSN_VAR, "postgresql://nobody:hunter2pw@127.0.0.1:5432/no_such_db")
        path = write(tmp_path, postgres(pg_schema))
        code, out, err = batchd(capsys, "cluster", "init", str(path))
        assert code == 2
        assert "[cluster]: dsn: cannot connect to nobody@127.0.0.1:5432/no_such_db" in err
        assert "hunter2pw" not in out + err


class TestValidateConnect:
    def test_checks_the_dsn_and_the_schema_version(
        self, tmp_path: Path, dsn_env: str, pg_schema: str, capsys: pytest.CaptureFixture[str],
    ) -> None:
        """Uninitialised: a problem naming [cluster] schema; after init: a checked line."""
        path = write(tmp_path, postgres(pg_schema))
        code, out, _ = batchd(capsys, "validate", "--connect", "--json", str(path))
        report = orjson.loads(out)
        cluster = [p for p in report["problems"] if p["table"] == "[cluster]"]
        assert code == 2 and [p["key"] for p in cluster] == ["schema"], report
        assert "run: batchd cluster init" in cluster[0]["message"]
        assert batchd(capsys, "cluster", "init", str(path))[0] == 0
        code, out, _ = batchd(capsys, "validate", "--connect", "--json", str(path))
        report = orjson.loads(out)
        assert not [p for p in report["problems"] if p["table"] == "[cluster]"], report
        assert (f"[cluster] {describe(dsn_env)}: schema {pg_schema!r} at version "
                f"{LATEST_VERSION}") in report["checked"]

    def test_an_unreachable_database_is_a_problem_naming_the_dsn(
        self, tmp_path: Path, pg_schema: str, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        monkeypatch.setenv(DSN_VAR, "postgresql://u:pw-not-shown@127.0.0.1:1/test")
        code, out, _ = batchd(capsys, "validate", "--connect", "--json",
                              str(write(tmp_path, postgres(pg_schema))))
        report = orjson.loads(out)
        cluster = [p for p in report["problems"] if p["table"] == "[cluster]"]
        assert code == 2 and [p["key"] for p in cluster] == ["dsn"], report
        assert "u@127.0.0.1:1/test" in cluster[0]["message"]
        assert "pw-not-shown" not in out


@pytest.mark.anyio
class TestStatus:
    async def test_lists_both_workers_with_their_heartbeat_and_what_they_own(
        self, cluster: ClusterEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """One worker alive holding a shard, a chunk and the create slot; one gone silent."""
        monkeypatch.setenv(DSN_VAR, cluster.dsn)
        path = write(tmp_path, postgres(cluster.sql.schema, takeover_grace="10s"))
        alive = await workers.register(cluster.conn, cluster.sql, "alpha", ttl=30.0)
        silent = await workers.register(cluster.conn, cluster.sql, "beta", ttl=30.0)
        shard = await cluster.shard(alive, "tickets", "0")
        await cluster.seal(shard, "tickets-000001")
        slot = await create_slot.take(cluster.conn, cluster.sql, "default", alive, grace=10.0)
        assert slot is not None
        await limits.define(cluster.conn, cluster.sql, "queue:default", 1000)
        assert await limits.reserve(cluster.conn, cluster.sql, ["queue:default"], 3,
                                    "tickets-000001")
        await cluster.silence(silent, 120.0)

        code = await anyio.to_thread.run_sync(main, ["cluster", "status", str(path), "--json"])
        status = orjson.loads(capsys.readouterr().out)
        assert code == 0
        assert status["schema"] == cluster.sql.schema
        assert status["schema_version"] == LATEST_VERSION
        by_id = {w["worker_id"]: w for w in status["workers"]}
        assert set(by_id) == {alive, silent}
        a, b = by_id[alive], by_id[silent]
        assert a["state"] == "alive" and 0 <= a["heartbeat_age"] < 30
        assert b["state"] == "dead" and 119 < b["heartbeat_age"] < 200  # past 30 s + 10 s
        assert a["chunks"] == [{"pipeline": "tickets", "chunk": "tickets-000001",
                                "stage": "sealed", "epoch": 1}]
        assert a["shards"] == [{"pipeline": "tickets", "shard": "0", "epoch": shard.epoch}]
        assert a["create_slots"] == [{"workspace": "default", "epoch": slot.epoch}]
        assert b["chunks"] == b["shards"] == b["create_slots"] == []
        assert status["limits"] == [{"scope": "queue:default", "cap": 1000, "reserved": 3,
                                     "spent": 0, "external": 0, "available": 997}]

        code = await anyio.to_thread.run_sync(main, ["cluster", "status", str(path)])
        text = capsys.readouterr().out
        assert code == 0
        assert "workers: 2 (1 alive)" in text
        assert f"  {alive}  alive  heartbeat " in text
        assert f"  {silent}  dead  heartbeat 2.0m ago" in text
        assert "chunk tickets-000001 (tickets): sealed, epoch 1" in text
        assert "queue:default: cap 1000, reserved 3, spent 0, external 0, available 997" in text

    async def test_a_stopped_worker_and_an_unowned_chunk(
        self, cluster: ClusterEnv, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str],
    ) -> None:
        """A graceful stop hands its chunk back: status shows it stopped and the chunk free."""
        monkeypatch.setenv(DSN_VAR, cluster.dsn)
        path = write(tmp_path, postgres(cluster.sql.schema))
        gone = await workers.register(cluster.conn, cluster.sql, "gamma", ttl=30.0)
        await cluster.seal(await cluster.shard(gone, "tickets", "0"), "tickets-000001")
        await workers.deregister(cluster.conn, cluster.sql, gone)

        code = await anyio.to_thread.run_sync(main, ["cluster", "status", str(path), "--json"])
        status = orjson.loads(capsys.readouterr().out)
        assert code == 0
        assert [(w["worker_id"], w["state"], w["chunks"]) for w in status["workers"]] == [
            (gone, "stopped", [])]
        assert status["unowned_chunks"] == {"tickets": 1}


class TestCommandLine:
    def test_help_and_the_cluster_commands_do_not_import_asyncpg(self, tmp_path: Path) -> None:
        """`batchd --help` and `batchd cluster --help` stay light; the commands are listed."""
        for args in (("--help",), ("cluster", "--help"), ("cluster", "status", "--help")):
            proc = subprocess.run([sys.executable, "-X", "importtime", "-m",
                                   "batchd.daemon.cli", *args], capture_output=True, text=True,
                                  timeout=60, cwd=tmp_path, env=Workspace(tmp_path).env())
            assert proc.returncode == 0, proc.stderr
            modules = _imported(proc)
            assert "batchd.plugins.manager" in modules  # the profile did list the imports
            assert "asyncpg" not in modules, args
            if args == ("--help",):
                assert "cluster" in proc.stdout
            if args == ("cluster", "--help"):
                assert "init" in proc.stdout and "status" in proc.stdout

    def test_status_does_import_asyncpg(self, tmp_path: Path, pg_dsn: str,
                                        pg_schema: str) -> None:
        """The check above can fail: a cluster command that connects imports the driver."""
        path = write(tmp_path, postgres(pg_schema))
        env = {**Workspace(tmp_path).env(), DSN_VAR: pg_dsn}
        proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "batchd.daemon.cli",
                               "cluster", "init", str(path)], capture_output=True, text=True,
                              timeout=60, cwd=tmp_path, env=env)
        assert proc.returncode == 0, proc.stderr
        assert "asyncpg" in _imported(proc)

    @pytest.mark.parametrize(("words", "offered"), [
        (("", ), {"cluster"}),
        (("cluster", ""), {"init", "status"}),
        (("cluster", "status", "--"), {"--json", "--help"}),
    ])
    def test_completion_knows_the_commands(
        self, tmp_path: Path, words: tuple[str, ...], offered: set[str]
    ) -> None:
        script = tmp_path / "batchd.bash"
        script.write_text(subprocess.run([*BATCHD, "completion", "bash"], capture_output=True,
                                         text=True, check=True, timeout=60, cwd=REPO,
                                         env=Workspace(tmp_path).env()).stdout)
        line = " ".join(["batchd", *(w or "''" for w in words)])
        program = (f"source {script}\nCOMP_WORDS=({line})\nCOMP_CWORD={len(words)}\n"
                   '_batchd\nprintf "%s\\n" "${COMPREPLY[@]}"\n')
        proc = subprocess.run(["bash", "--norc", "-c", program], capture_output=True,
                              text=True, cwd=tmp_path, timeout=30, check=True)
        assert offered <= set(proc.stdout.split()), proc.stdout


def _imported(proc: subprocess.CompletedProcess[str]) -> set[str]:
    """The modules a ``python -X importtime`` process imported."""
    return {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines()
            if line.startswith("import time:") and "|" in line}


def _execute(dsn: str, statement: str) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    anyio.run(run)


def _version(dsn: str, schema: str) -> int | None:
    async def run() -> int | None:
        conn = await asyncpg.connect(dsn)
        try:
            return await version(conn, Sql(schema))
        finally:
            await conn.close()

    return anyio.run(run)
