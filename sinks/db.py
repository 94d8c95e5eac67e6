"""Database typing shared by the sinks."""

from __future__ import annotations

from typing import Any, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

# A connection of our own or one borrowed from a pool: every sink function accepts both.
Connection: TypeAlias = asyncpg.Connection[Any] | PoolConnectionProxy[Any]
