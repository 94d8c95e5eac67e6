"""Dead letters: invalid messages go to the dead-letter topic, unchanged, with their reason and
source coordinates in headers (docs/contract.md §2), and a limit that stops a bad deploy from being
drained into the dead-letter topic."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from consumers.ingest.batch import Message


@dataclass(frozen=True, slots=True)
class DeadLetter:
    message: Message
    reason: str
    detail: str


class DeadLetterLimitExceeded(Exception):
    """Too many invalid messages: consumption stops so the bad input is not silently drained."""


class DeadLetterLimit:
    """Trips when, over the last `window` messages (once that many were seen), the share of
    invalid ones exceeds `max_ratio`."""

    def __init__(self, max_ratio: float, window: int) -> None:
        self._max_ratio = max_ratio
        self._window = window
        self._recent: deque[tuple[int, int]] = deque()  # (messages, invalid) per batch
        self._messages = 0
        self._invalid = 0

    def check(self, messages: int, invalid: int) -> None:
        """Record one batch; raise DeadLetterLimitExceeded if the limit is crossed."""
        self._recent.append((messages, invalid))
        self._messages += messages
        self._invalid += invalid
        while self._recent and self._messages - self._recent[0][0] >= self._window:
            old_messages, old_invalid = self._recent.popleft()
            self._messages -= old_messages
            self._invalid -= old_invalid
        if self._messages >= self._window and self._invalid > self._max_ratio * self._messages:
            raise DeadLetterLimitExceeded(
                f"{self._invalid} of the last {self._messages} messages were invalid "
                f"(limit {self._max_ratio:.0%}, OMNILOG_DLQ_MAX_RATIO); consumption stopped"
            )


async def send_dead_letters(
    producer: Any, dlq_topic: str, source_topic: str, letters: Sequence[DeadLetter]
) -> None:
    """Produce every letter and wait until the broker has them all (at-least-once)."""
    futures = []
    for letter in letters:
        m = letter.message
        headers = [
            ("omnilog.error", letter.reason.encode()),
            ("omnilog.error.detail", letter.detail.encode()[:1024]),
            ("omnilog.source.topic", source_topic.encode()),
            ("omnilog.source.partition", str(m.partition).encode()),
            ("omnilog.source.offset", str(m.offset).encode()),
        ]
        futures.append(await producer.send(dlq_topic, value=m.value, headers=headers))
    if futures:
        await asyncio.gather(*futures)
