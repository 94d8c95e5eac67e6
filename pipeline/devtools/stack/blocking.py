"""Run a coroutine to completion from synchronous code, even inside a running event loop.

The stack API is synchronous (the CLI and pytest fixtures call it), but its health probes use
the project's async clients, and chaos tests call `Stack.stop_service` from async tests. A
private loop on a helper thread serves both cases.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run_blocking(factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="omnilog-stack") as pool:
        return pool.submit(asyncio.run, factory()).result()
