"""The `omnilog` console script (docs/contract.md §7).

Subcommands live in `pipeline.commands.<name>` and are imported only when invoked, so
`omnilog stack up` does not pay for numpy or aiokafka imports it does not need.
"""

from __future__ import annotations

import importlib
import logging
import sys

try:
    import click

    from pipeline.settings import ConfigError
except ModuleNotFoundError as missing:
    # `pip install omnilog` is the producer SDK alone; the command line comes with the worker.
    raise SystemExit(
        f"omnilog: the command line needs the worker's dependencies (no module {missing.name!r}): "
        "pip install 'omnilog[worker]'"
    ) from None

# name -> "module:attribute" of a click.Command
_COMMANDS: dict[str, str] = {
    "stack": "pipeline.commands.stack:command",
    "migrate": "pipeline.commands.migrate:command",
    "maintain": "pipeline.commands.maintain:command",
    "topics": "pipeline.commands.topics:command",
    "produce": "pipeline.commands.produce:command",
    "ingest": "pipeline.commands.ingest:command",
    "logs": "pipeline.commands.logs:command",
    "aggregates": "pipeline.commands.aggregates:command",
    "merge": "pipeline.commands.merge:command",
    "schema": "pipeline.commands.schema:command",
    "demo": "pipeline.commands.demo:command",
    "bench": "pipeline.commands.bench:command",
    "serve": "pipeline.commands.serve:command",
    "keys": "pipeline.commands.keys:command",
    "lifecycle": "pipeline.commands.lifecycle:command",
    "buckets": "pipeline.commands.buckets:command",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = _COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        command = getattr(importlib.import_module(module_name), attr)
        assert isinstance(command, click.Command)
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Omnilog: gateway request events from Kafka to S3 + a Postgres index and aggregates."""


def main() -> None:
    """Exit codes: 0 success, 1 a failure at run time (a dependency down, nothing found, an
    unreadable object), 2 a usage or configuration error. Failures print one line on stderr."""
    # Without logging configured, Python prints a library's errors on stderr as they happen, so a
    # broker that is down printed aiokafka's "Unable connect ..." before our own line. Commands
    # that configure logging (ingest) still get its records through their own handlers.
    logging.getLogger("aiokafka").addHandler(logging.NullHandler())
    try:
        cli(standalone_mode=True)
    except ConfigError as exc:
        click.echo(f"omnilog: configuration error: {exc}", err=True)
        sys.exit(2)
    except Exception as exc:
        # Commands name the dependency they were talking to (pipeline.commands.errors); this is
        # the net for a client library's exception that escaped one. Anything else is a bug and
        # keeps its traceback.
        from pipeline.commands.errors import DependencyError, dependency_of

        dependency = dependency_of(exc)
        if dependency is None:
            raise
        DependencyError(dependency, exc).show()
        sys.exit(1)
