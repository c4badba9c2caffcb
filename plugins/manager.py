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
from typing import TYPE_CHECKING, Any

import pluggy

from batchd.plugins import hookspecs
from batchd.plugins.builtins import BUILTINS, LazyFactory, resolve, stand_in
from batchd.plugins.contract import SinkFactory, SourceFactory
from batchd.plugins.errors import ConfigError

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint, EntryPoints

__all__ = ("DEFAULT_PLUGINS", "get_plugins", "load_plugins", "pm", "sink_factory", "source_factory")

#: The built-in plugins' names (their modules), registered by stand-ins.
DEFAULT_PLUGINS: tuple[str, ...] = tuple(builtin.module for builtin in BUILTINS)

pm = pluggy.PluginManager("batchd")
pm.add_hookspecs(hookspecs)

_loaded = False
#: Entry-point groups that declare types by name, imported when a pipeline uses them.
TYPE_GROUPS = {"batchd.sources": "source", "batchd.sinks": "sink"}
#: Each installed plugin's distribution ("name version"), for ``batchd plugins``.
_packages: dict[str, str] = {}


def load_plugins() -> None:
    """Register every plugin exactly once per process."""
    global _loaded
    if _loaded:
        return
    allow = os.environ.get("BATCHD_LOAD_PLUGINS")
    allowed = None if allow is None else {p.strip() for p in allow.split(",") if p.strip()}
    if declared_anywhere("batchd", *TYPE_GROUPS):  # else no metadata scan at all
        found = _entry_points()
        for ep in found.select(group="batchd"):
            if (allowed is None or ep.name in allowed) and pm.get_plugin(ep.name) is None:
                _load_entry_point(ep)
        _register_declared(found, allowed)
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


def _entry_points() -> EntryPoints:
    """
    Every installed entry point, from one scan of the installed distributions (a scan
    per group or per plugin name costs ~10 ms each at every start); the first of two
    copies of a distribution on the path wins, as ``importlib.metadata`` has it.
    """
    from importlib.metadata import EntryPoints, distributions

    seen: set[str] = set()
    found: list[EntryPoint] = []
    for dist in distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name in seen:
            continue
        seen.add(name)
        found.extend(dist.entry_points)
    return EntryPoints(found)


def _package(ep: EntryPoint) -> str | None:
    return f"{ep.dist.name} {ep.dist.version}" if ep.dist is not None else None


def _load_entry_point(ep: EntryPoint) -> None:
    """
    One installed plugin; one that cannot be imported is a one-line ConfigError naming
    the plugin and its distribution (every command would otherwise end in its traceback).
    """
    try:
        plugin = ep.load()
    except Exception as exc:
        dist = ep.dist.name if ep.dist is not None else "it"
        raise ConfigError(
            f"plugin {ep.name!r} ({_package(ep) or 'its distribution'}) cannot be imported: "
            f"{type(exc).__name__}: {exc}; reinstall or uninstall {dist}, or leave it out "
            "of BATCHD_LOAD_PLUGINS") from None
    pm.register(plugin, name=ep.name)
    _packages[ep.name] = _package(ep) or ep.value


def _register_declared(found: EntryPoints, allowed: set[str] | None) -> None:
    """
    One stand-in per distribution for the types it declares in ``TYPE_GROUPS``, named
    after the distribution (which ``BATCHD_LOAD_PLUGINS`` then names); nothing imported.
    """
    declared: dict[str, dict[str, list[LazyFactory]]] = {}
    packages: dict[str, str] = {}
    for group, kind in TYPE_GROUPS.items():
        for ep in found.select(group=group):
            name = ep.dist.name if ep.dist is not None else ep.module
            if allowed is not None and name not in allowed:
                continue
            packages[name] = _package(ep) or name
            factory = LazyFactory(kind, ep.name, ep.module, ep.attr or "", packages[name])
            declared.setdefault(name, {"source": [], "sink": []})[kind].append(factory)
    for name, kinds in declared.items():
        # A distribution may also have a hook module in the group ``batchd`` by this name.
        plugin = name if pm.get_plugin(name) is None else f"{name} (types)"
        _packages[plugin] = packages[name]
        pm.register(stand_in(plugin, kinds["source"], kinds["sink"]), plugin)


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
    out = []
    for name, plugin in pm.list_name_plugin():
        out.append(
            {
                "name": name,
                "package": _packages.get(name, "batchd (built-in)"),
                "hooks": sorted(h.name for h in pm.get_hookcallers(plugin) or []),
                "sources": sorted(k for k, (_, p) in sources.items() if p == name),
                "sinks": sorted(k for k, (_, p) in sinks.items() if p == name),
            }
        )
    return out
