"""`omnilog topics`: create the input and dead-letter topics if they are missing."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiokafka.errors as kafka_errors
import click

from pipeline.commands import errors
from pipeline.kafka_admin import DEFAULT_DLQ_PARTITIONS, DEFAULT_INPUT_PARTITIONS, TopicError, ensure_topics
from pipeline.settings import load_settings


@click.command("topics")
@click.option("--env-file", type=click.Path(path_type=Path), help="A .env-style file of settings.")
@click.option(
    "--partitions",
    type=click.IntRange(min=1),
    default=DEFAULT_INPUT_PARTITIONS,
    show_default=True,
    help="Partitions of the input topic (OMNILOG_TOPIC): the most ingest workers that can share it.",
)
@click.option(
    "--dlq-partitions",
    type=click.IntRange(min=1),
    default=DEFAULT_DLQ_PARTITIONS,
    show_default=True,
    help="Partitions of the dead-letter topic (OMNILOG_DLQ_TOPIC).",
)
@click.option("--replication-factor", type=click.IntRange(min=1), default=1, show_default=True)
def command(env_file: Path | None, partitions: int, dlq_partitions: int, replication_factor: int) -> None:
    """Create the input and dead-letter topics if missing (idempotent; existing topics are kept)."""
    settings = load_settings(env_file)
    wanted = {settings.topic: partitions, settings.dlq_topic: dlq_partitions}
    try:
        reports = asyncio.run(
            ensure_topics(settings.kafka_bootstrap_servers, wanted, replication_factor=replication_factor)
        )
    except TopicError as exc:
        raise click.ClickException(str(exc)) from None
    except (TimeoutError, kafka_errors.KafkaError, OSError) as exc:
        where = f"Kafka (OMNILOG_KAFKA_BOOTSTRAP_SERVERS={settings.kafka_bootstrap_servers})"
        raise errors.DependencyError(where, exc) from None
    for report in reports:
        click.echo(report.describe)
