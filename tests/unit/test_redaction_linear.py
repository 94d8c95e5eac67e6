"""Redaction patterns: the same matches as the alternation they replace, in time linear in the text.

The reference is the alternation of the previous default patterns, searched by `re.sub` exactly as
the SDK did before (quadratic on long runs of e-mail local-part characters, correct otherwise).
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.sdk.redaction import DEFAULT_PATTERNS, EMAIL_PATTERN, MARKER, RedactionConfig

PREVIOUS_DEFAULT_PATTERNS = (
    r"\b(?i:bearer)\s+[A-Za-z0-9\-._~+/]+=*",
    r"\bsk-[A-Za-z0-9_\-]{16,}",
    r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
    r"\bgh[pousr]_[A-Za-z0-9]{36,}\b",
    r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}",
)


def _alternation(patterns: tuple[str, ...]) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{p})" for p in patterns))


REFERENCE = _alternation(PREVIOUS_DEFAULT_PATTERNS)

# Pieces that make matches, near misses and the shapes around them (runs that end or do not end
# in "@", matches that end inside a run, ties between patterns at one position).
_PIECES = [
    *"aZ09._%+-@ /=~\n\té_",
    "@",
    "@",
    "sk-",
    "AKIA",
    "ASIA",
    "Bearer ",
    "bearer\t",
    "ghp_",
    "gho_",
    ".io",
    ".com",
    "x@y.io",
    "a.b@c-d.org",
    "AKIAIOSFODNN7EXAMPLE",
    "sk-" + "a" * 16,
    "ghp_" + "A1" * 18,
    "1234567890",
    "[REDACTED]",
]
_soup = st.lists(st.sampled_from(_PIECES), max_size=24).map("".join)
_any_text = st.text(st.characters(codec="utf-8"), max_size=60)


@settings(max_examples=3000, deadline=None)
@given(text=_soup | _any_text)
def test_default_patterns_redact_exactly_what_the_previous_ones_did(text: str) -> None:
    assert RedactionConfig().redact_text(text) == REFERENCE.sub(MARKER, text)


@settings(max_examples=1000, deadline=None)
@given(text=_soup, order=st.permutations(range(7)))
def test_any_order_and_extra_patterns_keep_alternation_semantics(text: str, order: list[int]) -> None:
    # Patterns of one's own (one with a look-ahead), in every order (ties go to the first).
    extra = (r"\d{3}-?\d{2}", r"(?:a|b)+\.(?=io)")
    ours = tuple((*DEFAULT_PATTERNS, *extra)[i] for i in order)
    theirs = tuple((*PREVIOUS_DEFAULT_PATTERNS, *extra)[i] for i in order)
    config = RedactionConfig(patterns=ours)
    assert config.redact_text(text) == _alternation(theirs).sub(MARKER, text)


def test_long_strings_take_the_separate_search_path_with_the_same_result() -> None:
    # Strings over 256 characters skip the one-call pre-check; glue soup samples into long ones.
    rng = random.Random(11)
    for _ in range(300):
        text = "".join(rng.choice(_PIECES) for _ in range(rng.randint(40, 400)))
        assert RedactionConfig().redact_text(text) == REFERENCE.sub(MARKER, text)


def test_empty_matching_patterns_are_refused() -> None:
    with pytest.raises(ValueError, match="empty string"):
        RedactionConfig(patterns=(r"x*",))


# Linear time, shown by how the cost grows, not by a wall-clock budget: the texts that were
# quadratic (a run of local-part characters without an "@" costs ~0.7 s at 20 kB before) grow
# 8x in size; a linear scan costs ~8x, a quadratic one 64x. Process CPU time (other processes on
# the machine do not count), the best of 3 runs, and a bound of 24x leave room for noise while
# any quadratic path fails by far. The small size alone would take seconds if the bug came back.

_HOSTILE: dict[str, Callable[[int], str]] = {
    "one long run": lambda n: "a" * n,
    "url-safe base64": lambda n: "".join(
        random.Random(5).choices("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", k=n)
    ),
    "dotted run": lambda n: "a." * (n // 2),
    "@ every other": lambda n: "a@" * (n // 2),
    "domain without a top level": lambda n: "x@" + "a.1" * (n // 3),
    "keys glued in a run": lambda n: ("AKIAIOSFODNN7EXAMPLE." * (n // 21)) + "x@y.io",
    "matches ending inside runs": lambda n: "a@b.io_" * (n // 7),
    "bearer and spaces": lambda n: "bearer" + " " * n + "!",
}


def _cpu_seconds(text: str) -> float:
    config = RedactionConfig()
    best = float("inf")
    for _ in range(3):
        began = time.process_time()
        config.redact_text(text)
        best = min(best, time.process_time() - began)
    return best


@pytest.mark.parametrize("shape", sorted(_HOSTILE))
def test_cost_grows_linearly_on_the_inputs_that_were_quadratic(shape: str) -> None:
    small, large = 1 << 17, 1 << 20
    small_cost = _cpu_seconds(_HOSTILE[shape](small))
    assert small_cost < 1.0, f"{shape}: {small_cost:.2f} s for {small} characters"
    large_cost = _cpu_seconds(_HOSTILE[shape](large))
    ratio = large_cost / max(small_cost, 1e-3)
    assert ratio < 24, f"{shape}: 8x the text cost {ratio:.1f}x ({small_cost:.4f} s -> {large_cost:.4f} s)"


def test_email_pattern_is_still_the_public_constant() -> None:
    assert EMAIL_PATTERN in DEFAULT_PATTERNS
    assert re.fullmatch(EMAIL_PATTERN, "alice.smith+tag@example.co.uk")


def _reference_scrub(value: object) -> object:
    if isinstance(value, str):
        return REFERENCE.sub(MARKER, value)
    if isinstance(value, dict):
        return {_reference_scrub(k): _reference_scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_reference_scrub(v) for v in value]
    return value


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _soup,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_soup, inner, max_size=4),
    max_leaves=20,
)


@settings(max_examples=500, deadline=None)
@given(body=_json)
def test_event_fields_are_scrubbed_like_before_keys_included(body: object) -> None:
    config = RedactionConfig(field_paths=())
    out = config.redact({"request": body, "response": [body, body], "user_id": "a@b.io"})
    assert out["request"] == _reference_scrub(body)
    assert out["response"] == [_reference_scrub(body)] * 2
    assert out["user_id"] == "a@b.io"


def test_hostile_shapes_deep_nesting_and_a_2_mib_string() -> None:
    deep: object = "mail x@y.io"
    for depth in range(300):
        deep = [deep] if depth % 2 else {"k": deep}
    big = "sk-" + "a" * (2 << 20)
    out = RedactionConfig().redact({"request": deep, "metadata": {"blob": big}})
    node = out["request"]
    for depth in reversed(range(300)):
        node = node[0] if depth % 2 else node["k"]
    assert node == f"mail {MARKER}"
    assert out["metadata"] == {"blob": MARKER}
