"""
The ``register_commands`` contract as docs/plugins.md states it, with a plugin
registered in-process the way an installed one is: its command parses, completes,
and maps errors to exit codes; a clashing name is skipped, not fatal.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from typing import Any

import pytest

import batchd
from batchd.daemon.cli import build_parser, main
from batchd.daemon.commands.completion import completion_script
from batchd.plugins.manager import load_plugins, pm


class _Plugin:
    """What an installed plugin module provides: one hookimpl adding two commands."""

    @staticmethod
    @batchd.hookimpl
    def register_commands(cli: Any) -> None:
        hello = cli.add_parser("acme-hello", help="say hello")
        hello.add_argument("--name", default="world")
        hello.set_defaults(func=lambda args: print(f"hello {args.name}") or 0)
        broken = cli.add_parser("acme-broken", help="fail as a config error")
        broken.set_defaults(func=_broken)


def _broken(args: argparse.Namespace) -> int:
    raise batchd.ConfigError("acme.toml: [acme]: token: is required")


class _Clash:
    @staticmethod
    @batchd.hookimpl
    def register_commands(cli: Any) -> None:
        cli.add_parser("run", help="a plugin taking a built-in's name")


@pytest.fixture
def plugins() -> Iterator[None]:
    load_plugins()
    pm.register(_Plugin, "acme")
    pm.register(_Clash, "clash")
    try:
        yield
    finally:
        pm.unregister(name="acme")
        pm.unregister(name="clash")


def test_plugin_command_runs(plugins: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["acme-hello", "--name", "ops"]) == 0
    out, err = capsys.readouterr()
    assert out == "hello ops\n"
    assert "plugin 'clash' adds no command: argument COMMAND: conflicting subparser: run" in err


def test_config_error_is_exit_2(plugins: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["acme-broken"]) == 2
    assert capsys.readouterr().err.endswith(
        "batchd: config error: acme.toml: [acme]: token: is required\n")


def test_builtin_keeps_its_meaning(plugins: None) -> None:
    args = build_parser().parse_args(["run", "x.toml", "--until-drained"])
    assert args.until_drained is True


def test_completion_knows_plugin_commands(plugins: None) -> None:
    assert "acme-hello" in completion_script(build_parser(), "bash")
