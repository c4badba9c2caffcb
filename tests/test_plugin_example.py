"""
The out-of-tree example plugin, installed the way a user installs it: listed
by ``batchd plugins``, driven end to end by ``batchd run`` against the
emulator, and absent when ``BATCHD_LOAD_PLUGINS`` leaves it out.

The package is pip-installed (not editable) into a temp directory that the
subprocesses put on ``PYTHONPATH``, so the shared venv never changes and a
second run starts from scratch. Every batchd here is a subprocess with an
explicit environment: conftest's ``BATCHD_LOAD_PLUGINS=""`` must not leak in.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import orjson
import pytest

import batchd
from batchd.daemon.emulator import EmulatorThread

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "batchd-plugin-example"
HOOKS_DOC = ROOT / "docs" / "plugins" / "hooks.md"
PROJECT = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
PACKAGE = f"{PROJECT['name']} {PROJECT['version']}"
HOOKS = ["batchd_parse_result", "register_commands", "register_sinks", "register_sources"]

# The emulator answers the way models decorate labels; the plugin's parse hook
# strips the decoration, so every answer passes `allowed` only if the hook ran.
RULES: dict[str, Any] = {
    "default": "Other.",
    "rules": [
        {"pattern": "(?i)refund|invoice", "reply": "Billing."},
        {"pattern": "(?i)crash|error", "reply": "`bug`"},
    ],
}
NOTES = (
    b"n1: please refund my invoice\n"
    b"n2: the app crashes on start\n"
    b"\n"
    b"n3: do you have an office in Lisbon?\n"
    b"no colon here\n"
    b"n4: \xff\xfe\n"
)
CONFIG = """
state_dir = "state"

[api]
poll_interval = "100ms"
poll_jitter = 0

[[pipeline]]
name = "notes"

[pipeline.source]
type = "example-lines"
path = "notes.txt"
key = "prefix"

[pipeline.request]
model = "claude-haiku-4-5"
max_tokens = 8
system = "Label the note as billing, bug or other. Answer with the label only."
user = "{text}"

[pipeline.output]
allowed = ["billing", "bug", "other"]
lowercase = true

[pipeline.batching]
linger = "100ms"

[[pipeline.sink]]
type = "example-csv"
path = "out/labels"
columns = ["key", "status", "output"]

[pipeline.dead_letter]
type = "example-csv"
path = "out/dead"
columns = ["key", "status", "error_type", "error_message"]
"""


@dataclass(frozen=True, slots=True)
class Installed:
    """Where the example's source was copied and where pip installed it."""

    source: Path
    site: Path

    def env(self, load: str | None, **extra: str) -> dict[str, str]:
        """A subprocess environment that sees the plugin; ``load=None`` unsets the allow-list."""
        env = {k: v for k, v in os.environ.items() if k != "BATCHD_LOAD_PLUGINS"}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self.site), env.get("PYTHONPATH")]))
        if load is not None:
            env["BATCHD_LOAD_PLUGINS"] = load
        env.update(extra)
        return env


def _can_build_without_isolation() -> bool:
    """Whether the venv's setuptools can build a wheel itself (needs wheel, or setuptools>=70.1)."""
    if importlib.util.find_spec("wheel") is not None:
        return True
    try:
        version = tuple(int(part) for part in metadata.version("setuptools").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return False
    return version >= (70, 1)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """The example built from a copy (no build/ litter in the repo) and installed with --target."""
    work = tmp_path_factory.mktemp("plugin-example")
    source = work / "src"
    junk = shutil.ignore_patterns("build", "*.egg-info", "__pycache__", ".*")
    shutil.copytree(EXAMPLE, source, ignore=junk)
    site = work / "site"
    command = [
        sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-input",
        "--disable-pip-version-check", "--target", str(site), str(source),
    ]  # fmt: skip
    if _can_build_without_isolation():
        command.insert(4, "--no-build-isolation")
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"pip install failed:\n{done.stdout}\n{done.stderr}"
    assert (site / "batchd_plugin_example" / "__init__.py").is_file()
    return Installed(source, site)


def _batchd(
    *args: str, env: dict[str, str], cwd: Path, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "batchd.daemon.cli", *args],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def _read_csvs(directory: Path) -> list[dict[str, str]]:
    """Every row of every published part file, and proof that no temp file is left."""
    assert not list(directory.glob(".*.tmp"))
    rows: list[dict[str, str]] = []
    for path in sorted(directory.glob("*.csv")):
        with path.open(newline="") as file:
            rows.extend(csv.DictReader(file))
    return rows


@pytest.fixture
def pipeline_dir(tmp_path: Path) -> Path:
    """A config directory holding the pipeline and its notes file."""
    (tmp_path / "pipeline.toml").write_text(CONFIG)
    (tmp_path / "notes.txt").write_bytes(NOTES)
    return tmp_path


class TestDiscovery:
    @pytest.mark.parametrize(
        ("load", "flags"),
        [(None, ["--all"]), ("example", [])],
        ids=["all-installed", "allow-listed-without-builtins"],
    )
    def test_plugins_lists_the_example(
        self, installed: Installed, tmp_path: Path, load: str | None, flags: list[str]
    ) -> None:
        """`batchd plugins --json` shows the entry point's source, sink, hooks and version."""
        done = _batchd("plugins", "--json", *flags, env=installed.env(load), cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        plugins = orjson.loads(done.stdout)
        if not flags:  # without --all only third-party plugins are listed
            assert [p["name"] for p in plugins] == ["example"]
        assert [p for p in plugins if p["name"] == "example"] == [
            {
                "name": "example",
                "package": PACKAGE,
                "hooks": HOOKS,
                "sources": ["example-lines"],
                "sinks": ["example-csv"],
            }
        ]

    def test_empty_allow_list_loads_nothing(self, installed: Installed, tmp_path: Path) -> None:
        """BATCHD_LOAD_PLUGINS set but empty keeps the installed example out."""
        done = _batchd("plugins", "--all", "--json", env=installed.env(""), cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        names = {p["name"] for p in orjson.loads(done.stdout)}
        assert "example" not in names
        assert "batchd.plugins.sinks.jsonl" in names  # the built-ins still load

    def test_register_commands_adds_a_subcommand(
        self, installed: Installed, tmp_path: Path
    ) -> None:
        """`batchd example-hello` runs the plugin's command."""
        done = _batchd("example-hello", "--name", "tests", env=installed.env(None), cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        expected = f"hello, tests, from {PACKAGE} (source example-lines, sink example-csv)"
        assert done.stdout.strip() == expected


class TestPipeline:
    def test_run_until_drained_writes_csv_then_resumes(
        self,
        installed: Installed,
        pipeline_dir: Path,
        emulator_factory: Callable[..., EmulatorThread],
    ) -> None:
        """
        Labels land in the CSV sink and bad lines in the CSV dead-letter sink;
        a second run reads only the lines appended since, and nothing is sent twice.
        """
        emulator = emulator_factory(rules=RULES)
        env = installed.env("example", ANTHROPIC_BASE_URL=emulator.base_url, ANTHROPIC_API_KEY="t")
        first = _batchd("run", "pipeline.toml", "--until-drained", env=env, cwd=pipeline_dir)
        assert first.returncode == 0, first.stderr[-4000:]
        labels = _read_csvs(pipeline_dir / "out" / "labels")
        assert sorted((r["key"], r["status"], r["output"]) for r in labels) == [
            ("n1", "succeeded", "billing"),
            ("n2", "succeeded", "bug"),
            ("n3", "succeeded", "other"),
        ]
        dead = _read_csvs(pipeline_dir / "out" / "dead")
        assert sorted((r["key"], r["error_type"], r["error_message"]) for r in dead) == [
            ("line-5", "bad_record",
             "notes.txt line 5: expected 'KEY: TEXT' (no ':' or an empty key)"),
            ("line-6", "bad_record", "notes.txt line 6: not valid UTF-8 (byte 5 of the line)"),
        ]  # fmt: skip
        assert sorted(emulator.stats()["received"].values()) == [1, 1, 1]  # bad lines: never sent

        with (pipeline_dir / "notes.txt").open("ab") as notes:
            notes.write(b"n5: where is my invoice?\n\nn6: error 500 on login\n")
        second = _batchd("run", "pipeline.toml", "--until-drained", env=env, cwd=pipeline_dir)
        assert second.returncode == 0, second.stderr[-4000:]
        labels = _read_csvs(pipeline_dir / "out" / "labels")
        assert sorted((r["key"], r["output"]) for r in labels) == [
            ("n1", "billing"), ("n2", "bug"), ("n3", "other"), ("n5", "billing"), ("n6", "bug"),
        ]  # fmt: skip
        assert len(_read_csvs(pipeline_dir / "out" / "dead")) == 2
        assert sorted(emulator.stats()["received"].values()) == [1, 1, 1, 1, 1]

    def test_unknown_source_type_without_the_plugin(
        self, installed: Installed, pipeline_dir: Path
    ) -> None:
        """With the plugin not loaded, the config fails naming the type, table and known types."""
        env = installed.env("", ANTHROPIC_BASE_URL="http://127.0.0.1:9", ANTHROPIC_API_KEY="t")
        done = _batchd("run", "pipeline.toml", "--until-drained", env=env, cwd=pipeline_dir)
        assert done.returncode == 2
        # run lists every problem (the plugin's sink type is unknown too): find the source's.
        message = next(line for line in done.stderr.splitlines() if "[pipeline.source]" in line)
        assert message.startswith("batchd: config error: pipeline.toml: [pipeline.source] of ")
        assert "unknown source type 'example-lines' (known: csv, jsonl," in message
        assert "Traceback" not in done.stderr
        assert not (pipeline_dir / "out").exists()


class TestExampleTests:
    def test_the_examples_own_tests_pass(self, installed: Installed) -> None:
        """The tests the tutorial walks through run green against the installed package."""
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"],
            env=installed.env(None), cwd=installed.source,
            capture_output=True, text=True, timeout=90,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
        assert " passed" in done.stdout.splitlines()[-1]


def _doc_sections() -> dict[str, str]:
    """The Python code of each ``## hook(args)`` section of docs/plugins/hooks.md."""
    sections: dict[str, str] = {}
    for part in re.split(r"^## ", HOOKS_DOC.read_text(), flags=re.M)[1:]:
        name = part.split("(", 1)[0].strip()
        sections[name] = "\n".join(re.findall(r"^```python\n(.*?)^```", part, flags=re.M | re.S))
    return sections


def _doc_hook(name: str) -> Any:
    """Run the section's code as a module and return its hook implementation."""
    namespace: dict[str, Any] = {"__name__": f"hooks_md_{name}"}
    exec(compile(_doc_sections()[name], f"{HOOKS_DOC}#{name}", "exec"), namespace)
    hook = namespace[name]
    assert hasattr(hook, "batchd_impl"), f"{name} in hooks.md is not decorated @batchd.hookimpl"
    return hook


def _ctx(tmp_path: Path) -> batchd.PluginContext:
    return batchd.PluginContext(pipeline="p", state_dir=tmp_path, config_dir=tmp_path)


class TestHooksDoc:
    def test_every_hookspec_has_a_section(self) -> None:
        """hooks.md documents exactly the hooks batchd defines, each with Python code."""
        from batchd.plugins import hookspecs

        specs = {n for n in dir(hookspecs) if hasattr(getattr(hookspecs, n), "batchd_spec")}
        sections = _doc_sections()
        assert set(sections) == specs
        assert all(sections.values())

    @pytest.mark.anyio
    async def test_register_sources(self, tmp_path: Path) -> None:
        """The count source reads 1..count in batches and resumes after a position."""
        found: dict[str, Any] = {}
        _doc_hook("register_sources")(register=found.__setitem__)
        source = found["count"]({"count": 5}, _ctx(tmp_path))
        source.max_records = 2
        keys: list[str] = []
        async with source:
            await source.start({"n": 1})
            while (records := await source.poll()) is not None:
                keys += [r.key for r in records]
        assert keys == ["n-2", "n-3", "n-4", "n-5"]
        with pytest.raises(batchd.ConfigError,
                           match=r"cuont: unknown option \(did you mean 'count'\?\)"):
            found["count"]({"cuont": 5}, _ctx(tmp_path))

    @pytest.mark.anyio
    async def test_register_sinks(self, tmp_path: Path) -> None:
        """The tsv sink publishes one file per group on flush, once per key."""
        found: dict[str, Any] = {}
        _doc_hook("register_sinks")(register=found.__setitem__)
        rows = [
            batchd.ResultRow(key=k, custom_id=k, status="succeeded", pipeline="p", output=o)
            for k, o in (("a", "bug"), ("b", "other"), ("a", "bug"))
        ]
        async with found["tsv"]({"path": "out"}, _ctx(tmp_path)) as sink:
            await sink.open()
            await sink.put("p-000001-a1", rows)
            await sink.put("p-000001-a1", rows)  # a replayed put
            await sink.flush("p-000001-a1")
        assert [p.name for p in (tmp_path / "out").iterdir()] == ["p-000001-a1.tsv"]
        assert (tmp_path / "out" / "p-000001-a1.tsv").read_text() == "a\tbug\nb\tother\n"

    def test_register_commands(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """count-lines is added to the parser and prints the non-empty line count."""
        parser = argparse.ArgumentParser(prog="batchd")
        _doc_hook("register_commands")(cli=parser.add_subparsers())
        (tmp_path / "notes.txt").write_text("one\n\n two\nthree\n")
        args = parser.parse_args(["count-lines", str(tmp_path / "notes.txt")])
        assert args.func(args) == 0
        assert capsys.readouterr().out == "3\n"
        missing = parser.parse_args(["count-lines", str(tmp_path / "nope.txt")])
        with pytest.raises(batchd.ConfigError, match=r"cannot read .*nope"):
            missing.func(missing)

    def test_batchd_shape_request(self) -> None:
        """Long tickets get the larger model; other records and pipelines keep the template's."""
        hook = _doc_hook("batchd_shape_request")
        params = {"model": "claude-haiku-4-5", "max_tokens": 8, "messages": []}
        long = batchd.Record("t1", {"body": "x" * 2500}, {"line": 1})
        short = batchd.Record("t2", {"body": "short"}, {"line": 2})
        shaped = hook(pipeline="tickets", record=long, params=params)
        assert shaped == {**params, "model": "claude-sonnet-4-5", "max_tokens": 64}
        assert hook(pipeline="tickets", record=short, params=params) is None
        assert hook(pipeline="other", record=long, params=params) is None

    def test_batchd_parse_result(self) -> None:
        """Scores are normalised, bad answers raise InvalidOutput, other pipelines pass."""
        hook = _doc_hook("batchd_parse_result")
        assert hook(pipeline="sentiment", key="k", output="0.5", message={}) == "0.50"
        assert hook(pipeline="labels", key="k", output="great", message={}) is None
        with pytest.raises(batchd.InvalidOutput, match="expected a number"):
            hook(pipeline="sentiment", key="k", output="great", message={})
        with pytest.raises(batchd.InvalidOutput, match=r"outside -1\.\.1"):
            hook(pipeline="sentiment", key="k", output="7", message={})
