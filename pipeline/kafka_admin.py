"""Create the pipeline's topics if they are missing (`omnilog topics`, the demo, tests).

Idempotent and safe to run from several places at once: "already exists" is success. An existing
topic is never altered; when it has fewer partitions than asked, the report says so (adding
partitions moves keys between partitions, which is an operator's decision, not a side effect).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiokafka.errors as kafka_errors
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

DEFAULT_INPUT_PARTITIONS = 8
DEFAULT_DLQ_PARTITIONS = 1


class TopicError(Exception):
    """A topic could not be created or described; the message names it."""


@dataclass(frozen=True, slots=True)
class TopicReport:
    name: str
    partitions: int  # the topic's partition count now
    requested: int
    created: bool  # False: it existed already

    @property
    def describe(self) -> str:
        verb = "created" if self.created else "exists"
        note = ""
        if self.partitions < self.requested:
            note = f" (asked for {self.requested}; existing topics are not altered)"
        return f"{self.name}: {verb}, {self.partitions} partition(s){note}"


async def ensure_topics(
    bootstrap_servers: str,
    topics: Mapping[str, int],
    *,
    replication_factor: int = 1,
    timeout_s: float = 30.0,
) -> list[TopicReport]:
    """Create each `name -> partitions` topic that does not exist; report every topic's state."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap_servers,
        client_id="omnilog-admin",
        request_timeout_ms=int(timeout_s * 1000),
    )
    await asyncio.wait_for(admin.start(), timeout_s)
    try:
        response = await admin.create_topics(
            [NewTopic(name, partitions, replication_factor) for name, partitions in topics.items()]
        )
        created = set()
        for name, code, message in _topic_errors(response):
            error = kafka_errors.for_code(code)
            if error is kafka_errors.NoError:
                created.add(name)
            elif error is not kafka_errors.TopicAlreadyExistsError:
                raise TopicError(f"topic {name}: {error.__name__}: {message or ''}".rstrip(": "))
        counts = await _partition_counts(admin, list(topics), timeout_s)
    finally:
        await admin.close()
    return [
        TopicReport(name, counts.get(name, 0), requested, name in created)
        for name, requested in topics.items()
    ]


def _topic_errors(response: Any) -> list[tuple[str, int, str | None]]:
    # CreateTopics v0 answers (name, code); v1+ adds a message.
    out = []
    for entry in response.topic_errors:
        name, code = entry[0], entry[1]
        message = entry[2] if len(entry) > 2 else None
        out.append((str(name), int(code), message))
    return out


async def _partition_counts(admin: AIOKafkaAdminClient, names: list[str], timeout_s: float) -> dict[str, int]:
    # A just-created topic may take a moment to appear in metadata.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        described = await admin.describe_topics(names)
        counts = {
            str(t["topic"]): len(t["partitions"])
            for t in described
            if t["error_code"] == 0 and t["partitions"]
        }
        if len(counts) == len(names) or loop.time() >= deadline:
            missing = sorted(set(names) - set(counts))
            if missing:
                raise TopicError(f"topics not visible in metadata after {timeout_s}s: {', '.join(missing)}")
            return counts
        await asyncio.sleep(0.2)
