"""Database typing shared by the sinks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    # A connection of our own or one borrowed from a pool: every sink function accepts both.
    # (asyncpg's classes are generic only in its stubs, hence the string form.)
    Connection: TypeAlias = "asyncpg.Connection[Any] | PoolConnectionProxy[Any]"
else:
    Connection = asyncpg.Connection
