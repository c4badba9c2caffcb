"""
One option table read with typed getters: the engine's config and every plugin's options.

An option table comes straight from an operator's TOML file, and the person reading a
mistake is at a terminal, not in a debugger. So every message names the file, the table
and the key (``pipeline.toml: [[pipeline.sink]] #1 of 'tickets': pth: unknown option (did
you mean 'path'?); valid options: fields, mode, path``), and a key nobody asked for is an
error instead of a silently ignored typo. The engine reads its own tables with the same
class (``batchd.daemon.config``), so a plugin's messages read exactly like the engine's.

Typical use in a plugin factory::

    def __init__(self, options: dict[str, Any], context: batchd.PluginContext) -> None:
        opts = batchd.Options(options, context, what="notes source")
        self.path = opts.path("path")                       # required, relative to the config
        self.batch = opts.integer("batch", 1000, min=1)     # optional, with a default
        self.mode = opts.choice("mode", ("hash", "prefix"), "hash")
        opts.finish()                                       # unknown keys: "did you mean"
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

from batchd.daemon.durations import parse_duration
from batchd.plugins.errors import ConfigError

if TYPE_CHECKING:
    from batchd.plugins.contract import PluginContext

__all__ = ("REQUIRED", "Options")

T = TypeVar("T")
D = TypeVar("D")  # a getter's default: its type joins the return type (None: "or None")
C = TypeVar("C")


class _Required:
    """The default that makes a key required."""

    def __repr__(self) -> str:
        return "REQUIRED"


#: Pass as ``default`` (or leave the default out) to make a key required. Typed Any so a
#: getter called without a default returns its own type (``integer("n") -> int``).
REQUIRED: Final[Any] = _Required()


def suggestion(word: str, candidates: Collection[str]) -> str | None:
    """The closest of ``candidates`` to a mistyped ``word``, or None when none is close."""
    found = difflib.get_close_matches(word, sorted(candidates), n=1)
    return found[0] if found else None


class Options:
    """
    One option table (a plugin's ``[pipeline.source]``/``[[pipeline.sink]]``, minus ``type``).

    Every getter marks its key as used; :meth:`finish` then refuses the keys nobody asked
    for, suggesting the closest valid one. A getter whose ``default`` is left out makes the
    key required. Mistakes are :class:`batchd.ConfigError` whose message starts with the
    file and table (when the engine built the plugin, ``context`` knows them) and the key,
    and whose ``file``, ``table``, ``key`` and ``hint`` attributes hold the same
    (``batchd validate --json`` reports them apart).

    Args:
        data: the option table as the plugin factory received it.
        context: the factory's :class:`batchd.PluginContext`: where the table came from,
            and the directory relative paths are resolved against.
        what: how messages name the plugin when the table's place is unknown (a plugin
            built by hand in a test): ``"notes source"``.
        file, table, base_dir: set the location directly instead of from ``context``.
    """

    #: What a key is called in messages ("unknown option", "valid options").
    noun = "option"

    def __init__(
        self,
        data: Any,
        context: PluginContext | None = None,
        *,
        what: str | None = None,
        file: str | Path | None = None,
        table: str | None = None,
        base_dir: Path | None = None,
        problems: list[ConfigError] | None = None,
    ) -> None:
        if context is not None:
            file = file if file is not None else context.config_file
            table = table if table is not None else context.table
            base_dir = base_dir if base_dir is not None else context.config_dir
        self.file: Path | None = Path(file) if file is not None else None
        self.where: str = table or what or "options"
        self.base_dir = base_dir
        if not isinstance(data, Mapping):
            raise self._locate(ConfigError(
                f"{self.location} must be a table, got {type(data).__name__}"), None)
        self.data: dict[str, Any] = dict(data)
        self.used: set[str] = set()
        # Where mistakes go when collecting every one (``batchd validate``); None: raise.
        self.problems = problems

    # -- messages ----------------------------------------------------------------

    @property
    def location(self) -> str:
        """``file: table`` (or just the table, or ``what``, when that is all that is known)."""
        return f"{self.file}: {self.where}" if self.file is not None else self.where

    def error(self, key: str, message: str) -> ConfigError:
        """A ConfigError about ``key``: ``file: table: key: message``, located for ``--json``."""
        return self._locate(ConfigError(f"{self.location}: {key}: {message}"), key)

    def _locate(self, error: ConfigError, key: str | None) -> ConfigError:
        error.file = str(self.file) if self.file is not None else None
        error.table, error.key = self.where, key
        return error

    # -- the low-level getters (the engine's own config uses these) ----------------

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str, default: Any = None) -> Any:
        """The value as written (or ``default``), marked as used; check it yourself."""
        self.used.add(key)
        return self.data.get(key, default)

    def get(self, key: str, kind: type[T] | tuple[type, ...], default: Any = None) -> Any:
        """The value if it is an instance of ``kind`` (a bool is not a number), else an error."""
        self.used.add(key)
        if key not in self.data:
            return default
        value = self.data[key]
        if isinstance(value, bool) and kind in (int, float, (int, float)):
            raise self.error(key, f"expected a number, got {value!r}")
        if not isinstance(value, kind):
            names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            raise self.error(key, f"expected {names}, got {value!r}")
        return value

    def require(self, key: str, kind: type[T] | tuple[type, ...]) -> Any:
        """:meth:`get`, but a missing key is an error."""
        if key not in self.data:
            raise self.error(key, "is required")
        return self.get(key, kind)

    def convert(self, key: str, fn: Callable[[Any], T], default: T) -> T:
        """``fn(value)``; a ValueError or TypeError it raises becomes this key's error."""
        self.used.add(key)
        if key not in self.data:
            return default
        try:
            return fn(self.data[key])
        except (ValueError, TypeError) as exc:
            raise self.error(key, str(exc)) from None

    def _present(self, key: str, default: Any) -> bool:
        """Mark ``key`` used; False when it is absent (the caller returns ``default``)."""
        self.used.add(key)
        if key in self.data:
            return True
        if default is REQUIRED:
            # A misspelt required key is reported at its finish() only: say it here.
            close = suggestion(key, [k for k in self.data if k not in self.used])
            if close is None:
                raise self.error(key, "is required")
            hint = f"did you mean {key!r} instead of {close!r}?"
            error = self.error(key, f"is required ({hint})")
            error.hint = hint
            raise error
        return False

    # -- typed getters -------------------------------------------------------------

    def text(self, key: str, default: D = REQUIRED, *, env: bool = False) -> str | D:
        """
        A non-empty string. With ``env``, ``"env:NAME"`` is read from the environment, so an
        address or a name can differ per host without editing the file.
        """
        if not self._present(key, default):
            return default
        value = self.data[key]
        if not isinstance(value, str) or not value.strip():
            raise self.error(key, f"must be a non-empty string, got {value!r}")
        return self._from_env(key, value.strip()) if env else value

    def secret(self, key: str, default: D = REQUIRED) -> str | D:
        """
        A password, token or DSN: ``"env:NAME"`` reads the environment so the secret need not
        sit in the config file. The value is masked in every later log line and never
        appears in a message.
        """
        if not self._present(key, default):
            return default
        value = self.data[key]
        if not isinstance(value, str) or not value.strip():
            raise self.error(key, f"must be a non-empty string (or \"env:NAME\"), got a "
                                  f"{type(value).__name__}")
        value = self._from_env(key, value.strip())
        try:
            from batchd.daemon.ops._logging import register_secret
        except ImportError:  # used as a library without the daemon's logging
            return value
        register_secret(value)
        return value

    def _from_env(self, key: str, value: str) -> str:
        if not value.startswith("env:"):
            return value
        name = value[4:].strip()
        found = os.environ.get(name, "") if name else ""
        if not found.strip():
            raise self.error(key, f"names environment variable {name!r}, which is not set")
        return found.strip()

    def integer(
        self, key: str, default: D = REQUIRED, *, min: int | None = None,
        max: int | None = None,
    ) -> int | D:
        """An integer (TOML ``true`` is not one) within ``min``..``max`` when given."""
        if not self._present(key, default):
            return default
        return int(self._bounded(key, int, _int_range(min, max), min, max))

    def number(
        self, key: str, default: D = REQUIRED, *, min: float | None = None,
        max: float | None = None,
    ) -> float | D:
        """An integer or float within ``min``..``max`` when given, returned as a float."""
        if not self._present(key, default):
            return default
        return float(self._bounded(key, int | float, _range("a number", min, max), min, max))

    def _bounded(self, key: str, kind: Any, what: str, low: float | None,
                 high: float | None) -> Any:
        value = self.data[key]
        if isinstance(value, bool) or not isinstance(value, kind) or (
                low is not None and value < low) or (high is not None and value > high):
            raise self.error(key, f"must be {what}, got {value!r}")
        return value

    def flag(self, key: str, default: D = REQUIRED) -> bool | D:
        """``true`` or ``false`` (TOML booleans only: ``"yes"`` is a mistake, not true)."""
        if not self._present(key, default):
            return default
        value = self.data[key]
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, got {value!r}")
        return value

    def duration(
        self, key: str, default: D = REQUIRED, *, min: float | None = None,
    ) -> float | D:
        """Seconds, as a number (``5``, ``0.5``) or a duration (``"500ms"``, ``"30s"``)."""
        if not self._present(key, default):
            return default
        value = self.data[key]
        try:
            seconds = parse_duration(value, what="duration")
        except ValueError as exc:
            raise self.error(key, str(exc).removeprefix("duration: ")) from None
        if min is not None and seconds < min:
            raise self.error(key, f"must be at least {min:g}s, got {value!r}")
        return seconds

    def path(self, key: str, default: D = REQUIRED) -> Path | D:
        """A file or directory; a relative one is relative to the config file's directory."""
        if not self._present(key, default):
            return default
        value = Path(self.text(key)).expanduser()
        if value.is_absolute() or self.base_dir is None:
            return value
        return self.base_dir / value

    def choice(self, key: str, choices: Collection[C], default: D = REQUIRED) -> C | D:
        """One of ``choices`` (strings compared exactly), suggesting the closest on a typo."""
        if not self._present(key, default):
            return default
        value = self.data[key]
        if isinstance(value, bool) or value not in choices:
            names = ", ".join(str(c) for c in choices)
            error = self.error(key, f"must be one of {names}, got {value!r}")
            close = suggestion(value, [c for c in choices if isinstance(c, str)]) \
                if isinstance(value, str) else None
            if close is not None:
                error = self.error(key, f"must be one of {names}, got {value!r} "
                                        f"(did you mean {close!r}?)")
                error.hint = f"did you mean {close!r}?"
            raise error
        return value

    def strings(
        self, key: str, default: D = REQUIRED, *, single: bool = False, env: bool = False,
        choices: Collection[str] | None = None, unique: bool = False,
    ) -> list[str] | D:
        """
        A non-empty list of non-empty strings. With ``single``, one string counts as a list of
        one; with ``env``, each may be ``"env:NAME"``; with ``choices``, each must be one of
        them; with ``unique``, none may appear twice.
        """
        if not self._present(key, default):
            return default
        value = self.data[key]
        items = [value] if single and isinstance(value, str) else value
        if not isinstance(items, list) or not items or not all(
            isinstance(item, str) and item.strip() for item in items
        ):
            raise self.error(key, f"must be a non-empty list of strings, got {value!r}")
        if choices is not None:
            for item in items:
                if item not in choices:
                    close = suggestion(item, choices)
                    hint = f" (did you mean {close!r}?)" if close else ""
                    raise self.error(key, f"{item!r} is not one of {', '.join(choices)}{hint}")
        if unique and len(set(items)) != len(items):
            twice = next(item for item in items if items.count(item) > 1)
            raise self.error(key, f"names {twice!r} twice")
        return [self._from_env(key, item.strip()) for item in items] if env else list(items)

    # -- the end -------------------------------------------------------------------

    def finish(self, allow_extra: bool = False) -> dict[str, Any]:
        """
        Refuse every key no getter asked for, suggesting the closest valid one; returns them
        (for ``allow_extra``, which keeps them for someone else to read).
        """
        extra = {k: v for k, v in self.data.items() if k not in self.used}
        if extra and not allow_extra:
            noun = self.noun
            valid = ", ".join(sorted(self.used))
            for key in sorted(extra):
                close = suggestion(key, self.used)
                hint = f"did you mean {close!r}?" if close else None
                error = self.error(key, f"unknown {noun}{f' ({hint})' if hint else ''}; "
                                        f"valid {noun}s: {valid}")
                error.hint = hint
                if self.problems is None:
                    raise error
                self.problems.append(error)
        return extra


def _range(kind: str, low: float | None, high: float | None) -> str:
    if low is not None and high is not None:
        return f"{kind} between {low:,} and {high:,}"
    if low is not None:
        return f"{kind} of at least {low:,}"
    if high is not None:
        return f"{kind} of at most {high:,}"
    return kind


def _int_range(low: int | None, high: int | None) -> str:
    if high is None and low == 1:
        return "a positive integer"
    if high is None and low == 0:
        return "a non-negative integer"
    return _range("an integer", low, high)
