"""
Loads plugins once: installed entry points (group ``batchd``), then the
``BATCHD_LOAD_PLUGINS`` allow-list, then the built-ins, which register
through exactly the hooks a third-party package uses — by stand-ins that name
their classes without importing them (plugins/builtins.py), so a command or a
pipeline pays only for the sources and sinks it uses.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import pluggy

from batchd.plugins import hookspecs
from batchd.plugins.builtins import BUILTINS, resolve
from batchd.plugins.contract import SinkFactory, SourceFactory
from batchd.plugins.errors import ConfigError

__all__ = ("DEFAULT_PLUGINS", "get_plugins", "load_plugins", "pm", "sink_factory", "source_factory")

#: The built-in plugins' names (their modules), registered by stand-ins.
DEFAULT_PLUGINS: tuple[str, ...] = tuple(builtin.module for builtin in BUILTINS)

pm = pluggy.PluginManager("batchd")
pm.add_hookspecs(hookspecs)

_loaded = False


def load_plugins() -> None:
    """Register every plugin exactly once per process."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    allow = os.environ.get("BATCHD_LOAD_PLUGINS")
    if not declared_anywhere("batchd"):
        pass  # no installed distribution has a batchd plugin: skip the full metadata scan
    elif allow is None:
        pm.load_setuptools_entrypoints("batchd")
    else:
        for name in filter(None, (part.strip() for part in allow.split(","))):
            pm.load_setuptools_entrypoints("batchd", name=name)
    for builtin in BUILTINS:
        if pm.get_plugin(builtin.module) is None:
            pm.register(builtin.stand_in(), builtin.module)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise ConfigError(f"plugin {exc.plugin!r} implements an unknown hook: {exc}") from None


def declared_anywhere(group: str) -> bool:
    """
    Whether an installed distribution may declare entry points in ``group``.

    ``importlib.metadata``'s scan (what pluggy runs) imports ~20 modules and parses every
    distribution's metadata: ~60 ms of each command's start, for the usual answer "none".
    This looks only for ``[group]`` in the ``entry_points.txt`` files on ``sys.path`` and
    answers yes whenever it cannot tell (a zip on the path), so the real scan still decides.
    """
    marker = f"[{group}]".encode()
    for entry in sys.path:
        try:
            with os.scandir(entry or ".") as listing:
                found = [e.path for e in listing if e.name.endswith((".dist-info", ".egg-info"))]
        except FileNotFoundError:
            continue
        except OSError:
            return True  # a zip or an unreadable entry: let importlib.metadata look
        for path in found:
            try:
                with open(os.path.join(path, "entry_points.txt"), "rb") as text:
                    if marker in text.read():
                        return True
            except OSError:
                continue
    return False


def _collect(hook: Any) -> dict[str, tuple[Any, str]]:
    found: dict[str, tuple[Any, str]] = {}
    for impl in hook.get_hookimpls():
        plugin_name = impl.plugin_name

        def register(name: str, factory: Any, _plugin: str = plugin_name) -> None:
            if name in found and found[name][1] != _plugin:
                raise ConfigError(
                    f"type {name!r} is registered by two plugins, {found[name][1]!r} and "
                    f"{_plugin!r}; uninstall one or set BATCHD_LOAD_PLUGINS"
                )
            found[name] = (factory, _plugin)

        impl.function(register)
    return found


def _factory(kind: str, hook: Any, type_name: str) -> Any:
    load_plugins()
    found = _collect(hook)
    if type_name not in found:
        known = ", ".join(sorted(found)) or "none"
        raise ConfigError(f"unknown {kind} type {type_name!r} (known: {known})")
    return resolve(found[type_name][0])


def source_factory(type_name: str) -> SourceFactory:
    """The factory registered for a source ``type``, or a ConfigError listing the known ones."""
    return _factory("source", pm.hook.register_sources, type_name)


def sink_factory(type_name: str) -> SinkFactory:
    """The factory registered for a sink ``type``, or a ConfigError listing the known ones."""
    return _factory("sink", pm.hook.register_sinks, type_name)


def get_plugins() -> list[dict[str, Any]]:
    """Every registered plugin with its hooks, sources, sinks and package (``batchd plugins``)."""
    load_plugins()
    sources = _collect(pm.hook.register_sources)
    sinks = _collect(pm.hook.register_sinks)
    dists = {id(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}
    out = []
    for name, plugin in pm.list_name_plugin():
        dist = dists.get(id(plugin))
        out.append(
            {
                "name": name,
                "package": f"{dist.project_name} {dist.version}" if dist else "batchd (built-in)",
                "hooks": sorted(h.name for h in pm.get_hookcallers(plugin) or []),
                "sources": sorted(k for k, (_, p) in sources.items() if p == name),
                "sinks": sorted(k for k, (_, p) in sinks.items() if p == name),
            }
        )
    return out
