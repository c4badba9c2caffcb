"""Every public class of the connectors and the plugin layer says why it exists."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import batchd.connectors
import batchd.plugins


def _public_classes() -> list[tuple[str, type]]:
    found: list[tuple[str, type]] = []
    for package in (batchd.connectors, batchd.plugins):
        for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            module = importlib.import_module(info.name)
            for name, value in vars(module).items():
                if (inspect.isclass(value) and value.__module__ == module.__name__
                        and not name.startswith("_")):
                    found.append((f"{module.__name__}.{name}", value))
    return found


CLASSES = _public_classes()


def test_the_walk_finds_the_classes() -> None:
    """The check below cannot pass vacuously: the sources, sinks and contracts are found."""
    names = {name.rsplit(".", 1)[1] for name, _ in CLASSES}
    assert {"CsvSource", "JsonlSource", "FileSource", "JsonlSink", "Options", "Sink"} <= names


@pytest.mark.parametrize(("name", "cls"), CLASSES, ids=[name for name, _ in CLASSES])
def test_public_class_has_its_own_docstring(name: str, cls: type) -> None:
    """Its own, not inherited, and not the signature a dataclass makes up for a missing one."""
    doc = vars(cls).get("__doc__")
    assert isinstance(doc, str) and doc.strip(), f"{name} has no docstring"
    assert not doc.startswith(f"{cls.__name__}("), f"{name}'s docstring is its signature"
