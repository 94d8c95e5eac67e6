"""`omnilog stack up | down | status`: the embedded local stack (docs/contract.md §7, docs/stack.md)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from pipeline.devtools.stack import SERVICES, Stack, StackError, default_root
from pipeline.devtools.stack.launcher import ENV_FILE

_root_option = click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    envvar="OMNILOG_STACK_ROOT",
    help="Directory for data, logs, state and stack.env [default: ./.omnilog; env OMNILOG_STACK_ROOT].",
)


def _fail(exc: Exception) -> None:
    click.echo(f"omnilog stack: {exc}", err=True)
    sys.exit(1)


@click.group(name="stack")
def command() -> None:
    """The embedded local stack on 127.0.0.1: PostgreSQL, Tansu (Kafka API), SeaweedFS (S3 API)."""


@command.command()
@_root_option
@click.option("--bucket", default="omnilog", show_default=True, help="S3 bucket to create.")
@click.option(
    "--pg-port", type=click.IntRange(1, 65535), default=None, help="PostgreSQL port [default: a free one]."
)
@click.option(
    "--kafka-port", type=click.IntRange(1, 65535), default=None, help="Kafka port [default: a free one]."
)
@click.option(
    "--s3-port", type=click.IntRange(1, 65535), default=None, help="S3 API port [default: a free one]."
)
def up(
    root: Path | None, bucket: str, pg_port: int | None, kafka_port: int | None, s3_port: int | None
) -> None:
    """Start the stack (only what is not running) and wait until every service answers."""
    stack = Stack(
        root or default_root(), bucket=bucket, pg_port=pg_port, kafka_port=kafka_port, s3_port=s3_port
    )
    started_at = time.monotonic()
    try:
        result = stack.ensure_up()
    except StackError as exc:
        _fail(exc)
        return
    elapsed = time.monotonic() - started_at
    if result.started:
        click.echo(f"started {', '.join(result.started)} in {elapsed:.1f}s; all services healthy")
    else:
        click.echo("stack already running and healthy; nothing changed")
    info = result.info
    click.echo(f"  postgres  {info.database_url}")
    click.echo(f"  kafka     {info.kafka_bootstrap_servers}")
    click.echo(f"  s3        {info.s3_endpoint_url}  bucket {info.s3_bucket}")
    click.echo(f"environment: source {stack.root / ENV_FILE}")


@command.command()
@_root_option
@click.option("--purge", is_flag=True, help="Also delete all data, logs, state and stack.env.")
def down(root: Path | None, purge: bool) -> None:
    """Stop the services `up` started (by recorded pid). Data is kept unless --purge."""
    stack = Stack(root or default_root())
    try:
        stopped = stack.down(purge=purge)
    except StackError as exc:
        _fail(exc)
        return
    if stopped:
        click.echo(f"stopped {', '.join(stopped)}")
    else:
        click.echo("nothing running; nothing to stop")
    if purge:
        click.echo(f"purged {stack.root}")


@command.command()
@_root_option
def status(root: Path | None) -> None:
    """Show each service's pid, port and health; exit 1 unless all are healthy."""
    stack = Stack(root or default_root())
    try:
        services = stack.status()
    except StackError as exc:
        _fail(exc)
        return
    click.echo(f"stack root {stack.root}")
    click.echo(f"{'service':<10}{'pid':>8}{'port':>8}  health")
    for svc in services:
        pid = str(svc.pid) if svc.pid is not None else "-"
        port = str(svc.port) if svc.port is not None else "-"
        click.echo(f"{svc.name:<10}{pid:>8}{port:>8}  {svc.detail}")
    if not all(svc.healthy for svc in services) or len(services) != len(SERVICES):
        sys.exit(1)
