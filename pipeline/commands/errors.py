"""One line naming the dependency, instead of a traceback, when PostgreSQL, S3 or Kafka fails.

Exit codes of every `omnilog` command: 0 success; 1 a failure at run time (a dependency down or
refusing, an unreadable object, nothing found); 2 a usage or configuration error (bad option, bad
setting). The wrappers are context managers around the calls that reach one dependency, so the
message names the right one even when a command talks to two (`logs get`: PostgreSQL, then S3).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any, Final

import aiohttp
import asyncpg
import click
from botocore.exceptions import BotoCoreError, ClientError

from pipeline.log_format import scrub_credentials

POSTGRES: Final = "PostgreSQL (OMNILOG_DATABASE_URL)"
OBJECT_STORAGE: Final = "object storage (OMNILOG_S3_ENDPOINT_URL, OMNILOG_S3_BUCKET, AWS_*)"
KAFKA: Final = "Kafka (OMNILOG_KAFKA_BOOTSTRAP_SERVERS)"


class DependencyError(click.ClickException):
    """A dependency is down or refused a request; exits 1 with `omnilog: <dependency>: <why>`."""

    exit_code = 1

    def __init__(self, dependency: str, exc: BaseException, hint: str = "") -> None:
        detail = " ".join(str(exc).split()) or "(no message)"
        message = f"{dependency}: {type(exc).__name__}: {detail}{hint}"
        super().__init__(scrub_credentials(message))

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"omnilog: {self.format_message()}", file=file, err=file is None)


@contextmanager
def postgres() -> Iterator[None]:
    """Turn a PostgreSQL failure inside the block into a `DependencyError` naming it."""
    try:
        yield
    except asyncpg.UndefinedTableError as exc:
        raise DependencyError(POSTGRES, exc, "; run `omnilog migrate` first") from None
    # OSError covers refused connections and connect timeouts (TimeoutError is an OSError).
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise DependencyError(POSTGRES, exc) from None


@contextmanager
def object_storage() -> Iterator[None]:
    """Turn an S3 failure inside the block into a `DependencyError` naming it."""
    try:
        yield
    except (BotoCoreError, ClientError, aiohttp.ClientError, OSError) as exc:
        raise DependencyError(OBJECT_STORAGE, exc) from None


def dependency_of(exc: BaseException) -> str | None:
    """The dependency an exception that escaped a command came from, judged by its library."""
    module = type(exc).__module__.split(".")[0]
    return {
        "asyncpg": POSTGRES,
        "botocore": OBJECT_STORAGE,
        "aiobotocore": OBJECT_STORAGE,
        "aioboto3": OBJECT_STORAGE,
        "aiokafka": KAFKA,
    }.get(module)
