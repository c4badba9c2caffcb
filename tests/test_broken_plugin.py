"""
An installed plugin that cannot be imported (a missing dependency of its own) is one
line naming the plugin and its distribution, exit 2, for every command: before, each
``batchd`` command, ``--help`` included, ended in the plugin's traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def _install_broken(site: Path) -> None:
    """A distribution as pip leaves it: the module and its dist-info with the entry point."""
    (site / "acme_broken").mkdir(parents=True)
    (site / "acme_broken" / "__init__.py").write_text("import acme_dependency_not_installed\n")
    info = site / "acme_broken-0.3.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-broken\nVersion: 0.3.0\n")
    (info / "entry_points.txt").write_text("[batchd]\nacme = acme_broken\n")


def _batchd(site: Path, *args: str, allow: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "BATCHD_LOAD_PLUGINS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    if allow is not None:
        env["BATCHD_LOAD_PLUGINS"] = allow
    return subprocess.run([sys.executable, "-m", "batchd.daemon.cli", *args],
                          capture_output=True, text=True, env=env, timeout=60)


def test_a_plugin_that_cannot_be_imported_is_one_line(tmp_path: Path) -> None:
    _install_broken(tmp_path)
    for args in (("--help",), ("plugins",)):
        run = _batchd(tmp_path, *args)
        assert run.returncode == 2, run.stderr
        assert run.stderr.strip() == (
            "batchd: config error: plugin 'acme' (acme-broken 0.3.0) cannot be imported: "
            "ModuleNotFoundError: No module named 'acme_dependency_not_installed'; reinstall "
            "or uninstall acme-broken, or leave it out of BATCHD_LOAD_PLUGINS")
    run = _batchd(tmp_path, "plugins", allow="")  # left out: batchd works without it
    assert run.returncode == 0, run.stderr
    assert "acme" not in run.stdout
