"""
The README runs as written, on a fresh checkout, against the emulator.

* "Try it by hand" is executed line by line in bash in a copy of the repository that
  holds only what git would check out (no tickets.csv, no state), with the one
  substitution a test needs: the venv already exists, so its activation stands in
  for ``make .venv/.installed``; and a free port for 8765.
* ``make demo``'s program runs in that copy and prints what the README promises.
* The configuration shown in the README is the example file, key for key.
* The service recipe: the files it installs exist, the config it installs passes
  ``batchd validate`` once its absolute paths are moved under a temporary root, and
  writes only where the unit's sandbox allows (``systemd-analyze verify`` of the
  unit itself is in test_systemd_units).
* Every ``batchd …`` line in a shell block of README.md, docs/ and the examples'
  READMEs that cannot run here (systemd, root, PostgreSQL, Kafka) is parsed by the
  real command-line parser, so no document shows a command or flag that does not
  exist.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from batchd.daemon.cli import build_parser
from tests.fixtures.service import REPO, free_port

VENV_BIN = Path(sys.executable).parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")),
        *sorted(REPO.glob("examples/*/README.md"))]


def blocks(path: Path, languages: tuple[str, ...] = ("sh", "bash", "console")) -> list[str]:
    """The fenced code blocks of ``path`` in ``languages``."""
    found, current, language = [], None, ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            if current is None:
                language, current = line[3:].strip(), []
            else:
                if language in languages:
                    found.append("\n".join(current))
                current = None
        elif current is not None:
            current.append(line)
    return found


def section(path: Path, heading: str) -> str:
    text = path.read_text(encoding="utf-8")
    start = text.index(f"## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start: end if end != -1 else None]


def first_block(text: str, language: str) -> str:
    match = re.search(rf"```{language}\n(.*?)```", text, re.S)
    assert match, f"no ```{language} block"
    return match.group(1)


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What a fresh clone holds: the files git tracks (or would), nothing generated."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], cwd=REPO, capture_output=True, check=True)
    root = tmp_path_factory.mktemp("checkout")
    for name in filter(None, listed.stdout.decode().split("\0")):
        source = REPO / name
        if source.is_file():
            target = root / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    assert not (root / "examples" / "tickets" / "tickets.csv").exists()
    return root


def _env() -> dict[str, str]:
    drop = ("ANTHROPIC_", "BATCHD_CRASH", "NOTIFY_SOCKET", "WATCHDOG_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["BATCHD_LOAD_PLUGINS"] = ""
    env["COLUMNS"] = "120"
    return env


class TestReadmeRuns:
    def test_try_it_by_hand(self, checkout: Path) -> None:
        script = first_block(section(REPO / "README.md", "Try it by hand"), "sh")
        lines = script.splitlines()
        assert lines[0].startswith("make .venv/.installed && . .venv/bin/activate")
        lines[0] = f"export PATH={shlex.quote(str(VENV_BIN))}:$PATH   # the venv exists already"
        port = str(free_port())
        program = "set -euo pipefail\n" + "\n".join(lines).replace("8765", port)
        proc = subprocess.run(["bash", "-c", program], cwd=checkout, env=_env(),
                              capture_output=True, text=True, timeout=240)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-6000:]
        assert "OK: examples/tickets/pipeline.toml" in out
        assert "3,002 of 3,002 rows terminal" in out, out[-3000:]
        assert "T0000042  (pipeline tickets)" in out and "outcome:    succeeded" in out
        assert "2 dead letters" in out
        assert "invalid_output" not in out  # --rules is there: every label is allowed

    def test_make_demo(self, checkout: Path) -> None:
        """What `make demo` runs, in the fresh copy (make would only add the venv)."""
        makefile = (REPO / "Makefile").read_text()
        assert "$(BIN)/python -m examples.demo" in makefile
        proc = subprocess.run([sys.executable, "-m", "examples.demo"], cwd=checkout,
                              env=_env(), capture_output=True, text=True, timeout=240)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-6000:]
        assert "every row has exactly one outcome" in out
        assert "three answers" in out
        assert len(re.findall(r"│ T\d{7} │", out)) >= 3
        assert re.search(r"a dead letter: \S+ → \w+: ", out)
        assert "dashboard while it runs: http://127.0.0.1:" in out

    def test_config_shown_is_the_example(self) -> None:
        shown = first_block(section(REPO / "README.md", "Configuration"), "toml")
        real = (REPO / "examples" / "tickets" / "pipeline.toml").read_text()
        assert tomllib.loads(shown) == tomllib.loads(real)


class TestServiceRecipe:
    recipe = first_block(section(REPO / "README.md", "Running it as a service"), "sh")

    def test_installed_files_exist(self) -> None:
        for name in re.findall(r"(?<![\w/])(?:systemd|examples)/[\w./-]+", self.recipe):
            assert (REPO / name).is_file(), name
        unit = (REPO / "systemd" / "batchd.service").read_text()
        assert "${CONFIGURATION_DIRECTORY}/batchd.toml" in unit
        assert "/etc/batchd/batchd.toml" in self.recipe  # ConfigurationDirectory=batchd

    def test_config_writes_only_where_the_sandbox_allows(self) -> None:
        config = tomllib.loads((REPO / "examples" / "tickets" / "service.toml").read_text())
        state = Path(config["state_dir"])
        assert state == Path("/var/lib/batchd")  # StateDirectory=batchd
        (pipeline,) = config["pipeline"]
        for spec in (*pipeline["sink"], pipeline["dead_letter"]):
            path = Path(spec["path"])
            assert path.is_absolute() and path.is_relative_to(state), spec
        source = Path(pipeline["source"]["path"])
        assert source.is_absolute()
        assert not source.is_relative_to("/home") and not source.is_relative_to("/root")
        assert f"/srv/batchd/{source.name}" in self.recipe  # the recipe puts the input there

    def test_recipe_config_validates(self, tmp_path: Path) -> None:
        """The recipe's steps with /etc, /srv and /var/lib moved under tmp_path."""
        root = tmp_path / "root"
        text = (REPO / "examples" / "tickets" / "service.toml").read_text()
        text = text.replace("/var/lib/batchd", str(root / "var/lib/batchd"))
        text = text.replace("/srv/batchd", str(root / "srv/batchd"))
        etc = root / "etc" / "batchd"
        etc.mkdir(parents=True)
        (etc / "batchd.toml").write_text(text.replace("port = 9464", f"port = {free_port()}"))
        generate = next(line for line in self.recipe.splitlines() if "generate.py" in line)
        command = shlex.split(generate.split("&&", 1)[1].replace("sudo ", ""))
        command = [sys.executable if c == "python3" else c for c in command]
        command = [str(root / c.lstrip("/")) if c.startswith("/srv/") else c for c in command]
        (root / "srv" / "batchd").mkdir(parents=True)
        subprocess.run(command, cwd=REPO, check=True, timeout=60)
        proc = subprocess.run([sys.executable, "-m", "batchd.daemon.cli", "validate",
                               str(etc / "batchd.toml")], cwd=REPO, env=_env(),
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "warning" not in proc.stdout
        assert not (root / "var").exists()  # validate created nothing


# A plugin's own command exists only once that plugin is installed.
_PLUGIN_DOCS = ("examples/batchd-plugin-example/README.md",)


def _batchd_lines() -> Iterator[tuple[str, str]]:
    for path in DOCS:
        where = str(path.relative_to(REPO))
        if where in _PLUGIN_DOCS:
            continue
        for block in blocks(path):
            joined = block.replace("\\\n", " ")
            for line in joined.splitlines():
                line = line.strip().removeprefix("$ ")
                command = re.match(r"^(?:sudo\s+)?(?:\S*/)?batchd(\s.*)$", line)
                run_as = re.match(r"^systemd-run\b.*?\S*/bin/batchd(\s.*)$", line)
                found = command or run_as
                if found:
                    yield where, "batchd" + found.group(1)


DOC_COMMANDS = list(_batchd_lines())


def test_docs_show_commands() -> None:
    assert len(DOC_COMMANDS) > 30


@pytest.mark.parametrize(("where", "line"), DOC_COMMANDS,
                         ids=[f"{w}:{line[:50]}" for w, line in DOC_COMMANDS])
def test_every_documented_command_parses(where: str, line: str) -> None:
    """The real parser accepts it: no stale subcommand or flag in any document."""
    command = re.split(r"\s(?:\||&&|&|>|2>)\s?", line.split(" #", 1)[0] + " ")[0]
    words = shlex.split(command, posix=True)
    parser = build_parser()
    if words[1:] in (["--version"], ["--help"], ["-h"]):
        return
    try:
        parser.parse_args(words[1:])
    except SystemExit as exc:
        pytest.fail(f"{where}: `{line}` does not parse (exit {exc.code})")
