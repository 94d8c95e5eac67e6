"""Authenticating a key does the same work whether or not its prefix exists, so the time taken does
not tell an attacker which prefixes are real: one lookup, one hash, one constant-time comparison of
equal-length digests. (Checked by counting the operations: wall-clock timing would be flaky.)"""

from __future__ import annotations

from typing import Any

import pytest

from sinks import api_keys


class _Conn:
    def __init__(self, row: dict[str, Any] | None) -> None:
        self.row = row
        self.lookups = 0

    async def fetchrow(self, query: str, *args: object) -> dict[str, Any] | None:
        self.lookups += 1
        return self.row


@pytest.fixture
def comparisons(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    seen: list[tuple[int, int]] = []
    real = api_keys.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        seen.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(api_keys.hmac, "compare_digest", counting)
    return seen


async def test_known_and_unknown_prefixes_cost_the_same(comparisons: list[tuple[int, int]]) -> None:
    _, real_key = api_keys.generate_key()
    _, guess = api_keys.generate_key()
    known = _Conn({"key_id": "k", "organization_id": "o", "key_hash": api_keys.hash_key(real_key)})
    unknown = _Conn(None)

    assert await api_keys.authenticate(known, guess) is None  # right shape, wrong key
    assert await api_keys.authenticate(unknown, guess) is None  # no such prefix
    assert known.lookups == unknown.lookups == 1
    assert comparisons == [(32, 32), (32, 32)]  # one comparison each, of equal-length digests

    comparisons.clear()
    found = await api_keys.authenticate(known, real_key)
    assert found is not None and found.organization_id == "o"
    assert comparisons == [(32, 32)]
