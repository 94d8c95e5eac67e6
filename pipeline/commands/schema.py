"""`omnilog schema`: print the JSON Schema of the gateway request event (docs/contract.md §1)."""

from __future__ import annotations

import click

from pipeline.contract import schema_text


@click.command(name="schema")
def command() -> None:
    """Print the JSON Schema (draft 2020-12) of the gateway request event, version 1."""
    click.echo(schema_text(), nl=False)
