"""
The built-in sources and sinks, by name, without importing them.

Each built-in module registers its types through the same ``register_sources``
/ ``register_sinks`` hooks a third-party package uses. Importing all of them
at every start cost ~50 MB and a quarter of a second (asyncpg, aiokafka) for
commands and pipelines that use none, so the plugin manager registers a
stand-in per module instead: a plugin of the same name whose hooks register
:class:`LazyFactory` references, imported when a pipeline asks for the type.
``batchd plugins`` lists the same names, hooks and types as before;
tests/test_lazy_plugins.py checks this table against each module's own hook.

A module whose driver is missing (installed without the ``postgres`` or
``kafka`` extra) is :class:`MissingDriver`, a one-line config error naming the
extra to install, and only for the pipeline that uses it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from batchd.plugins.errors import ConfigError
from batchd.plugins.hookspecs import hookimpl

__all__ = ("BUILTINS", "Builtin", "LazyFactory", "MissingDriver", "resolve", "stand_in")

#: The optional extra that installs a driver, by the driver's top-level module.
DRIVER_EXTRAS = {"asyncpg": "postgres", "aiokafka": "kafka"}


class MissingDriver(ConfigError):
    """A built-in type whose driver is not installed (a ``batchd[extra]`` is missing)."""

    def __init__(self, kind: str, type_name: str, driver: str, extra: str) -> None:
        self.kind, self.type_name, self.driver, self.extra = kind, type_name, driver, extra
        super().__init__(f"the {type_name} {kind} needs {driver}, which is not installed: "
                         f"pip install 'batchd[{extra}]'")


@dataclass(frozen=True, slots=True)
class LazyFactory:
    """A source or sink class named by module and attribute; imported by :meth:`load`."""

    kind: str  # "source" or "sink"
    type_name: str
    module: str
    attr: str
    #: The distribution that declared it by entry point ("acme-notes 0.2.0"); None: built-in.
    package: str | None = None

    def load(self) -> Any:
        if self.package is not None:
            return self._load_declared()
        try:
            module = importlib.import_module(self.module)
        except ModuleNotFoundError as exc:
            driver = (exc.name or "").partition(".")[0]
            if driver in DRIVER_EXTRAS:
                raise MissingDriver(self.kind, self.type_name, driver,
                                    DRIVER_EXTRAS[driver]) from None
            raise
        return getattr(module, self.attr)

    def _load_declared(self) -> Any:
        """A third party's class; one that cannot be imported names its type and package."""
        if not self.attr:
            raise ConfigError(f"the {self.type_name} {self.kind} ({self.package}): its entry "
                              f"point names no class; write it as '{self.module}:ClassName'")
        try:
            return getattr(importlib.import_module(self.module), self.attr)
        except Exception as exc:
            raise ConfigError(
                f"the {self.type_name} {self.kind} ({self.module}:{self.attr}, {self.package}) "
                f"cannot be imported: {type(exc).__name__}: {exc}") from None


def resolve(factory: Any) -> Any:
    """The class behind a registered factory (a lazy one is imported now)."""
    return factory.load() if isinstance(factory, LazyFactory) else factory


@dataclass(frozen=True, slots=True)
class Builtin:
    """One built-in module and the types its hook registers (type name -> class name)."""

    module: str
    sources: dict[str, str] = field(default_factory=dict)
    sinks: dict[str, str] = field(default_factory=dict)

    def stand_in(self) -> Any:
        """A plugin object with only the hooks the module has, registering lazy factories."""
        return stand_in(
            self.module,
            [LazyFactory("source", name, self.module, attr) for name, attr in self.sources.items()],
            [LazyFactory("sink", name, self.module, attr) for name, attr in self.sinks.items()],
        )


def stand_in(name: str, sources: list[LazyFactory], sinks: list[LazyFactory]) -> Any:
    """A plugin named ``name`` whose hooks register ``sources`` and ``sinks`` (none: no hook)."""
    hooks: dict[str, Callable[..., None]] = {}
    if sources:
        def register_sources(register: Any) -> None:
            for factory in sources:
                register(factory.type_name, factory)

        hooks["register_sources"] = hookimpl(register_sources)
    if sinks:
        def register_sinks(register: Any) -> None:
            for factory in sinks:
                register(factory.type_name, factory)

        hooks["register_sinks"] = hookimpl(register_sinks)
    return SimpleNamespace(__name__=name, **hooks)


BUILTINS: tuple[Builtin, ...] = (
    Builtin("batchd.connectors.csv_source", sources={"csv": "CsvSource"}),
    Builtin("batchd.connectors.jsonl_source", sources={"jsonl": "JsonlSource"}),
    Builtin("batchd.connectors.postgres_source", sources={"postgres": "PostgresSource"}),
    Builtin("batchd.connectors.kafka_source", sources={"kafka": "KafkaSource"}),
    Builtin("batchd.plugins.sinks.jsonl", sinks={"jsonl": "JsonlSink", "dead_letter": "JsonlSink"}),
    Builtin("batchd.plugins.sinks.sqlite", sinks={"sqlite": "SqliteSink"}),
    Builtin("batchd.plugins.sinks.postgres", sinks={"postgres": "PostgresSink"}),
    Builtin("batchd.plugins.sinks.kafka", sinks={"kafka": "KafkaSink"}),
)
