"""``batchd --version`` and the generated bash/zsh completion, run in a real bash."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import anthropic
import pytest

from tests.fixtures.service import REPO

_BATCHD = [sys.executable, "-m", "batchd.daemon.cli"]


def _batchd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*_BATCHD, *args], capture_output=True, text=True, cwd=REPO,
                          timeout=60, check=False)


class TestVersion:
    def test_names_every_version(self) -> None:
        proc = _batchd("--version")
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert lines[0].startswith("batchd 0.")
        assert lines[1].startswith(f"Python {sys.version_info.major}.{sys.version_info.minor}")
        api = anthropic.Anthropic(api_key="x").default_headers["anthropic-version"]
        assert f"anthropic SDK {anthropic.__version__} (anthropic-version: {api})" in lines[2]
        assert "plugins: none installed" in proc.stdout  # BATCHD_LOAD_PLUGINS is empty here


def _complete(tmp_path: Path, *words: str) -> list[str]:
    """What bash offers for ``words`` (the last one being typed), from the real script."""
    script = tmp_path / "batchd.bash"
    script.write_text(_batchd("completion", "bash").stdout)
    line = " ".join(words)
    program = (
        f"source {script}\n"
        f"COMP_WORDS=({line})\n"
        f"COMP_CWORD={len(words) - 1}\n"
        "_batchd\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    proc = subprocess.run(["bash", "--norc", "-c", program], capture_output=True, text=True,
                          cwd=tmp_path, timeout=30, check=True)
    return proc.stdout.split()


class TestCompletion:
    def test_commands(self, tmp_path: Path) -> None:
        offered = set(_complete(tmp_path, "batchd", "''"))
        assert {"validate", "status", "show", "completion"} <= offered
        assert _complete(tmp_path, "batchd", "va") == ["validate"]

    def test_options_of_a_command(self, tmp_path: Path) -> None:
        assert set(_complete(tmp_path, "batchd", "validate", "--")) >= {"--connect", "--json"}

    def test_option_values(self, tmp_path: Path) -> None:
        assert _complete(tmp_path, "batchd", "run", "x.toml", "--log-level", "d") == ["debug"]
        assert _complete(tmp_path, "batchd", "dead-letters", "r") == ["retry"]

    def test_config_files(self, tmp_path: Path) -> None:
        (tmp_path / "pipeline.toml").write_text("")
        assert _complete(tmp_path, "batchd", "status", "pipe") == ["pipeline.toml"]

    def test_file_options_complete_files(self, tmp_path: Path) -> None:
        """Every option that takes a file offers files (the emulator's --models too)."""
        (tmp_path / "models.toml").write_text("")
        for option in ("--rules", "--models"):
            assert _complete(tmp_path, "batchd", "emulator", option, "mod") == ["models.toml"]

    @pytest.mark.parametrize("shell", ["bash", "zsh"])
    def test_script_parses(self, shell: str) -> None:
        """bash -n accepts both (zsh's is the bash function behind bashcompinit)."""
        script = _batchd("completion", shell).stdout
        if shell == "zsh":
            assert "bashcompinit" in script
            script = script.split("bashcompinit\n", 1)[1]
        subprocess.run(["bash", "-n"], input=script, text=True, check=True, timeout=30)
