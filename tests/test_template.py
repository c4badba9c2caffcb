"""Templates render record fields as a user would write them, and name what is missing."""

from __future__ import annotations

from pathlib import Path

import pytest

from batchd.daemon.config import load_config
from batchd.daemon.intake.shaper import ShapeError, Shaper
from batchd.daemon.intake.template import MissingField, Template
from batchd.plugins.records import Record

PIPELINE = """\
[[pipeline]]
name = "p"
[pipeline.source]
type = "jsonl"
path = "in.jsonl"
key = "id"
[pipeline.request]
model = "claude-haiku-4-5"
max_tokens = 8
user = "{body}"
[[pipeline.sink]]
type = "jsonl"
path = "out"
"""


class TestRender:
    @pytest.mark.parametrize(
        ("value", "text"),
        [
            ("plain", "plain"),
            (3, "3"),
            (2.5, "2.5"),
            (True, "true"),
            ({"nested": [1, 2], "ok": None}, '{"nested":[1,2],"ok":null}'),
            (["a", "é"], '["a","é"]'),
        ],
    )
    def test_values_render_as_json_not_python(self, value: object, text: str) -> None:
        """A JSON source's objects, arrays and booleans reach the prompt as JSON."""
        assert Template("v={v}").render({"v": value}) == f"v={text}"

    def test_column_names_as_spreadsheets_write_them(self) -> None:
        """CSV headers such as "Body Text", "ticket-id" or "2nd note" are field names too
        (they were refused as not "plain", leaving no way to use the column)."""
        template = Template("{Body Text} / {ticket-id} / {2nd note} / {é}")
        assert template.fields == ("Body Text", "ticket-id", "2nd note", "é")
        values = {"Body Text": "hi", "ticket-id": "T1", "2nd note": "n", "é": "e"}
        assert template.render(values) == "hi / T1 / n / e"

    @pytest.mark.parametrize("source", ["{a.b}", "{a[0]}", "{}", "{0}", "{ }"])
    def test_attribute_index_and_positional_fields_are_refused(self, source: str) -> None:
        with pytest.raises(ValueError, match="field name"):
            Template(source)

    def test_missing_and_null_fields_are_told_apart(self) -> None:
        with pytest.raises(MissingField, match="record has no field 'body'"):
            Template("{body}").render({})
        with pytest.raises(MissingField, match="field 'body' is null"):
            Template("{body}").render({"body": None})


def test_empty_user_message_is_a_shape_error(tmp_path: Path) -> None:
    """The API rejects empty content; the record is dead-lettered before any round trip."""
    (tmp_path / "p.toml").write_text(PIPELINE)
    shaper = Shaper(load_config(tmp_path / "p.toml").pipelines[0])
    assert shaper.params(Record("k", {"body": "hi"}, {}))["messages"][0]["content"] == "hi"
    for body in ("", "  \n"):
        with pytest.raises(ShapeError, match=r"user message is empty \(template '\{body\}'\)"):
            shaper.params(Record("k", {"body": body}, {}))
