"""Throwaway databases on the stack's server (one per test, so tests never share tables)."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from pipeline.devtools.stack.blocking import run_blocking
from pipeline.devtools.stack.info import StackInfo

_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


def _checked(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"database name must match {_NAME.pattern}, got {name!r}")
    return name


def create_database(info: StackInfo, name: str) -> str:
    """Create an empty database `name` on the stack's server; returns its URL."""
    name = _checked(name)

    async def create() -> None:
        conn = await asyncpg.connect(info.database_url, timeout=10)
        try:
            await conn.execute(f'create database "{name}"')
        finally:
            await conn.close()

    run_blocking(create)
    return _with_database(info.database_url, name)


def drop_database(info: StackInfo, name: str) -> None:
    """Drop database `name`, disconnecting whoever is still connected to it."""
    name = _checked(name)

    async def drop() -> None:
        conn = await asyncpg.connect(info.database_url, timeout=10)
        try:
            await conn.execute(f'drop database if exists "{name}" with (force)')
        finally:
            await conn.close()

    run_blocking(drop)
