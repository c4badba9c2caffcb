"""
A small JSON document valid against a JSON Schema: what a structured reply says.

With ``output_config.format`` the API constrains the reply to the schema (SO),
so a client parses it without a fallback; the emulator must give the same
guarantee without a model. It builds the minimal instance: required
properties only, ``minItems`` items, the lowest allowed number, enum members
(the reply rule's text when it is one), and canned values for string formats.
It covers the subset structured outputs accept (objects, arrays, enums,
``anyOf``, ``$ref``/``$defs``, string formats, ``pattern``: a short match is
built from the pattern's parse tree); a pattern with back-references or
look-arounds that no guess satisfies is the one case left to a rule's ``json``.
"""

from __future__ import annotations

import math
import re
from typing import Any

__all__ = ("schema_instance",)

_FORMATS = {
    "date-time": "2026-01-01T00:00:00Z",
    "date": "2026-01-01",
    "time": "00:00:00Z",
    "duration": "P1D",
    "email": "user@example.com",
    "idn-email": "user@example.com",
    "hostname": "example.com",
    "idn-hostname": "example.com",
    "ipv4": "192.0.2.1",
    "ipv6": "2001:db8::1",
    "uri": "https://example.com/",
    "iri": "https://example.com/",
    "uri-reference": "https://example.com/",
    "uuid": "00000000-0000-4000-8000-000000000000",
}
_PATTERN_TRIES = ("a", "A", "0", "a0", "aa", "00", "A0", "x", "a-a", "a_a", "")
_MAX_DEPTH = 32


def schema_instance(schema: Any, hint: str | None = None) -> Any:
    """A minimal instance of ``schema``; ``hint`` is the text to use where a string fits."""
    return _Builder(schema, hint).build(schema, 0, 0)


class _Builder:
    def __init__(self, root: Any, hint: str | None) -> None:
        self.root = root
        self.hint = hint

    def resolve(self, ref: str) -> Any:
        if not ref.startswith("#"):
            return {}
        node: Any = self.root
        for part in ref[1:].split("/"):
            if not part:
                continue
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict):
                node = node.get(part, {})
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return {}
        return node

    def build(self, schema: Any, depth: int, index: int) -> Any:
        if schema is True or schema is None or depth > _MAX_DEPTH:
            return None if depth > _MAX_DEPTH else {}
        if not isinstance(schema, dict):
            return None
        if "$ref" in schema:
            target = self.resolve(schema["$ref"])
            rest = {k: v for k, v in schema.items() if k != "$ref"}
            merged = {**target, **rest} if isinstance(target, dict) else rest
            return self.build(merged, depth + 1, index)
        if "const" in schema:
            return schema["const"]
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            options = schema["enum"]
            if self.hint in options:
                return self.hint
            return options[index % len(options)]
        for key in ("anyOf", "oneOf"):
            branches = schema.get(key)
            if isinstance(branches, list) and branches:
                rest = {k: v for k, v in schema.items() if k != key}
                branch = branches[0] if isinstance(branches[0], dict) else {}
                return self.build({**rest, **branch}, depth + 1, index)
        if isinstance(schema.get("allOf"), list):
            merged = {k: v for k, v in schema.items() if k != "allOf"}
            for part in schema["allOf"]:
                if isinstance(part, dict):
                    merged = _merge(merged, part)
            return self.build(merged, depth + 1, index)
        kind = schema.get("type")
        if isinstance(kind, list):
            kinds = [k for k in kind if k != "null"] or ["null"]
            kind = kinds[0]
        if kind is None:
            if "properties" in schema or "required" in schema:
                kind = "object"
            elif "items" in schema or "prefixItems" in schema:
                kind = "array"
            else:
                return {}
        if kind == "object":
            return self.build_object(schema, depth, index)
        if kind == "array":
            return self.build_array(schema, depth)
        if kind == "string":
            return self.build_string(schema, index)
        if kind in ("integer", "number"):
            return _number(schema, integer=kind == "integer", index=index)
        if kind == "boolean":
            return False
        return None

    def build_object(self, schema: dict[str, Any], depth: int, index: int) -> dict[str, Any]:
        properties = schema.get("properties")
        properties = properties if isinstance(properties, dict) else {}
        required = [k for k in schema.get("required") or () if isinstance(k, str)]
        names = list(required)
        minimum = schema.get("minProperties")
        if isinstance(minimum, int):
            for name in properties:
                if len(names) >= minimum:
                    break
                if name not in names:
                    names.append(name)
        extra = schema.get("additionalProperties")
        if isinstance(minimum, int) and extra is not False:
            while len(names) < minimum:  # more than the schema names: add some of our own
                names.append(f"k{len(names)}")
        result: dict[str, Any] = {}
        for name in names:
            sub = properties.get(name, extra if isinstance(extra, dict) else {})
            result[name] = self.build(sub, depth + 1, index)
        return result

    def build_array(self, schema: dict[str, Any], depth: int) -> list[Any]:
        prefix = schema.get("prefixItems")
        prefix = prefix if isinstance(prefix, list) else []
        items = schema.get("items")
        count = schema.get("minItems")
        count = count if isinstance(count, int) and count > 0 else 0
        count = max(count, 0)
        result: list[Any] = []
        for position in range(count):
            sub = prefix[position] if position < len(prefix) else items
            result.append(self.build(sub if isinstance(sub, dict) else {}, depth + 1, position))
        return result

    def build_string(self, schema: dict[str, Any], index: int) -> str:
        fmt = schema.get("format")
        if isinstance(fmt, str) and fmt in _FORMATS:
            text = _FORMATS[fmt]
        else:
            text = self.hint if self.hint is not None else ""
            if index:
                text = f"{text}{index}"
        low = schema.get("minLength")
        high = schema.get("maxLength")
        if isinstance(high, int):
            text = text[:high]
        if isinstance(low, int) and len(text) < low:
            text = text + "x" * (low - len(text))
        pattern = schema.get("pattern")
        if isinstance(pattern, str):
            text = _matching(pattern, text, low, high)
        return text


def _matching(pattern: str, text: str, low: Any, high: Any) -> str:
    """``text`` if it matches ``pattern`` (``re.search``, as JSON Schema does), else a try."""
    try:
        compiled = re.compile(pattern)
    except re.error:
        return text

    def fits(candidate: str) -> bool:
        if isinstance(low, int) and len(candidate) < low:
            return False
        if isinstance(high, int) and len(candidate) > high:
            return False
        return compiled.search(candidate) is not None

    if fits(text):
        return text
    built = _shortest_match(pattern)
    if built is not None:
        for candidate in (built, _padded(built, low)):
            if candidate is not None and fits(candidate):
                return candidate
    for size in range(1, 17):
        for candidate in _PATTERN_TRIES:
            tried = candidate * size
            if fits(tried):
                return tried
    return text


def _padded(text: str, low: Any) -> str | None:
    """``text`` lengthened to ``low`` by repeating its last character (``a+`` style)."""
    if not isinstance(low, int) or len(text) >= low or not text:
        return None
    return text + text[-1] * (low - len(text))


def _shortest_match(pattern: str) -> str | None:
    """
    A short string ``pattern`` matches, built from its parse tree: each repeat at its
    minimum, the first branch of an alternation, the first member of a class. None
    for what cannot be built that way (back-references, look-arounds); the caller
    checks the result against the pattern anyway.
    """
    try:
        from re import _parser  # type: ignore[attr-defined]

        tree = _parser.parse(pattern)
    except Exception:  # an odd pattern: leave it to the guesses
        return None
    try:
        return _walk(tree)
    except _Unbuildable:
        return None


class _Unbuildable(Exception):
    pass


# A character for each class escape: \d \w \s and their negations.
_CATEGORY_CHAR = {
    "CATEGORY_DIGIT": "0", "CATEGORY_NOT_DIGIT": "a", "CATEGORY_WORD": "a",
    "CATEGORY_NOT_WORD": "-", "CATEGORY_SPACE": " ", "CATEGORY_NOT_SPACE": "a",
}


def _class_char(items: list[tuple[Any, Any]]) -> str:
    """A character inside ``[...]`` (or outside it, for ``[^...]``)."""
    if items and str(items[0][0]) == "NEGATE":
        members = items[1:]
        for candidate in "aA0_-x. ":
            if not any(_in_item(candidate, op, arg) for op, arg in members):
                return candidate
        raise _Unbuildable
    for op, arg in items:
        name = str(op)
        if name == "LITERAL":
            return chr(arg)
        if name == "RANGE":
            return chr(arg[0])
        if name == "CATEGORY" and str(arg) in _CATEGORY_CHAR:
            return _CATEGORY_CHAR[str(arg)]
    raise _Unbuildable


def _in_item(char: str, op: Any, arg: Any) -> bool:
    name = str(op)
    if name == "LITERAL":
        return char == chr(arg)
    if name == "RANGE":
        return arg[0] <= ord(char) <= arg[1]
    if name == "CATEGORY":
        return re.fullmatch(
            {"CATEGORY_DIGIT": r"\d", "CATEGORY_NOT_DIGIT": r"\D", "CATEGORY_WORD": r"\w",
             "CATEGORY_NOT_WORD": r"\W", "CATEGORY_SPACE": r"\s",
             "CATEGORY_NOT_SPACE": r"\S"}.get(str(arg), r"(?!)"), char) is not None
    return True  # unknown member: treat as taken, to stay safe


def _walk(tree: Any) -> str:
    out: list[str] = []
    for op, arg in tree:
        name = str(op)
        if name == "LITERAL":
            out.append(chr(arg))
        elif name == "NOT_LITERAL":
            out.append("a" if arg != ord("a") else "b")
        elif name == "ANY":
            out.append("a")
        elif name == "IN":
            out.append(_class_char(list(arg)))
        elif name == "CATEGORY":
            out.append(_CATEGORY_CHAR.get(str(arg), "a"))
        elif name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            low, _, sub = arg
            out.append(_walk(sub) * low)
        elif name == "SUBPATTERN":
            out.append(_walk(arg[-1]))
        elif name == "ATOMIC_GROUP":
            out.append(_walk(arg))
        elif name == "BRANCH":
            out.append(_walk(arg[1][0]))
        elif name == "AT":
            continue  # anchors match positions, not characters
        else:  # back-references, look-arounds, conditionals
            raise _Unbuildable
    return "".join(out)


def _number(schema: dict[str, Any], *, integer: bool, index: int) -> int | float:
    low = schema.get("minimum")
    exclusive = schema.get("exclusiveMinimum")
    high = schema.get("maximum")
    step = schema.get("multipleOf")
    value: float = 0.0
    if isinstance(low, int | float):
        value = float(low)
    if isinstance(exclusive, int | float) and not isinstance(exclusive, bool):
        value = max(value, float(exclusive) + (1 if integer else 1e-6))
    elif exclusive is True and isinstance(low, int | float):
        value = float(low) + (1 if integer else 1e-6)
    if not isinstance(low, int | float) and isinstance(high, int | float) and high < 0:
        value = float(high)
    value += index
    if isinstance(high, int | float) and value > high:
        value = float(high)
    if isinstance(step, int | float) and step > 0:
        value = math.ceil(value / step) * step
    if integer:
        return math.ceil(value)
    return int(value) if value == int(value) else value


def _merge(base: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in part.items():
        if key == "properties" and isinstance(merged.get(key), dict) and isinstance(value, dict):
            merged[key] = {**merged[key], **value}
        elif key == "required" and isinstance(merged.get(key), list) and isinstance(value, list):
            merged[key] = [*merged[key], *[v for v in value if v not in merged[key]]]
        else:
            merged[key] = value
    return merged
