"""
``batchd --version``: what a bug report needs in one paste.

The batchd version alone rarely explains a behaviour: the SDK version decides
the ``anthropic-version`` header (and so the API's behaviour), and installed
plugins add sources, sinks and hooks that run inside the daemon.
"""

from __future__ import annotations

import platform
from importlib import metadata
from typing import Any

__all__ = ("version_info", "version_text")


def _version(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


def _api_version() -> str | None:
    """The ``anthropic-version`` the installed SDK sends (read from its files, not imported)."""
    try:
        from batchd.daemon.intake.request_options import SDK_API_VERSION
    except Exception:
        return None
    return SDK_API_VERSION or None


def version_info() -> dict[str, Any]:
    """batchd, Python, SDK and API versions, and the third-party plugins installed."""
    from batchd.plugins.manager import get_plugins

    plugins = [p for p in get_plugins() if p["package"] != "batchd (built-in)"]
    return {
        "batchd": _version("batchd"),
        "python": f"{platform.python_version()} ({platform.python_implementation()})",
        "anthropic_sdk": _version("anthropic"),
        "anthropic_api_version": _api_version(),
        "plugins": [
            {"name": p["name"], "package": p["package"], "sources": p["sources"],
             "sinks": p["sinks"], "hooks": p["hooks"]}
            for p in plugins
        ],
    }


def version_text() -> str:
    info = version_info()
    lines = [
        f"batchd {info['batchd']}",
        f"Python {info['python']}",
        f"anthropic SDK {info['anthropic_sdk']} "
        f"(anthropic-version: {info['anthropic_api_version'] or 'unknown'})",
    ]
    if not info["plugins"]:
        lines.append("plugins: none installed (built-ins only; see `batchd plugins --all`)")
    for plugin in info["plugins"]:
        provides = [*(f"source {s}" for s in plugin["sources"]),
                    *(f"sink {s}" for s in plugin["sinks"])]
        lines.append(f"plugin {plugin['package']} ({plugin['name']}): "
                     f"{', '.join(provides) or ', '.join(plugin['hooks'])}")
    return "\n".join(lines)
