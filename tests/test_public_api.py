"""The public modules export what they promise (anyio's test_all_attributes)."""

from __future__ import annotations

import importlib

import pytest

PUBLIC = ("batchd",)


class TestAllAttributes:
    @pytest.mark.parametrize("name", PUBLIC)
    def test_all_is_a_complete_tuple(self, name: str) -> None:
        """Every public module has an ``__all__`` tuple whose names all resolve."""
        module = importlib.import_module(name)
        assert isinstance(module.__all__, tuple)
        for attr in module.__all__:
            assert hasattr(module, attr), f"{name}.{attr} missing"

    def test_batchd_reexports_plugin_contract(self) -> None:
        """A plugin author's one import exposes the same objects the engine uses."""
        import batchd
        from batchd.plugins import contract, hookspecs

        assert batchd.hookimpl is hookspecs.hookimpl
        assert batchd.Sink is contract.Sink
        # Every contract type a plugin can return or implement is in the facade: the
        # checklist says a plugin imports only batchd (SinkOutput was missing).
        for name in contract.__all__:
            assert getattr(batchd, name) is getattr(contract, name), name


def test_nothing_imports_the_folders_by_their_top_level_names() -> None:
    """Only ``batchd.*`` is installed: an ``import daemon`` would work here, in the checkout
    (the folder is on the path), and fail, or import python-daemon, once installed."""
    import re
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    files = subprocess.run(["git", "ls-files", "*.py"], capture_output=True, text=True,
                           cwd=repo, check=True).stdout.split()
    bare = re.compile(r"^\s*(from|import)\s+(daemon|connectors|plugins)\b", re.M)
    offenders = [f for f in files if bare.search((repo / f).read_text(encoding="utf-8"))]
    assert offenders == []


def test_dir_lists_every_public_name_before_first_use() -> None:
    """``dir(batchd)`` agrees with ``__all__`` in a fresh process, before ``FileSource``
    and ``PartFiles`` (imported on first use) were touched."""
    import subprocess
    import sys

    code = "import batchd; print(sorted(set(batchd.__all__) - set(dir(batchd))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
