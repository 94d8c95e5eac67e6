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

MARKER: Final = "[REDACTED]"

# The free-form fields of docs/contract.md §1 ("any JSON", object storage only).
DATA_PLANE_FIELDS: Final = ("request", "response", "headers", "metadata")

# Typed fields: a path may not replace them (the event would no longer match the contract).
_TYPED_FIELDS: Final = frozenset(
    {
        "event_id",
        "organization_id",
        "started_at",
        "duration_ms",
        "schema_version",
        "server_id",
        "session_id",
        "virtual_server_id",
        "rpc_method",
        "level",
        "status_code",
        "error",
        "bytes_in",
        "bytes_out",
        "user_id",
        "remote_ip",
        "client_id",
        "connection_id",
        "project_id",
        "api_key_id",
        "model",
        "event_type",
        "status",
        "input_tokens",
        "output_tokens",
        "cache_read_tokens",
        "cache_write_tokens",
        "cost_cents",
        "time_to_first_token_ms",
        "mcp_tool_name",
        "redaction_version",
    }
)

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

DEFAULT_PATTERNS: Final = (
    # Bearer tokens in any text (an Authorization header copied into a body, a log line ...).
    r"\b(?i:bearer)\s+[A-Za-z0-9\-._~+/]+=*",
    # OpenAI/Anthropic-style secret keys: sk-..., sk-proj-..., sk-ant-...
    r"\bsk-[A-Za-z0-9_\-]{16,}",
    # AWS access key ids.
    r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
    # GitHub tokens.
    r"\bgh[pousr]_[A-Za-z0-9]{36,}\b",
    # E-mail addresses.
    r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}",
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
    _regex: re.Pattern[str] | None = field(init=False, repr=False, compare=False)

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
        # One alternation: a single pass over each string instead of one per pattern. Each pattern is
        # compiled alone first so a bad one is named (and global flags like `(?i)` are refused: they
        # would apply to every pattern; use the scoped form `(?i:...)`).
        for pattern in self.patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"redaction pattern {pattern!r}: {exc}") from None
            if pattern.startswith("(?") and re.match(r"\(\?[aiLmsux]+\)", pattern):
                raise ValueError(f"redaction pattern {pattern!r}: use a scoped flag group, e.g. (?i:...)")
        regex = re.compile("|".join(f"(?:{p})" for p in self.patterns)) if self.patterns else None
        object.__setattr__(self, "_paths", tuple(paths))
        object.__setattr__(self, "_regex", regex)

    def redact(self, event: Mapping[str, Any]) -> dict[str, Any]:
        """A copy of `event` with paths and patterns redacted and `redaction_version` set."""
        out = dict(event)
        for path in self._paths:
            _redact_path(out, path, self.marker)
        if self._regex is not None:
            for name in self.scan_fields:
                if name in out:
                    out[name] = _scrub(out[name], self._regex, self.marker)
        out["redaction_version"] = self.version
        return out

    def redact_text(self, text: str) -> str:
        """`text` with every pattern match replaced (for callers that build bodies themselves)."""
        return text if self._regex is None else self._regex.sub(self.marker, text)


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


def _scrub(value: Any, regex: re.Pattern[str], marker: str) -> Any:
    """`value` with pattern matches replaced in every string, keys included; new containers."""
    if isinstance(value, str):
        return regex.sub(marker, value)
    if isinstance(value, dict):
        return {
            (regex.sub(marker, k) if isinstance(k, str) else k): _scrub(v, regex, marker)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_scrub(v, regex, marker) for v in value]
    return value
