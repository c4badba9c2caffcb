"""
Every command pays only for what it runs (issue 13, item 6).

Checked on real subprocesses with ``PYTHONPROFILEIMPORTTIME``, which lists every
module a process imports: ``batchd --help``, ``batchd plugins`` and ``batchd status``
import no driver, no emulator server and not the SDK. The built-ins are registered
by name (plugins/builtins.py) and must say exactly what each module's own hook says.
A pipeline whose connector lacks its driver is one line naming the extra to install.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from batchd.daemon.emulator import EmulatorThread
from batchd.plugins.builtins import BUILTINS, LazyFactory, MissingDriver
from batchd.plugins.manager import get_plugins, sink_factory, source_factory
from tests.fixtures.engine import Workspace, describe

#: Heavy modules no light command may import (the SDK, drivers, the emulator's server).
HEAVY = ("anthropic", "aiohttp", "asyncpg", "aiokafka", "pydantic", "prometheus_client",
         "batchd.daemon.emulator.runner", "batchd.connectors.postgres_source",
         "batchd.connectors.kafka_source", "batchd.plugins.sinks.postgres",
         "batchd.plugins.sinks.kafka")


def imported(ws: Workspace, *args: str) -> tuple[set[str], subprocess.CompletedProcess[str]]:
    """The modules ``batchd *args`` imports (and the finished process)."""
    env = {**ws.env(), "PYTHONPROFILEIMPORTTIME": "1"}
    proc = subprocess.run(ws.command(*args), cwd=ws.root, env=env, capture_output=True,
                          text=True, timeout=60)
    modules = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines()
               if line.startswith("import time:") and "|" in line}
    return modules, proc


@pytest.mark.parametrize("args", [("--help",), ("plugins", "--all"), ("emulator", "--help")])
def test_light_commands_import_nothing_heavy(
        workspace: Callable[..., Workspace], args: tuple[str, ...]) -> None:
    ws = workspace()
    modules, proc = imported(ws, *args)
    assert proc.returncode == 0, describe(proc)
    assert "batchd.plugins.manager" in modules  # the profile did list the imports
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))
    if args[-1] == "--help":  # argparse exits before any command's imports
        assert not modules & {"structlog", "asyncio", "rich"}, modules & {"structlog", "rich"}


def test_status_imports_nothing_heavy(workspace: Callable[..., Workspace]) -> None:
    ws = workspace()
    ws.write_tickets(10)
    ws.write_config()
    modules, proc = imported(ws, "status", str(ws.config_path))
    assert proc.returncode == 0, describe(proc)
    assert "batchd.daemon.ops.status" in modules
    assert not modules & set(HEAVY), sorted(modules & set(HEAVY))
    # rich draws the table; nothing logs, so structlog (and its rich tracebacks) is not
    # imported at all (daemon/ops/lazy_log.py), nor the config's log levels' module
    assert "rich.console" in modules
    assert not modules & {"structlog", "batchd.daemon.ops._logging", "rich.traceback",
                          "rich.pretty"}


def test_run_imports_no_drawing(workspace: Callable[..., Workspace],
                                emulator: EmulatorThread) -> None:
    """`batchd run` logs its progress as text: rich (status tables) is not its cost."""
    ws = workspace(emulator.base_url)
    ws.write_tickets(5)
    ws.write_config()
    modules, proc = imported(ws, "run", str(ws.config_path), "--until-drained")
    assert proc.returncode == 0, describe(proc)
    assert "batchd.daemon.pipeline" in modules  # the profile did list the run's imports
    assert not modules & {"rich.console", "rich.table"}, sorted(modules & {"rich.console"})


@pytest.mark.parametrize("builtin", BUILTINS, ids=lambda b: b.module.rsplit(".", 1)[1])
def test_the_table_says_what_each_module_registers(builtin: Any) -> None:
    """The lazy table and the module's own register_* hook name the same types and classes."""
    module = __import__(builtin.module, fromlist=["_"])
    for hook, table in (("register_sources", builtin.sources), ("register_sinks", builtin.sinks)):
        found: dict[str, Any] = {}
        if hasattr(module, hook):
            getattr(module, hook)(lambda name, factory, _f=found: _f.__setitem__(name, factory))
        assert found == {name: getattr(module, attr) for name, attr in table.items()}, hook
    listed = next(p for p in get_plugins() if p["name"] == builtin.module)
    assert listed["sources"] == sorted(builtin.sources)
    assert listed["sinks"] == sorted(builtin.sinks)
    assert listed["package"] == "batchd (built-in)"


def test_factories_resolve_to_the_classes() -> None:
    from batchd.connectors.postgres_source import PostgresSource
    from batchd.plugins.sinks.kafka import KafkaSink

    assert source_factory("postgres") is PostgresSource
    assert sink_factory("kafka") is KafkaSink


def test_a_missing_driver_names_its_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "asyncpg", None)
    monkeypatch.delitem(sys.modules, "batchd.connectors.postgres_source", raising=False)
    monkeypatch.delitem(sys.modules, "batchd.connectors._pg", raising=False)
    with pytest.raises(MissingDriver, match=r"pip install 'batchd\[postgres\]'"):
        LazyFactory("source", "postgres", "batchd.connectors.postgres_source",
                    "PostgresSource").load()


def _blocking(tmp_path: Path, *modules: str) -> str:
    """A PYTHONPATH entry whose sitecustomize makes ``modules`` uninstalled."""
    site = tmp_path / "without"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in modules))
    return str(site)


@pytest.mark.parametrize(("source", "sink", "words"), [
    ({"type": "postgres", "dsn": "postgresql://127.0.0.1/test", "table": "t", "key": "id"},
     None, "pipeline 'tickets' uses the postgres source: pip install 'batchd[postgres]'"),
    (None, {"type": "kafka", "bootstrap_servers": "127.0.0.1:9", "topic": "labels"},
     "pipeline 'tickets' uses the kafka sink: pip install 'batchd[kafka]'"),
])
def test_without_the_extra_one_line_and_exit_2(
        workspace: Callable[..., Workspace], tmp_path: Path, source: dict[str, Any] | None,
        sink: dict[str, Any] | None, words: str) -> None:
    """Installed without an extra: validate and run say which one, in one line, exit 2."""
    ws = workspace()
    ws.write_tickets(10)
    table = ws.pipeline(source=source)
    if sink is not None:
        table["sink"] = [sink]
    from tests.fixtures.engine import dump_toml

    ws.write_raw(dump_toml({"state_dir": "state", "pipeline": [table]}))
    env = {**ws.env(), "PYTHONPATH": os.pathsep.join(
        (_blocking(tmp_path, "asyncpg", "aiokafka"), ws.env()["PYTHONPATH"]))}
    for command in ("validate", "run"):
        proc = subprocess.run(ws.command(command, str(ws.config_path)), cwd=ws.root, env=env,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, describe(proc)
        # validate lists problems on stdout (then a count); run says it on stderr
        lines = [line for line in (proc.stdout + proc.stderr).splitlines() if words in line]
        assert len(lines) == 1, describe(proc)
        assert str(ws.config_path) in lines[0] and "Traceback" not in proc.stderr


def test_a_csv_pipeline_runs_without_the_extras(workspace: Callable[..., Workspace],
                                                tmp_path: Path) -> None:
    """Neither driver installed: a CSV pipeline still validates (nothing imports them)."""
    ws = workspace()
    ws.write_tickets(10)
    ws.write_config()
    env = {**ws.env(), "PYTHONPATH": os.pathsep.join(
        (_blocking(tmp_path, "asyncpg", "aiokafka", "aiohttp"), ws.env()["PYTHONPATH"]))}
    proc = subprocess.run(ws.command("validate", str(ws.config_path)), cwd=ws.root, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, describe(proc)


def test_the_emulator_without_its_extra(workspace: Callable[..., Workspace],
                                        tmp_path: Path) -> None:
    ws = workspace()
    env = {**ws.env(), "PYTHONPATH": os.pathsep.join(
        (_blocking(tmp_path, "aiohttp"), ws.env()["PYTHONPATH"]))}
    proc = subprocess.run(ws.command("emulator", "--port", "0"), cwd=ws.root, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, describe(proc)
    assert proc.stderr.strip().splitlines() == [
        "batchd emulator: needs aiohttp, which is not installed: pip install 'batchd[emulator]'"]


def test_cluster_without_the_postgres_extra(workspace: Callable[..., Workspace],
                                            tmp_path: Path) -> None:
    ws = workspace()
    ws.write_tickets(10)
    ws.write_config()
    env = {**ws.env(), "PYTHONPATH": os.pathsep.join(
        (_blocking(tmp_path, "asyncpg"), ws.env()["PYTHONPATH"]))}
    proc = subprocess.run(ws.command("cluster", "status", str(ws.config_path)), cwd=ws.root,
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, describe(proc)
    assert proc.stderr.strip().splitlines() == [
        "batchd: config error: batchd cluster uses a PostgreSQL store: pip install "
        "'batchd[postgres]'"]


def test_a_late_log_line_imports_structlog_without_rich() -> None:
    """``status`` imports rich before anything logs; the lazy logger's first line still
    imports structlog without its rich tracebacks (~0.1 s), and rich stays usable."""
    code = (
        "import sys, rich.console\n"
        "from batchd.daemon.ops.lazy_log import LazyLogger\n"
        "LazyLogger('batchd.test').debug('late')\n"
        "assert 'structlog' in sys.modules, 'the logger did not log'\n"
        "import structlog.dev\n"
        "assert structlog.dev.rich is None and 'rich.traceback' not in sys.modules\n"
        "assert sys.modules['rich'] is not None\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_the_entry_point_precheck(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No distribution declares [batchd]: no scan; one does (or a zip is on the path): scan."""
    from batchd.plugins.manager import declared_anywhere

    site = tmp_path / "site"
    info = site / "other-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "entry_points.txt").write_text("[console_scripts]\nother = other:main\n")
    monkeypatch.setattr(sys, "path", [str(site), str(tmp_path / "missing")])
    assert not declared_anywhere("batchd")
    plugin = site / "batchd_upper-0.1.dist-info"
    plugin.mkdir()
    (plugin / "entry_points.txt").write_text("[batchd]\nupper = batchd_upper\n")
    assert declared_anywhere("batchd")
    zipped = tmp_path / "plugins.zip"
    zipped.write_bytes(b"PK")
    monkeypatch.setattr(sys, "path", [str(zipped)])
    assert declared_anywhere("batchd")
