"""Finding the messages at fault when a whole batch fails with a data error."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


async def find_culprits(items: Sequence[T], fails: Callable[[Sequence[T]], Awaitable[bool]]) -> list[T]:
    """The items that make `fails` true on their own, found by bisection.

    `fails(subset)` tries the subset (in a transaction that is rolled back) and says whether it hits
    the data error. With k culprits among n items this costs O(k log n) tries. If the failure needs
    several items together (no single one fails alone), the branches that pass return nothing: the
    caller then knows no single message explains the error.
    """
    if not items or not await fails(items):
        return []
    if len(items) == 1:
        return list(items)
    middle = len(items) // 2
    return await find_culprits(items[:middle], fails) + await find_culprits(items[middle:], fails)
