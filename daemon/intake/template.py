"""
``{field}`` templates for custom_ids, models and user messages.

Field names are plain (any column header, but no ``{a.b}`` or ``{a[0]}``): the config
is compiled once, and a record missing a field is that record's error, never
the pipeline's.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from typing import Any

import orjson

__all__ = ("MissingField", "Template")


class MissingField(KeyError):
    """A record lacks a field its template needs (dead-lettered with the field's name)."""

    def __init__(self, field: str, *, null: bool = False) -> None:
        super().__init__(field)
        self.field = field
        self.null = null

    def __str__(self) -> str:
        if self.null:
            return f"field {self.field!r} is null (used by the request template)"
        return f"record has no field {self.field!r} (used by the request template)"


def _text(value: Any) -> str:
    """A field value as template text: objects, arrays and booleans as JSON, not Python."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict | list | bool):
        return orjson.dumps(value).decode()
    return str(value)


def _plain(name: str) -> bool:
    """
    A field name as sources write them: any column header ("Body Text", "ticket-id", "é"),
    but no attribute or index access and no positional ``{}``/``{0}``; the value is looked
    up by the exact name, never through ``str.format``.
    """
    return bool(name.strip()) and not name.isdigit() and not any(c in name for c in ".[]")


class Template:
    """A compiled template; ``render`` joins literals and field values."""

    __slots__ = ("_parts", "fields", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        parts: list[tuple[str, str | None]] = []
        fields: list[str] = []
        for literal, name, spec, conversion in string.Formatter().parse(source):
            if name is not None:
                if not _plain(name):
                    raise ValueError(f"template {source!r}: {{{name}}} must be a plain field "
                                     "name (no '.', '[', ']', not blank or a bare number)")
                if spec or conversion:
                    raise ValueError(f"template {source!r}: format specs are not supported")
                fields.append(name)
            parts.append((literal, name))
        self._parts = tuple(parts)
        self.fields = tuple(fields)

    @property
    def is_constant(self) -> bool:
        return not self.fields

    def render(self, values: Mapping[str, Any], key: str | None = None) -> str:
        """Fill in ``values``; ``{key}`` falls back to ``key`` when the values lack one."""
        out: list[str] = []
        for literal, name in self._parts:
            out.append(literal)
            if name is not None:
                try:
                    value = values[name]
                except KeyError:
                    if name != "key" or key is None:
                        raise MissingField(name) from None
                    value = key
                if value is None:
                    raise MissingField(name, null=True)
                out.append(value if isinstance(value, str) else _text(value))
        return "".join(out)

    def __repr__(self) -> str:
        return f"Template({self.source!r})"
