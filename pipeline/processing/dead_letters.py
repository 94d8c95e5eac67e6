"""Dead letters: what a message that cannot be indexed becomes, and the limit that stops a bad
deploy from being drained into the dead-letter topic. Producing them is the sink's
(`sinks.dead_letters`)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from pipeline.processing.batch import Message


@dataclass(frozen=True, slots=True)
class DeadLetter:
    message: Message
    reason: str
    detail: str
    exception: str | None = None  # the exception class, for reason `internal_error`


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
