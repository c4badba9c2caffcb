"""
A third party's source and sink types declared by entry point name (groups
``batchd.sources`` and ``batchd.sinks``) are imported only when a pipeline uses them:
``batchd --help``, ``batchd plugins`` and a pipeline of other types never import the
plugin's module, while ``batchd plugins`` still lists its types and package.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

_MODULE = '''
import os
from pathlib import Path

import batchd

Path(os.environ["ACME_MARKER"]).write_text("imported")


class Lines(batchd.FileSource):
    what = "acme-lines source"

    def __init__(self, options, context):
        opts = batchd.Options(options, context, what=self.what)
        super().__init__(opts.path("path"), context, label=opts.text("path"))
        opts.finish()

    def parse_line(self, raw, line):
        text = raw.decode().strip()
        return batchd.Record(text, {"text": text}, self.position(line)) if text else None
'''

_CONFIG = '''state_dir = "state"
[[pipeline]]
name = "p"
[pipeline.source]
{source}
[pipeline.request]
model = "claude-haiku-4-5"
max_tokens = 8
user = "{{text}}"
[[pipeline.sink]]
type = "jsonl"
path = "out"
'''


def _install(site: Path, module: str = _MODULE) -> None:
    """A distribution as pip leaves it: the module and its dist-info with entry points."""
    site.mkdir(parents=True, exist_ok=True)
    (site / "acme_lazy.py").write_text(module)
    info = site / "acme_lazy-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-lazy\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(
        "[batchd.sources]\nacme-lines = acme_lazy:Lines\n\n"
        "[batchd.sinks]\nacme-gone = acme_lazy:Gone\n")


def _batchd(tmp: Path, *args: str, allow: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "BATCHD_LOAD_PLUGINS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp / "site"),
                                                      env.get("PYTHONPATH")]))
    env["ACME_MARKER"] = str(tmp / "marker")
    if allow is not None:
        env["BATCHD_LOAD_PLUGINS"] = allow
    return subprocess.run([sys.executable, "-m", "batchd.daemon.cli", *args], cwd=tmp,
                          capture_output=True, text=True, env=env, timeout=60)


def test_declared_types_are_imported_only_when_used(tmp_path: Path) -> None:
    _install(tmp_path / "site")
    (tmp_path / "in.txt").write_text("a\nb\n")
    (tmp_path / "csv.toml").write_text(_CONFIG.format(
        source='type = "csv"\npath = "in.csv"\nkey = "text"'))
    (tmp_path / "in.csv").write_text("text\na\n")
    (tmp_path / "acme.toml").write_text(_CONFIG.format(
        source='type = "acme-lines"\npath = "in.txt"'))
    for args in (("--help",), ("plugins",), ("plugins", "--json"), ("status", "csv.toml"),
                 ("validate", "csv.toml")):
        run = _batchd(tmp_path, *args)
        assert run.returncode == 0, (args, run.stderr)
        assert not (tmp_path / "marker").exists(), args
    listed = _batchd(tmp_path, "plugins").stdout
    assert listed.splitlines()[:3] == ["acme-lazy  (acme-lazy 0.1.0)",
                                       "  sources: acme-lines", "  sinks:   acme-gone"]
    run = _batchd(tmp_path, "validate", "acme.toml")
    assert run.returncode == 0, run.stdout + run.stderr
    assert (tmp_path / "marker").exists()


def test_allow_list_names_the_distribution(tmp_path: Path) -> None:
    _install(tmp_path / "site")
    (tmp_path / "acme.toml").write_text(_CONFIG.format(
        source='type = "acme-lines"\npath = "in.txt"'))
    run = _batchd(tmp_path, "validate", "acme.toml", allow="")
    assert run.returncode == 2
    assert "unknown source type 'acme-lines'" in run.stdout + run.stderr
    run = _batchd(tmp_path, "plugins", allow="acme-lazy")
    assert "acme-lazy  (acme-lazy 0.1.0)" in run.stdout


def _validate_with_the_gone_sink(tmp: Path) -> subprocess.CompletedProcess[str]:
    """``batchd validate`` of a pipeline writing to the ``acme-gone`` sink; exit 2."""
    (tmp / "in.txt").write_text("a\n")
    (tmp / "gone.toml").write_text(_CONFIG.format(
        source='type = "acme-lines"\npath = "in.txt"').replace(
        'type = "jsonl"\npath = "out"', 'type = "acme-gone"'))
    run = _batchd(tmp, "validate", "gone.toml")
    assert run.returncode == 2, run.stdout + run.stderr
    return run


def test_a_declared_type_that_cannot_be_imported_names_it(tmp_path: Path) -> None:
    """The broken class is one line naming the type, its module and package; exit 2."""
    _install(tmp_path / "site")
    run = _validate_with_the_gone_sink(tmp_path)
    assert ("the acme-gone sink (acme_lazy:Gone, acme-lazy 0.1.0) cannot be imported: "
            "AttributeError: module 'acme_lazy' has no attribute 'Gone'") in run.stdout
    assert "Traceback" not in run.stdout + run.stderr


def test_beside_a_hook_module_of_the_same_name_and_without_a_class(tmp_path: Path) -> None:
    """A distribution with hooks (group ``batchd``, named like it) keeps its declared types
    too; a declared entry point without ``:Class`` is one line saying how to write it."""
    site = tmp_path / "site"
    _install(site)
    (site / "acme_hooks.py").write_text(
        "import batchd\n\n@batchd.hookimpl\ndef batchd_parse_result(output):\n    return None\n")
    points = site / "acme_lazy-0.1.0.dist-info" / "entry_points.txt"
    points.write_text("[batchd]\nacme-lazy = acme_hooks\n\n" + points.read_text().replace(
        "acme-gone = acme_lazy:Gone", "acme-gone = acme_lazy"))
    listed = _batchd(tmp_path, "plugins").stdout
    assert "acme-lazy  (acme-lazy 0.1.0)\n  hooks:   batchd_parse_result" in listed
    assert "acme-lazy (types)  (acme-lazy 0.1.0)\n  sources: acme-lines" in listed
    run = _validate_with_the_gone_sink(tmp_path)
    assert ("the acme-gone sink (acme-lazy 0.1.0): its entry point names no class; write "
            "it as 'acme_lazy:ClassName'") in run.stdout
