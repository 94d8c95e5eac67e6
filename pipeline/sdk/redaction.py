"""Emit-time redaction: secrets and personal data never leave the gateway.

Two mechanisms, applied to a copy of the event (the caller's dict is never mutated):

- *field paths*, e.g. `headers.authorization` or `request.params.arguments.password`: the whole value
  at that path is replaced by the marker. Segments match object keys case-insensitively (HTTP header
  names are case-insensitive); `*` matches any key; a list applies the rest of the path to each item.
- *value patterns* (regular expressions): every match inside a string, anywhere under the scanned
  top-level fields (by default the free-form data-plane fields), is replaced by the marker.

A redacted event carries `redaction_version` = the config's version, so a reader can tell which rules
an event went through. Paths may not start at a typed index field (`event_id`, `user_id`, ...):
replacing one with a marker would make the event invalid.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from pipeline.contract.fields import DATA_PLANE_NAMES, TYPED_NAMES

MARKER: Final = "[REDACTED]"

# The free-form fields of docs/contract.md §1 ("any JSON", object storage only).
DATA_PLANE_FIELDS: Final = DATA_PLANE_NAMES

# Typed fields: a path may not replace them (the event would no longer match the contract).
_TYPED_FIELDS: Final = frozenset(TYPED_NAMES)

DEFAULT_FIELD_PATHS: Final = (
    "headers.authorization",
    "headers.proxy-authorization",
    "headers.cookie",
    "headers.set-cookie",
    "headers.x-api-key",
    "headers.api-key",
    "request.params.arguments.password",
    "request.params.arguments.api_key",
    "request.params.arguments.token",
    "request.params.arguments.secret",
)

# E-mail addresses. This pattern is never searched as written: on a run of local-part characters
# with no "@" after it, Python's backtracking engine re-scans the run from each of its positions
# (quadratic: 20 kB of base64 took 0.8 s). `_PatternSet` finds exactly its matches another way.
_EMAIL_LOCAL: Final = r"[A-Za-z0-9._%+\-]"
_EMAIL_DOMAIN: Final = r"[A-Za-z0-9.\-]+\.[A-Za-z]{2,}"
EMAIL_PATTERN: Final = rf"{_EMAIL_LOCAL}+@{_EMAIL_DOMAIN}"

# Up to this length a string is first checked with the alternation (its cost per character is
# several times that of the separate searches, its cost per call a fifth).
_SHORT: Final = 256
# `EMAIL_PATTERN` where no local-part character precedes the start, else no match: it matches
# somewhere in a text iff `EMAIL_PATTERN` does (at the start of the run that holds the match).
_EMAIL_GUARDED: Final = rf"(?<!{_EMAIL_LOCAL}){_EMAIL_LOCAL}++@{_EMAIL_DOMAIN}"
_EMAIL_AT_DOMAIN: Final = re.compile(rf"@(?<={_EMAIL_LOCAL}@){_EMAIL_DOMAIN}")
_EMAIL_LOCAL_RUN: Final = re.compile(rf"{_EMAIL_LOCAL}*+")


# Every pattern is searched on its own (see `_PatternSet`). Python's `re` finds a literal prefix
# with a fast substring search, but only when the pattern starts with it, so `\b` ("not after a
# word character", all of these start with one) is written as a look-behind after the prefix.
DEFAULT_PATTERNS: Final = (
    # Bearer tokens in any text (an Authorization header copied into a body, a log line ...).
    r"(?i:bearer)(?<!\w......)\s+[A-Za-z0-9\-._~+/]+=*",
    # OpenAI/Anthropic-style secret keys: sk-..., sk-proj-..., sk-ant-...
    r"sk-(?<!\wsk-)[A-Za-z0-9_\-]{16,}",
    # AWS access key ids.
    r"(?:AKIA|ASIA)(?<!\w....)[0-9A-Z]{16}\b",
    # GitHub tokens.
    r"gh(?<!\wgh)[pousr]_[A-Za-z0-9]{36,}\b",
    EMAIL_PATTERN,
)


@dataclass(frozen=True)
class RedactionConfig:
    """What to redact. `version` goes into every redacted event's `redaction_version`."""

    version: int = 1
    field_paths: tuple[str, ...] = DEFAULT_FIELD_PATHS
    patterns: tuple[str, ...] = DEFAULT_PATTERNS
    scan_fields: tuple[str, ...] = DATA_PLANE_FIELDS
    marker: str = MARKER
    _paths: tuple[tuple[str, ...], ...] = field(init=False, repr=False, compare=False)
    _patterns: _PatternSet | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not -(2**31) <= self.version < 2**31:
            raise ValueError(f"redaction version must fit a signed 32-bit integer, got {self.version}")
        paths = []
        for path in self.field_paths:
            segments = tuple(s.lower() for s in path.split("."))
            if not path or any(not s for s in segments):
                raise ValueError(f"redaction path {path!r}: empty segment")
            if segments[0] in _TYPED_FIELDS or segments[0] == "*":
                raise ValueError(
                    f"redaction path {path!r}: must start at a free-form field "
                    f"({', '.join(DATA_PLANE_FIELDS)} or an extra field), not a typed one"
                )
            paths.append(segments)
        for name in self.scan_fields:
            if name in _TYPED_FIELDS:
                raise ValueError(
                    f"scan field {name!r} is a typed field; patterns may only scan free-form ones"
                )
        # The patterns act as one alternation (`_PatternSet`). Each is compiled alone first so a bad
        # one is named (and global flags like `(?i)` are refused: in an alternation they would
        # apply to every pattern; use the scoped form `(?i:...)`).
        for pattern in self.patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"redaction pattern {pattern!r}: {exc}") from None
            if pattern.startswith("(?") and re.match(r"\(\?[aiLmsux]+\)", pattern):
                raise ValueError(f"redaction pattern {pattern!r}: use a scoped flag group, e.g. (?i:...)")
            if re.compile(pattern).fullmatch(""):
                raise ValueError(f"redaction pattern {pattern!r}: matches the empty string")
        object.__setattr__(self, "_paths", tuple(paths))
        object.__setattr__(self, "_patterns", _PatternSet(self.patterns) if self.patterns else None)

    def redact(self, event: Mapping[str, Any]) -> dict[str, Any]:
        """A copy of `event` with paths and patterns redacted and `redaction_version` set."""
        out = dict(event)
        for path in self._paths:
            _redact_path(out, path, self.marker)
        if self._patterns is not None:
            for name in self.scan_fields:
                if name in out:
                    out[name] = _scrub(out[name], self._patterns, self.marker)
        out["redaction_version"] = self.version
        return out

    def redact_text(self, text: str) -> str:
        """`text` with every pattern match replaced (for callers that build bodies themselves)."""
        return text if self._patterns is None else self._patterns.sub(self.marker, text)


def _redact_path(container: dict[str, Any], path: tuple[str, ...], marker: str) -> None:
    """Replace the value(s) at `path` under `container`, copying every container it changes."""
    head, rest = path[0], path[1:]
    for key in list(container):
        if head != "*" and key.lower() != head:
            continue
        if not rest:
            container[key] = marker
            continue
        child = container[key]
        if isinstance(child, dict):
            copy = dict(child)
            _redact_path(copy, rest, marker)
            container[key] = copy
        elif isinstance(child, list):
            container[key] = [_redact_in_item(item, rest, marker) for item in child]


def _redact_in_item(item: Any, path: tuple[str, ...], marker: str) -> Any:
    if isinstance(item, dict):
        copy = dict(item)
        _redact_path(copy, path, marker)
        return copy
    if isinstance(item, list):
        return [_redact_in_item(x, path, marker) for x in item]
    return item


def _scrub(value: Any, patterns: _PatternSet, marker: str) -> Any:
    """`value` with pattern matches replaced in every string, keys included; new containers."""
    # A body of 1 MiB holds some 60k strings: per string, the call overhead is most of the cost,
    # so the common case (a short string with no match) is decided here in one regex call, and
    # each distinct key is scanned once per event (the records of a list repeat their keys).
    has_match = patterns.has_match
    keys: dict[str, str] = {}

    def text(string: str) -> str:
        if len(string) <= _SHORT and has_match(string) is None:
            return string
        return patterns.sub(marker, string)

    def walk(item: Any) -> Any:
        if isinstance(item, str):
            return text(item)
        if isinstance(item, dict):
            out = {}
            for key, child in item.items():
                if isinstance(key, str):
                    scrubbed = keys.get(key)
                    if scrubbed is None:
                        scrubbed = keys[key] = text(key)
                    out[scrubbed] = walk(child)
                else:
                    out[key] = walk(child)
            return out
        if isinstance(item, list):
            return [walk(child) for child in item]
        return item

    return walk(value)


class _PatternSet:
    """The patterns as one alternation, replaced left to right exactly as `re.sub` would do it.

    Searching the alternation itself costs every alternative at every position (about 80 ms a
    MiB); each pattern searched alone skips to its literal prefix. So each pattern keeps its next
    match, and the scan takes the leftmost one (the first pattern's on a tie, as an alternation
    does), then searches again only the patterns whose next match it has passed.

    `EMAIL_PATTERN` is found from its "@": a search for "@" and the domain, then the local part
    read backwards from the "@" (a match on the reversed text), never before the scan position.
    A local part can only end at its "@", so this is the leftmost match the pattern as written
    would find, in time linear in the text. A pattern of your own that starts with an unbounded
    run and needs something after it has the quadratic case that pattern had.
    """

    def __init__(self, patterns: tuple[str, ...]) -> None:
        self._regexes = tuple(None if p == EMAIL_PATTERN else re.compile(p) for p in patterns)
        # One call that finds a match in a text iff the alternation as written has one (see
        # `_EMAIL_GUARDED`): cheaper than a search per pattern on the short strings of a JSON body.
        guarded = "|".join(f"(?:{_EMAIL_GUARDED if p == EMAIL_PATTERN else p})" for p in patterns)
        self.has_match = re.compile(guarded).search

    def sub(self, marker: str, text: str) -> str:
        if len(text) <= _SHORT and self.has_match(text) is None:
            return text
        finders = [
            _EmailFinder(text) if regex is None else _RegexFinder(regex, text) for regex in self._regexes
        ]
        upcoming = [finder.find(0) for finder in finders]
        pieces: list[str] = []
        pos = 0
        while True:
            best: tuple[int, int] | None = None
            for index, cached in enumerate(upcoming):
                match = cached
                if match is not None and match[0] < pos:
                    match = upcoming[index] = finders[index].find(pos)
                if match is not None and (best is None or match[0] < best[0]):
                    best = match
            if best is None:
                break
            pieces.append(text[pos : best[0]])
            pieces.append(marker)
            pos = best[1]
        if not pieces:
            return text
        pieces.append(text[pos:])
        return "".join(pieces)


class _RegexFinder:
    __slots__ = ("_regex", "_text")

    def __init__(self, regex: re.Pattern[str], text: str) -> None:
        self._regex, self._text = regex, text

    def find(self, pos: int) -> tuple[int, int] | None:
        """The leftmost match at or after `pos`, as (start, end)."""
        match = self._regex.search(self._text, pos)
        # An empty match would redact nothing and stall the scan (a pattern that can only match
        # empty text is refused; one like `(?=x)` still can here and there).
        while match is not None and match.end() == match.start():
            match = self._regex.search(self._text, match.start() + 1)
        return None if match is None else match.span()


class _EmailFinder:
    __slots__ = ("_reversed", "_text")

    def __init__(self, text: str) -> None:
        self._text = text
        self._reversed: str | None = None  # made on the first "@" that needs it

    def find(self, pos: int) -> tuple[int, int] | None:
        """The leftmost match of `EMAIL_PATTERN` at or after `pos`, as (start, end)."""
        text, size = self._text, len(self._text)
        search_from = pos
        while (at_domain := _EMAIL_AT_DOMAIN.search(text, search_from)) is not None:
            at = at_domain.start()
            if self._reversed is None:
                self._reversed = text[::-1]
            # text[at - 1] is reversed[size - at]; read back from there, but not before `pos`.
            run = _EMAIL_LOCAL_RUN.match(self._reversed, size - at, size - pos)
            assert run is not None  # `*+` matches the empty string
            local_length = run.end() - (size - at)
            if local_length:
                return at - local_length, at_domain.end()
            search_from = at + 1  # the "@" is at `pos`: its local part lies before the scan
        return None
