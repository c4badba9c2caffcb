"""
The built wheel installs only ``batchd``, so it coexists with other distributions.

``python-daemon`` (a dependency of Apache Airflow, among others) installs a top-level
``daemon`` package; a batchd that installed one too would overwrite it without pip
noticing. The wheel is built from this checkout and installed into fresh virtual
environments beside python-daemon, in both orders.
"""

from __future__ import annotations

import os
import site
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300,
                          cwd=cwd)
    assert proc.returncode == 0, f"{args}: {proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """batchd's wheel, built from this checkout, and python-daemon's, from the index."""
    out = tmp_path_factory.mktemp("wheels")
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", out, REPO)
    _run(sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", out,
         "python-daemon>=3")
    (batchd,) = out.glob("batchd-*.whl")
    (python_daemon,) = out.glob("python_daemon-*.whl")
    yield batchd, python_daemon


def test_the_wheel_holds_only_the_batchd_package(wheels: tuple[Path, Path]) -> None:
    batchd, _ = wheels
    with zipfile.ZipFile(batchd) as wheel:
        tops = {name.split("/", 1)[0] for name in wheel.namelist()}
        names = set(wheel.namelist())
    assert {t for t in tops if not t.endswith(".dist-info")} == {"batchd"}
    # The data files and the typing marker travel with the code.
    assert {"batchd/py.typed", "batchd/daemon/models/catalog.toml",
            "batchd/daemon/ops/dashboard/style.css", "batchd/daemon/cli.py",
            "batchd/connectors/csv_source.py", "batchd/plugins/sinks/jsonl.py"} <= names


@pytest.mark.parametrize("order", ["python-daemon first", "batchd first"])
def test_installs_beside_python_daemon(
    tmp_path: Path, wheels: tuple[Path, Path], order: str
) -> None:
    """Both import afterwards, whichever came first, and ``batchd --help`` runs."""
    batchd, python_daemon = wheels
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv)
    py = venv / "bin" / "python"
    first, second = (python_daemon, batchd) if order == "python-daemon first" else (
        batchd, python_daemon)
    for wheel in (first, second):
        _run(py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel)
    # batchd's dependencies come from the test's own environment (appended to the path, so
    # the fresh venv's own packages, batchd and python-daemon, come first).
    site_dir = next(Path(p) for p in site.getsitepackages() if p.endswith("site-packages"))
    (venv_site,) = (venv / "lib").glob("python3*/site-packages")
    (venv_site / "zz_deps.pth").write_text(f"{site_dir}\n")
    probe = _run(py, "-c", (
        "import daemon, batchd, batchd.daemon.cli\n"
        "from daemon import DaemonContext\n"
        "print(daemon.__file__); print(batchd.__file__)"
    ), cwd=tmp_path)
    daemon_file, batchd_file = probe.stdout.split()
    assert daemon_file.startswith(str(venv_site / "daemon"))
    assert batchd_file.startswith(str(venv_site / "batchd"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([venv / "bin" / "batchd", "--help"], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "validate" in proc.stdout
    # Uninstalling batchd leaves python-daemon whole.
    _run(py, "-m", "pip", "uninstall", "-q", "-y", "batchd")
    _run(py, "-c", "from daemon import DaemonContext", cwd=tmp_path)
