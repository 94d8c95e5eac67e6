"""Every `omnilog` subcommand resolves: the CLI imports a command's module only when it is
invoked, so a module that was moved or renamed would otherwise show up only when someone runs it."""

from __future__ import annotations

import sys

import click
import pytest
from click.testing import CliRunner

from pipeline.cli import _COMMANDS, cli


@pytest.mark.parametrize("name", sorted(_COMMANDS))
def test_each_command_imports_and_shows_its_help(name: str) -> None:
    result = CliRunner().invoke(cli, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert f"Usage: cli {name}" in result.output


def test_every_command_is_listed() -> None:
    ctx = click.Context(cli)
    listed = cli.list_commands(ctx)
    assert listed == sorted(_COMMANDS)
    for name in listed:
        assert isinstance(cli.get_command(ctx, name), click.Command)


def test_an_unknown_command_is_a_usage_error() -> None:
    result = CliRunner().invoke(cli, ["no-such-command"])
    assert result.exit_code == 2
    assert "No such command" in result.output


def test_bench_without_its_harness_says_so_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    # As in the container image, which ships pipeline/ but not bench/harness/.
    monkeypatch.setitem(sys.modules, "bench.harness", None)
    result = CliRunner().invoke(cli, ["bench", "--quick"])
    assert result.exit_code == 1
    assert "the benchmark harness (bench/harness/) is not installed here" in result.output
    assert "Traceback" not in result.output
