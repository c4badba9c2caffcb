"""
The shipped unit files, checked by systemd's own tools.

``systemd-analyze verify`` refuses a unit whose ExecStart binary does not exist, and
``/opt/batchd/venv/bin/batchd`` exists only on an installed host. The verify tests copy
the unit to a temp dir with that one path pointed at a real executable and prove that
nothing else changed; the security score is taken from the shipped file as it is.
"""

from __future__ import annotations

import configparser
import ctypes
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SYSTEMD_DIR = Path(__file__).resolve().parent.parent / "systemd"
UNITS = ("batchd.service", "batchd@.service")
SHIPPED_BINARY = "/opt/batchd/venv/bin/batchd"
MAX_EXPOSURE = 2.0

ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def _service_section(unit: str) -> dict[str, list[str]]:
    """Parse [Service] keeping repeated keys (systemd allows them; configparser does not)."""
    values: dict[str, list[str]] = {}
    section = ""
    for raw in (SYSTEMD_DIR / unit).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        if section == "Service":
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def _verifiable_copy(unit: str, tmp_path: Path) -> Path:
    """Copy ``unit`` with only the ExecStart binary swapped for an existing executable."""
    stub = tmp_path / "bin" / "batchd"
    stub.parent.mkdir()
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    original = (SYSTEMD_DIR / unit).read_text()
    rewritten = original.replace(SHIPPED_BINARY, str(stub))
    changed = [
        (a, b)
        for a, b in zip(original.splitlines(), rewritten.splitlines(), strict=True)
        if a != b
    ]
    assert [a.split("=", 1)[0] for a, _ in changed] == ["ExecStart"], changed
    name = "batchd@verify.service" if unit.endswith("@.service") else unit
    target_dir = tmp_path / "units"
    target_dir.mkdir()
    (target_dir / unit).write_text(rewritten)
    return target_dir / name


def _exposure(unit: str) -> float:
    assert ANALYZE is not None
    proc = subprocess.run(
        [ANALYZE, "security", "--offline=yes", "--no-pager", str(SYSTEMD_DIR / unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert match, f"no exposure line in output:\n{proc.stdout}\n{proc.stderr}"
    return float(match.group(1))


class TestUnitContents:
    """What the engine and the operator guide rely on is in both units."""

    @pytest.mark.parametrize("unit", UNITS)
    def test_notify_and_watchdog_settings(self, unit: str) -> None:
        """Type=notify with a watchdog, restart on failure and a 90 s stop budget."""
        service = _service_section(unit)
        expected = {
            "Type": "notify",
            "NotifyAccess": "main",
            "WatchdogSec": "60",
            "Restart": "on-failure",
            "RestartSec": "5",
            "TimeoutStopSec": "90",
            "ExecReload": "/bin/kill -HUP $MAINPID",
        }
        assert {k: service[k][-1] for k in expected} == expected

    @pytest.mark.parametrize("unit", UNITS)
    def test_execstart_passes_config_and_state_dir(self, unit: str) -> None:
        """ExecStart runs the venv's batchd with the config and --state-dir from systemd."""
        config = "%i.toml" if "@" in unit else "batchd.toml"
        (exec_start,) = _service_section(unit)["ExecStart"]
        assert exec_start == (
            f"{SHIPPED_BINARY} run ${{CONFIGURATION_DIRECTORY}}/{config}"
            " --state-dir ${STATE_DIRECTORY}"
        )

    @pytest.mark.parametrize("unit", UNITS)
    def test_credential_and_env_file(self, unit: str) -> None:
        """The API key comes from LoadCredential=; the env file is optional (leading '-')."""
        service = _service_section(unit)
        assert service["LoadCredential"] == [
            "anthropic-api-key:/etc/batchd/credentials/anthropic-api-key"
        ]
        assert service["EnvironmentFile"] == ["-/etc/batchd/batchd.env"]

    @pytest.mark.parametrize("unit", UNITS)
    def test_config_errors_are_not_restarted(self, unit: str) -> None:
        """The CLI's config-error exit code stops systemd's restart loop."""
        from batchd.daemon.cli import EXIT_CONFIG

        assert _service_section(unit)["RestartPreventExitStatus"] == [str(EXIT_CONFIG)]

    def test_template_state_is_per_instance(self) -> None:
        """Each template instance keeps its own state directory."""
        assert _service_section("batchd@.service")["StateDirectory"] == ["batchd/%i"]
        assert _service_section("batchd.service")["StateDirectory"] == ["batchd"]

    @pytest.mark.parametrize("unit", UNITS)
    def test_egress_is_not_denied_by_default(self, unit: str) -> None:
        """The daemon must reach the API and databases, so no IP deny list ships enabled."""
        assert "IPAddressDeny" not in _service_section(unit)

    def test_units_differ_only_in_instance_parts(self) -> None:
        """The template is the plain unit with the instance name threaded through."""
        plain = configparser.ConfigParser(strict=False, interpolation=None)
        plain.optionxform = str  # type: ignore[assignment,method-assign]
        template = configparser.ConfigParser(strict=False, interpolation=None)
        template.optionxform = str  # type: ignore[assignment,method-assign]
        plain.read(SYSTEMD_DIR / "batchd.service")
        template.read(SYSTEMD_DIR / "batchd@.service")
        differing = {
            key
            for key in plain["Service"]
            if plain["Service"][key] != template["Service"].get(key)
        }
        assert differing == {"ExecStart", "StateDirectory"}


@needs_analyze
class TestSystemdAnalyze:
    """systemd's own checks pass on the shipped units."""

    @pytest.mark.parametrize("unit", UNITS)
    def test_verify_is_clean(self, unit: str, tmp_path: Path) -> None:
        """`systemd-analyze verify` exits 0 and prints no warning."""
        assert ANALYZE is not None
        path = _verifiable_copy(unit, tmp_path)
        proc = subprocess.run(
            [ANALYZE, "verify", "--man=no", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "" and proc.stderr.strip() == "", proc.stderr

    def test_verify_catches_a_broken_unit(self, tmp_path: Path) -> None:
        """A misspelt directive makes verify complain, so a clean verify means something."""
        assert ANALYZE is not None
        path = _verifiable_copy("batchd.service", tmp_path)
        path.write_text(path.read_text().replace("ProtectHome=yes", "ProtectHomes=yes"))
        proc = subprocess.run(
            [ANALYZE, "verify", "--man=no", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert "ProtectHomes" in proc.stderr

    @pytest.mark.parametrize("unit", UNITS)
    def test_security_exposure_is_low(self, unit: str) -> None:
        """`systemd-analyze security --offline=yes` rates the unit at 2.0 or below."""
        assert _exposure(unit) <= MAX_EXPOSURE

    def test_tmpfiles_creates_a_root_only_credentials_dir(self, tmp_path: Path) -> None:
        """The tmpfiles snippet makes /etc/batchd/credentials mode 0700."""
        tmpfiles = shutil.which("systemd-tmpfiles")
        if tmpfiles is None:
            pytest.skip("systemd-tmpfiles is not installed")
        subprocess.run(
            [tmpfiles, "--create", f"--root={tmp_path}", str(SYSTEMD_DIR / "batchd.tmpfiles")],
            check=True,
            capture_output=True,
            timeout=60,
        )
        mode = (tmp_path / "etc/batchd/credentials").stat().st_mode & 0o777
        assert mode == 0o700


PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1

_MDWE_PROBE = f"""
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0:
    sys.exit(77)
import mmap
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
except OSError:
    pass
else:
    sys.exit(3)  # the guard is not in force: the probe proves nothing
import ssl, asyncio
import anyio, orjson, structlog, prometheus_client, httpx2, anthropic, asyncpg, aiokafka
ssl.create_default_context()
async def main():
    await anyio.sleep(0)
    return orjson.dumps({{"ok": True}})
print(anyio.run(main).decode())
"""


class TestMemoryDenyWriteExecute:
    """CPython and batchd's libraries run with writable-executable memory refused."""

    def test_dependencies_import_and_run_under_mdwe(self) -> None:
        """Under the kernel's MDWE guard (as MemoryDenyWriteExecute= does) all imports work."""
        if not hasattr(ctypes, "CDLL") or sys.platform != "linux":
            pytest.skip("needs Linux prctl")
        proc = subprocess.run(
            [sys.executable, "-c", _MDWE_PROBE],
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        )
        if proc.returncode == 77:
            pytest.skip("kernel lacks PR_SET_MDWE (Linux < 6.3)")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == '{"ok":true}'
