"""The pure parts of maintain's bounded expiries: which dead-letter prefixes may be expired, and
the held server_stats deltas' cutoff."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from sinks.held_deltas import held_delta_cutoff
from sinks.janitor import dead_letter_prefix_is_safe


@pytest.mark.parametrize(
    ("prefix", "safe"),
    [
        ("dead-letters/", True),
        ("dlq/gateway/", True),
        ("organization-dead/", True),  # shares letters with org/, not the path
        ("", False),
        ("org/", False),
        ("org/abc/dead/", False),  # inside the events' objects
        ("o", False),  # lists org/ too
        ("or", False),
    ],
)
def test_only_a_prefix_apart_from_the_events_objects_is_expired(prefix: str, safe: bool) -> None:
    assert dead_letter_prefix_is_safe(prefix) is safe


def test_held_deltas_are_kept_for_the_accepted_lateness_plus_a_day() -> None:
    now = datetime(2026, 11, 29, 14, 30, tzinfo=UTC)
    assert held_delta_cutoff(90, now) == datetime(2026, 8, 30, tzinfo=UTC)  # 29 Nov - 91 days
