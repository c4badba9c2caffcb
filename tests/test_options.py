"""
``batchd.Options``, the option reader every built-in connector and the engine's own
config use: typed getters, required keys, "did you mean", and file/table/key in
every message (and in the error's fields, for ``batchd validate --json``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import batchd
from batchd.daemon.config import load_config

CONTEXT = batchd.PluginContext(
    pipeline="notes", state_dir=Path("/srv/state"), config_dir=Path("/etc/batchd"),
    config_file=Path("/etc/batchd/pipeline.toml"), table="[pipeline.source] of 'notes'",
)
WHERE = "/etc/batchd/pipeline.toml: [pipeline.source] of 'notes'"


def _opts(**data: Any) -> batchd.Options:
    return batchd.Options(data, CONTEXT, what="notes source")


class TestGetters:
    def test_values_and_defaults(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Each getter returns the typed value, or its default when the key is absent."""
        monkeypatch.setenv("BATCHD_TEST_TOPIC", "tickets")
        opts = _opts(name="n", batch=5, ratio=1, on=False, wait="500ms", path="in/a.txt",
                     mode="prefix", names="one", topic="env:BATCHD_TEST_TOPIC")
        assert opts.text("name") == "n"
        assert opts.integer("batch", 1, min=1, max=10) == 5
        assert opts.number("ratio", 0.5) == 1.0 and isinstance(opts.number("ratio"), float)
        assert opts.flag("on", True) is False
        assert opts.duration("wait", 1.0) == 0.5
        assert opts.path("path") == Path("/etc/batchd/in/a.txt")
        assert opts.choice("mode", ("hash", "prefix"), "hash") == "prefix"
        assert opts.strings("names", None, single=True) == ["one"]
        assert opts.text("topic", env=True) == "tickets"
        assert opts.integer("absent", 7) == 7 and opts.text("missing", None) is None
        assert opts.finish() == {}

    @pytest.mark.parametrize(
        ("data", "read", "message"),
        [
            ({}, lambda o: o.text("path"), "path: is required"),
            ({"batch": 0}, lambda o: o.integer("batch", 1, min=1),
             "batch: must be a positive integer, got 0"),
            ({"batch": True}, lambda o: o.integer("batch", 1, min=1),
             "batch: must be a positive integer, got True"),
            ({"n": 11}, lambda o: o.integer("n", 1, min=1, max=10),
             "n: must be an integer between 1 and 10, got 11"),
            ({"r": "x"}, lambda o: o.number("r", 1.0), "r: must be a number, got 'x'"),
            ({"on": "yes"}, lambda o: o.flag("on", False), "on: must be true or false, got 'yes'"),
            ({"wait": "soon"}, lambda o: o.duration("wait", 1.0),
             "wait: expected a duration like '500ms', '30s' or '24h', got 'soon'"),
            ({"mode": "prefx"}, lambda o: o.choice("mode", ("hash", "prefix"), "hash"),
             "mode: must be one of hash, prefix, got 'prefx' (did you mean 'prefix'?)"),
            ({"names": []}, lambda o: o.strings("names", None),
             "names: must be a non-empty list of strings, got []"),
            ({"cols": ["a", "b", "a"]}, lambda o: o.strings("cols", None, unique=True),
             "cols: names 'a' twice"),
            ({"cols": ["a", "c"]}, lambda o: o.strings("cols", None, choices=("a", "b")),
             "cols: 'c' is not one of a, b"),
            ({"name": ""}, lambda o: o.text("name"), "name: must be a non-empty string, got ''"),
            ({"topic": "env:BATCHD_TEST_UNSET"}, lambda o: o.text("topic", env=True),
             "topic: names environment variable 'BATCHD_TEST_UNSET', which is not set"),
        ],
    )
    def test_mistakes_name_file_table_and_key(
        self, data: dict[str, Any], read: Any, message: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Every mistake is one ConfigError: file, table, key, then what is wrong."""
        monkeypatch.delenv("BATCHD_TEST_UNSET", raising=False)
        with pytest.raises(batchd.ConfigError) as caught:
            read(_opts(**data))
        assert str(caught.value) == f"{WHERE}: {message}"
        key = message.split(":", 1)[0]
        assert (caught.value.file, caught.value.table, caught.value.key) == (
            "/etc/batchd/pipeline.toml", "[pipeline.source] of 'notes'", key)

    def test_secret_is_never_echoed(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A secret of the wrong type is named by key and type, not by value."""
        monkeypatch.setenv("BATCHD_TEST_TOKEN", "s3cret-token-value")
        assert _opts(token="env:BATCHD_TEST_TOKEN").secret("token") == "s3cret-token-value"
        with pytest.raises(batchd.ConfigError) as caught:
            _opts(token=["s3cret-token-value"]).secret("token")
        assert "s3cret" not in str(caught.value) and "token: must be" in str(caught.value)


class TestUnknownKeys:
    def test_finish_suggests_the_closest_key(self) -> None:
        """A key no getter read is refused with the closest valid one and the full list."""
        opts = _opts(path="a", bacth=5)
        opts.text("path")
        opts.integer("batch", 1000)
        with pytest.raises(batchd.ConfigError) as caught:
            opts.finish()
        assert str(caught.value) == (f"{WHERE}: bacth: unknown option (did you mean 'batch'?); "
                                     "valid options: batch, path")
        assert caught.value.hint == "did you mean 'batch'?"

    def test_a_misspelt_required_key_is_named_at_once(self) -> None:
        """``pth`` for a required ``path`` is pointed out where ``path`` is found missing."""
        with pytest.raises(batchd.ConfigError, match=r"path: is required \(did you mean "
                                                     r"'path' instead of 'pth'\?\)"):
            _opts(pth="a").text("path")

    def test_without_a_context_the_plugin_is_named(self) -> None:
        """Built by hand (a test), messages start with ``what``."""
        with pytest.raises(batchd.ConfigError, match=r"^notes source: batch: must be"):
            batchd.Options({"batch": "x"}, what="notes source").integer("batch", 1)

    def test_not_a_table(self) -> None:
        """An option table that is not a table says so, naming where it is."""
        with pytest.raises(batchd.ConfigError) as caught:
            batchd.Options([1], CONTEXT)
        assert str(caught.value) == f"{WHERE} must be a table, got list"


def test_a_plugin_option_mistake_through_the_engine(tmp_path: Path) -> None:
    """Built from a config file, a built-in sink's message carries the engine's location."""
    from batchd.daemon.factories import build_sink

    (tmp_path / "t.csv").write_text("id,body\n1,x\n")
    (tmp_path / "pipeline.toml").write_text(
        '[[pipeline]]\nname = "notes"\n[pipeline.source]\ntype = "csv"\npath = "t.csv"\n'
        'key = "id"\n[pipeline.request]\nmodel = "claude-haiku-4-5"\nmax_tokens = 8\n'
        'user = "{body}"\n[[pipeline.sink]]\ntype = "jsonl"\npath = "out"\nfeilds = ["key"]\n')
    config = load_config(tmp_path / "pipeline.toml")
    pipeline = config.pipeline("notes")
    with pytest.raises(batchd.ConfigError) as caught:
        build_sink(config, "notes", pipeline.sinks[0])
    assert str(caught.value) == (
        f"{tmp_path / 'pipeline.toml'}: [[pipeline.sink]] #1 of 'notes': feilds: unknown option "
        "(did you mean 'fields'?); valid options: fields, mode, path")
