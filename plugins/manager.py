"""
Loads plugins once: installed entry points (group ``batchd``), then the
``BATCHD_LOAD_PLUGINS`` allow-list, then the built-ins, which register
through exactly the hooks a third-party package uses — by stand-ins that name
their classes without importing them (plugins/builtins.py), so a command or a
pipeline pays only for the sources and sinks it uses.

A third party gets the same: source and sink types declared by entry point name
(groups ``batchd.sources`` and ``batchd.sinks``, ``type-name = "module:Class"``)
register through one stand-in per distribution, and the module is imported only
when a pipeline uses the type. The ``batchd`` group is for hooks (commands, request
and answer hooks), which every start imports.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import pluggy

from batchd.plugins import hookspecs
from batchd.plugins.builtins import BUILTINS, LazyFactory, resolve, stand_in
from batchd.plugins.contract import SinkFactory, SourceFactory
from batchd.plugins.errors import ConfigError

__all__ = ("DEFAULT_PLUGINS", "get_plugins", "load_plugins", "pm", "sink_factory", "source_factory")

#: The built-in plugins' names (their modules), registered by stand-ins.
DEFAULT_PLUGINS: tuple[str, ...] = tuple(builtin.module for builtin in BUILTINS)

pm = pluggy.PluginManager("batchd")
pm.add_hookspecs(hookspecs)

_loaded = False
#: Entry-point groups that declare types by name, imported when a pipeline uses them.
TYPE_GROUPS = {"batchd.sources": "source", "batchd.sinks": "sink"}
#: The distribution ("name version") of each stand-in registered for declared types.
_declared_packages: dict[str, str] = {}


def load_plugins() -> None:
    """Register every plugin exactly once per process."""
    global _loaded
    if _loaded:
        return
    allow = os.environ.get("BATCHD_LOAD_PLUGINS")
    declared = declared_anywhere("batchd", *TYPE_GROUPS)
    if not declared:
        names: list[str] = []  # nothing installed declares a plugin: no metadata scan at all
    elif allow is None:
        from importlib.metadata import entry_points

        names = [ep.name for ep in entry_points(group="batchd")]
    else:
        names = list(filter(None, (part.strip() for part in allow.split(","))))
    for name in names:
        _load_entry_point(name)
    if declared:
        _register_declared(None if allow is None else set(names))
    _loaded = True
    for builtin in BUILTINS:
        if pm.get_plugin(builtin.module) is None:
            pm.register(builtin.stand_in(), builtin.module)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise ConfigError(f"plugin {exc.plugin!r} implements an unknown hook: {exc}") from None


def declared_anywhere(*groups: str) -> bool:
    """
    Whether an installed distribution may declare entry points in one of ``groups``.

    ``importlib.metadata``'s scan (what pluggy runs) imports ~20 modules and parses every
    distribution's metadata: ~60 ms of each command's start, for the usual answer "none".
    This looks only for ``[group]`` in the ``entry_points.txt`` files on ``sys.path`` and
    answers yes whenever it cannot tell (a zip on the path), so the real scan still decides.
    """
    markers = [f"[{group}]".encode() for group in groups]
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
                    data = text.read()
                if any(marker in data for marker in markers):
                    return True
            except OSError:
                continue
    return False


def _load_entry_point(name: str) -> None:
    """
    One installed plugin; one that cannot be imported is a one-line ConfigError naming
    the plugin and its distribution (every command would otherwise end in its traceback).
    """
    try:
        pm.load_setuptools_entrypoints("batchd", name=name)
    except Exception as exc:
        from importlib.metadata import entry_points

        found = list(entry_points(group="batchd", name=name))
        dist = found[0].dist if found else None
        package = f"{dist.name} {dist.version}" if dist is not None else "its distribution"
        raise ConfigError(
            f"plugin {name!r} ({package}) cannot be imported: {type(exc).__name__}: {exc}; "
            f"reinstall or uninstall {dist.name if dist is not None else 'it'}, or leave "
            "it out of BATCHD_LOAD_PLUGINS") from None


def _register_declared(allow: set[str] | None) -> None:
    """
    One stand-in per distribution for the types it declares in ``TYPE_GROUPS``, named
    after the distribution (which ``BATCHD_LOAD_PLUGINS`` then names); nothing imported.
    """
    from importlib.metadata import entry_points

    declared: dict[str, dict[str, list[LazyFactory]]] = {}
    for group, kind in TYPE_GROUPS.items():
        for ep in entry_points(group=group):
            dist = ep.dist
            name = dist.name if dist is not None else ep.module
            if (allow is not None and name not in allow) or pm.get_plugin(name) is not None:
                continue
            package = f"{dist.name} {dist.version}" if dist is not None else name
            _declared_packages[name] = package
            factory = LazyFactory(kind, ep.name, ep.module, ep.attr or ep.name, package)
            declared.setdefault(name, {"source": [], "sink": []})[kind].append(factory)
    for name, kinds in declared.items():
        pm.register(stand_in(name, kinds["source"], kinds["sink"]), name)


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
                "package": f"{dist.project_name} {dist.version}" if dist
                else _declared_packages.get(name, "batchd (built-in)"),
                "hooks": sorted(h.name for h in pm.get_hookcallers(plugin) or []),
                "sources": sorted(k for k, (_, p) in sources.items() if p == name),
                "sinks": sorted(k for k, (_, p) in sinks.items() if p == name),
            }
        )
    return out
