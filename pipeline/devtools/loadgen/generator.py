"""Deterministic synthetic gateway traffic (`omnilog produce`, tests, the benchmark).

`generate(config)` yields `GeneratedMessage`s (key, value bytes, and what the message is: a valid event seen
for the first time, a byte-identical re-send of an earlier one, or an invalid message of a named
kind). The same config gives the same bytes: all randomness comes from one numpy generator seeded
with `config.seed`, and every timestamp derives from `config.base_time`. A shorter run is a prefix of
a longer one with the same config (draws happen in fixed-size chunks regardless of `count`).

Organizations, servers, sessions, users and projects are Zipf-distributed (a few large tenants, a
long tail); methods, latencies, errors, body sizes and usage follow `pipeline.devtools.loadgen.model`.

Speed: bodies are drawn from per-method pools built once; per event the generator does a handful of
list lookups, one dict and one `orjson.dumps` — about 10 µs, so one core feeds well over 30 k
events/s.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal

import numpy as np
import orjson

from pipeline.devtools.loadgen import model

MessageKind = Literal["valid", "duplicate", "invalid"]

# Each is the reason `pipeline.contract.validate_event` gives for it (the dead-letter header).
INVALID_KINDS: Final = (
    "not_json",
    "not_utf8",
    "not_object",
    "missing_field",
    "bad_uuid",
    "bad_type",
    "negative_value",
    "out_of_range",
    "too_long",
    "bad_ip",
    "bad_timestamp",
    "bad_enum",
)

_CHUNK: Final = 2048
_POOL: Final = 64  # bodies per method
_DUPLICATE_WINDOW: Final = 4096  # duplicates re-send one of the last this-many valid messages
_HOUR_MS: Final = 3_600_000


@dataclass(frozen=True)
class LoadConfig:
    """What to generate. `count=None` means an endless stream (the caller stops it)."""

    count: int | None = 10_000
    seed: int = 0
    base_time: datetime = field(default_factory=lambda: datetime.now(UTC))
    orgs: int = 10
    servers_per_org: int = 5
    span_hours: float = 24.0  # valid events start within (base_time - span_hours, base_time]
    late_fraction: float = 0.0  # ... except these: 1 h to `late_max_hours` before the span
    late_max_hours: float = 72.0
    duplicate_fraction: float = 0.0
    invalid_fraction: float = 0.0
    sessions_per_server: int = 40
    users_per_org: int = 200
    projects_per_org: int = 3
    zipf_exponent: float = 1.1

    def __post_init__(self) -> None:
        if self.base_time.tzinfo is None:
            raise ValueError("base_time must be timezone-aware")
        if self.count is not None and self.count < 0:
            raise ValueError("count must be >= 0")
        for name in ("orgs", "servers_per_org", "sessions_per_server", "users_per_org", "projects_per_org"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for name in ("late_fraction", "duplicate_fraction", "invalid_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within 0..1")
        if self.duplicate_fraction + self.invalid_fraction > 1.0:
            raise ValueError("duplicate_fraction + invalid_fraction must be <= 1")
        if self.span_hours <= 0 or self.late_max_hours < 1:
            raise ValueError("span_hours must be > 0 and late_max_hours >= 1")

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["base_time"] = _iso_ms(_epoch_ms(self.base_time))
        return out


@dataclass(frozen=True, slots=True)
class EventFacts:
    """What the summary needs of a valid event (the same values as in its JSON)."""

    organization_id: str
    server_id: str
    rpc_method: str
    started_ms: int  # Unix epoch milliseconds
    duration_ms: int
    error: bool
    bytes_in: int
    bytes_out: int
    late: bool
    project_id: str | None = None
    model: str | None = None
    status: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cost_cents: int = 0


@dataclass(frozen=True, slots=True)
class GeneratedMessage:
    key: bytes
    value: bytes
    kind: MessageKind
    invalid_kind: str | None = None
    event_id: str | None = None  # valid and duplicate messages
    facts: EventFacts | None = None  # valid messages only


def generate(config: LoadConfig) -> Iterator[GeneratedMessage]:
    """The messages of `config`, in order."""
    return _Generator(config).messages()


# -- helpers -------------------------------------------------------------------------------------


def _epoch_ms(moment: datetime) -> int:
    return (moment.astimezone(UTC) - datetime(1970, 1, 1, tzinfo=UTC)) // _ONE_MS


_ONE_MS: Final = datetime(1970, 1, 1, 0, 0, 0, 1000, tzinfo=UTC) - datetime(1970, 1, 1, tzinfo=UTC)


def _iso_ms(epoch_ms: int) -> str:
    moment = datetime.fromtimestamp(epoch_ms // 1000, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{epoch_ms % 1000:03d}Z"


def _uuid_text(value: int) -> str:
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _uuid4(rng: np.random.Generator) -> str:
    raw = int.from_bytes(rng.bytes(16), "big")
    raw = (raw & ~(0xF << 76)) | (0x4 << 76)  # version 4
    raw = (raw & ~(0x3 << 62)) | (0x2 << 62)  # RFC 4122 variant
    return _uuid_text(raw)


def _uuid7(epoch_ms: int, rand_a: int, rand_b: int) -> str:
    # RFC 9562 layout: 48-bit ms timestamp, version 7, 12 random bits, variant, 62 random bits.
    return _uuid_text((epoch_ms << 80) | (0x7 << 76) | (rand_a << 64) | (0x2 << 62) | rand_b)


def _zipf_weights(n: int, exponent: float) -> np.ndarray[Any, np.dtype[np.float64]]:
    weights = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** exponent
    return np.asarray(weights / weights.sum(), dtype=np.float64)


class _Timestamps:
    """RFC 3339 text of epoch milliseconds, caching the per-minute prefix (strftime is slow)."""

    def __init__(self) -> None:
        self._prefix: dict[int, str] = {}

    def __call__(self, epoch_ms: int) -> str:
        minute, rest = divmod(epoch_ms, 60_000)
        prefix = self._prefix.get(minute)
        if prefix is None:
            if len(self._prefix) > 100_000:
                self._prefix.clear()
            prefix = datetime.fromtimestamp(minute * 60, UTC).strftime("%Y-%m-%dT%H:%M:")
            self._prefix[minute] = prefix
        seconds, millis = divmod(rest, 1000)
        return f"{prefix}{seconds:02d}.{millis:03d}Z"


# -- the generator -------------------------------------------------------------------------------


class _Generator:
    def __init__(self, config: LoadConfig) -> None:
        self.config = config
        self.rng = np.random.default_rng(config.seed)
        rng = self.rng
        c = config
        self.orgs = [_uuid4(rng) for _ in range(c.orgs)]
        self.servers = [[_uuid4(rng) for _ in range(c.servers_per_org)] for _ in range(c.orgs)]
        self.keys = [
            [f"{o}:{s}".encode() for s in servers] for o, servers in zip(self.orgs, self.servers, strict=True)
        ]
        self.sessions = [
            [[_uuid4(rng) for _ in range(c.sessions_per_server)] for _ in range(c.servers_per_org)]
            for _ in range(c.orgs)
        ]
        self.users = [
            [f"usr_{rng.integers(0, 2**48):012x}" for _ in range(c.users_per_org)] for _ in range(c.orgs)
        ]
        self.user_ips = [[self._ip() for _ in range(c.users_per_org)] for _ in range(c.orgs)]
        self.projects = [[_uuid4(rng) for _ in range(c.projects_per_org)] for _ in range(c.orgs)]
        self.api_keys = [[_uuid4(rng) for _ in range(c.projects_per_org)] for _ in range(c.orgs)]
        self.clients = [_uuid4(rng) for _ in range(64)]
        self.org_p = _zipf_weights(c.orgs, c.zipf_exponent)
        self.server_p = _zipf_weights(c.servers_per_org, c.zipf_exponent)
        self.session_p = _zipf_weights(c.sessions_per_server, c.zipf_exponent)
        self.user_p = _zipf_weights(c.users_per_org, c.zipf_exponent)
        self.project_p = _zipf_weights(c.projects_per_org, c.zipf_exponent)
        methods = model.METHODS
        self.method_p = np.array([m.weight for m in methods]) / sum(m.weight for m in methods)
        self.mu = [math.log(m.latency_median_ms) for m in methods]
        self.model_p = np.array([m.weight for m in model.MODELS]) / sum(m.weight for m in model.MODELS)
        self.error_status_p = np.array([w for _, w in model.ERROR_STATUSES])
        self.error_status_p /= self.error_status_p.sum()
        self.requests = [[self._request_body(m, i) for i in range(_POOL)] for m in methods]
        self.responses = [[self._response_body(m, i) for i in range(_POOL)] for m in methods]
        self.headers = [self._headers(i) for i in range(_POOL)]
        self.timestamps = _Timestamps()
        self.base_ms = _epoch_ms(c.base_time)
        self.recent: deque[GeneratedMessage] = deque(maxlen=_DUPLICATE_WINDOW)

    # Pools, built once from the seeded generator.

    def _ip(self) -> str:
        rng = self.rng
        if rng.random() < 0.15:
            groups = rng.integers(0, 0x10000, size=4).tolist()
            return "2001:db8:" + ":".join(f"{g:x}" for g in groups) + "::1"
        a, b, c, d = rng.integers(1, 255, size=4).tolist()
        return f"{a}.{b}.{c}.{d}"

    def _text(self, words: int) -> str:
        picks = self.rng.integers(0, len(model.WORDS), size=max(1, words)).tolist()
        return " ".join(model.WORDS[p] for p in picks)

    def _request_body(self, method: model.MethodProfile, i: int) -> tuple[dict[str, Any], int]:
        rng = self.rng
        params: dict[str, Any]
        if method.name == "tools/call":
            tool = model.TOOL_NAMES[int(rng.integers(0, len(model.TOOL_NAMES)))]
            params = {"name": tool, "arguments": {"query": self._text(int(rng.lognormal(1.6, 0.8)))}}
            if i % 8 == 0:
                params["arguments"]["limit"] = int(rng.integers(1, 100))
        elif method.name == "sampling/createMessage":
            params = {
                "messages": [
                    {
                        "role": "user",
                        "content": {"type": "text", "text": self._text(int(rng.lognormal(2.5, 0.7)))},
                    }
                ],
                "maxTokens": int(rng.choice([256, 1024, 4096])),
            }
        elif method.name == "resources/read":
            scheme = model.RESOURCE_SCHEMES[i % len(model.RESOURCE_SCHEMES)]
            params = {"uri": scheme + self._text(2).replace(" ", "/")}
        elif method.name == "prompts/get":
            params = {"name": f"prompt_{i % 12}", "arguments": {"topic": self._text(3)}}
        elif method.name == "initialize":
            params = {
                "protocolVersion": model.PROTOCOL_VERSIONS[i % len(model.PROTOCOL_VERSIONS)],
                "capabilities": {"sampling": {}, "roots": {"listChanged": True}},
                "clientInfo": {
                    "name": model.USER_AGENTS[i % len(model.USER_AGENTS)].split("/")[0],
                    "version": "1.0",
                },
            }
        elif method.name == "completion/complete":
            params = {
                "ref": {"type": "ref/prompt", "name": f"prompt_{i % 12}"},
                "argument": {"name": "topic", "value": self._text(1)},
            }
        else:
            params = {}
        body: dict[str, Any] = {"jsonrpc": "2.0", "method": method.name}
        if method.response:
            body["id"] = int(rng.integers(1, 10_000))
        if params:
            body["params"] = params
        return body, len(orjson.dumps(body))

    def _response_body(self, method: model.MethodProfile, i: int) -> tuple[dict[str, Any] | None, int]:
        # The stored body is a preview (gateways truncate); the second item is the full size the
        # response had on the wire, which becomes bytes_out.
        rng = self.rng
        if not method.response:
            return None, 0
        if method.name in ("tools/call", "resources/read", "sampling/createMessage"):
            full = int(rng.lognormal(7.5, 1.1))  # median ~1.8 kB, long tail
            preview = self._text(int(rng.integers(2, 14)))
            key = "contents" if method.name == "resources/read" else "content"
            result: dict[str, Any] = {key: [{"type": "text", "text": preview}]}
            if full > 2048:
                result["truncated"] = True
        elif method.name in ("tools/list", "resources/list", "prompts/list"):
            n = int(rng.integers(3, 40))
            full = 180 * n
            result = {"count": n, "truncated": True}
        else:
            result = {"ok": True} if method.name != "initialize" else {"protocolVersion": "2025-06-18"}
            full = 0
        body = {"jsonrpc": "2.0", "id": int(rng.integers(1, 10_000)), "result": result}
        return body, max(full, len(orjson.dumps(body)))

    def _headers(self, i: int) -> dict[str, str] | None:
        if i % 2 == 1:
            return None  # half the gateways log no headers
        headers = {"user-agent": model.USER_AGENTS[i % len(model.USER_AGENTS)]}
        if i % 4 == 0:
            headers["mcp-protocol-version"] = model.PROTOCOL_VERSIONS[i % len(model.PROTOCOL_VERSIONS)]
        if i % 8 == 0:
            headers["authorization"] = "[REDACTED]"
        return headers

    # The stream.

    def messages(self) -> Iterator[GeneratedMessage]:
        remaining = self.config.count
        while remaining is None or remaining > 0:
            for message in self._chunk():
                yield message
                if remaining is not None:
                    remaining -= 1
                    if remaining == 0:
                        return

    def _chunk(self) -> Iterator[GeneratedMessage]:
        rng, c, n = self.rng, self.config, _CHUNK
        kind_u = rng.random(n).tolist()
        org = rng.choice(c.orgs, size=n, p=self.org_p).tolist()
        server = rng.choice(c.servers_per_org, size=n, p=self.server_p).tolist()
        session = rng.choice(c.sessions_per_server, size=n, p=self.session_p).tolist()
        user = rng.choice(c.users_per_org, size=n, p=self.user_p).tolist()
        project = rng.choice(c.projects_per_org, size=n, p=self.project_p).tolist()
        method = rng.choice(len(model.METHODS), size=n, p=self.method_p).tolist()
        latency_z = rng.standard_normal(n).tolist()
        error_u = rng.random(n).tolist()
        error_status = rng.choice(len(model.ERROR_STATUSES), size=n, p=self.error_status_p).tolist()
        late_u = rng.random(n).tolist()
        offset_u = rng.random(n).tolist()
        late_hours = rng.uniform(1.0, c.late_max_hours, size=n).tolist()
        rand_a = rng.integers(0, 1 << 12, size=n).tolist()
        rand_b = rng.integers(0, 1 << 62, size=n, dtype=np.uint64).tolist()
        request_i = rng.integers(0, _POOL, size=n).tolist()
        response_i = rng.integers(0, _POOL, size=n).tolist()
        client = rng.integers(0, len(self.clients), size=n).tolist()
        model_i = rng.choice(len(model.MODELS), size=n, p=self.model_p).tolist()
        tokens_in = rng.lognormal(7.0, 1.0, size=n).tolist()
        tokens_out = rng.lognormal(5.5, 0.9, size=n).tolist()
        cache_u = rng.random(n).tolist()
        stream_u = rng.random(n).tolist()
        pick_u = rng.random(n).tolist()
        invalid_i = rng.integers(0, len(INVALID_KINDS), size=n).tolist()
        variant_u = rng.random(n).tolist()

        invalid_cut = c.invalid_fraction
        duplicate_cut = c.invalid_fraction + c.duplicate_fraction
        span_ms = c.span_hours * _HOUR_MS
        for i in range(n):
            u = kind_u[i]
            if invalid_cut <= u < duplicate_cut and self.recent:
                earlier = self.recent[int(pick_u[i] * len(self.recent))]
                yield GeneratedMessage(earlier.key, earlier.value, "duplicate", event_id=earlier.event_id)
                continue
            o, s, m = org[i], server[i], method[i]
            profile = model.METHODS[m]
            late = late_u[i] < c.late_fraction
            if late:
                started = self.base_ms - int(span_ms + late_hours[i] * _HOUR_MS)
            else:
                started = self.base_ms - int(offset_u[i] * span_ms)
            duration = int(math.exp(self.mu[m] + profile.latency_sigma * latency_z[i]))
            failed = error_u[i] < profile.error_rate
            status_code = model.ERROR_STATUSES[error_status[i]][0] if failed else 200
            if not profile.response and not failed:
                status_code = 202
            request, request_size = self.requests[m][request_i[i]]
            response, bytes_out = self.responses[m][response_i[i]]
            headers = self.headers[request_i[i]]
            bytes_in = request_size + 180  # + the HTTP request line and headers
            event_id = _uuid7(started, rand_a[i], rand_b[i])
            event: dict[str, Any] = {
                "event_id": event_id,
                "organization_id": self.orgs[o],
                "server_id": self.servers[o][s],
                "session_id": self.sessions[o][s][session[i]],
                "started_at": self.timestamps(started),
                "duration_ms": duration,
                "rpc_method": profile.name,
                "status_code": status_code,
                "bytes_in": bytes_in,
                "bytes_out": bytes_out if not failed else 0,
                "user_id": self.users[o][user[i]],
                "remote_ip": self.user_ips[o][user[i]],
            }
            if s % 2 == 0:  # producers on older SDKs leave the optional schema_version out
                event["schema_version"] = 1
            if status_code >= 400:  # level "info" is the default: left out, as SDKs do
                event["level"] = "error" if status_code >= 500 else "warn"
            if client[i] < 16:  # a quarter of the clients identify themselves
                event["client_id"] = self.clients[client[i]]
            facts_usage: tuple[Any, ...] = ()
            if profile.usage is not None:
                facts_usage = self._usage(
                    event, profile.usage, o, project[i], model_i[i], status_code,
                    tokens_in[i], tokens_out[i], cache_u[i], stream_u[i], duration, request,
                )  # fmt: skip
            if headers is not None:
                event["headers"] = headers
            event["request"] = request
            if response is not None and not failed:
                event["response"] = response
            elif failed:
                event["response"] = {
                    "jsonrpc": "2.0",
                    "error": {"code": -32000, "message": f"HTTP {status_code}"},
                }
            value = orjson.dumps(event)
            key = self.keys[o][s]
            if u < invalid_cut:
                kind = INVALID_KINDS[invalid_i[i]]
                yield GeneratedMessage(key, _break(kind, event, variant_u[i]), "invalid", invalid_kind=kind)
                continue
            facts = EventFacts(
                self.orgs[o], self.servers[o][s], profile.name, started, duration, status_code >= 400,
                bytes_in, event["bytes_out"], late, *facts_usage,
            )  # fmt: skip
            message = GeneratedMessage(key, value, "valid", event_id=event_id, facts=facts)
            self.recent.append(message)
            yield message

    def _usage(
        self,
        event: dict[str, Any],
        usage: str,
        org: int,
        project: int,
        model_index: int,
        status_code: int,
        tokens_in: float,
        tokens_out: float,
        cache_u: float,
        stream_u: float,
        duration: int,
        request: dict[str, Any],
    ) -> tuple[Any, ...]:
        """Set the usage fields on `event`; return them in EventFacts order (after `late`)."""
        status = "success"
        if status_code == 429:
            status = "rate_limited"
        elif status_code == 504:
            status = "timeout"
        elif status_code >= 400:
            status = "error"
        project_id = self.projects[org][project]
        event["project_id"] = project_id
        event["api_key_id"] = self.api_keys[org][project]
        event["status"] = status
        if usage == "tool":
            event["event_type"] = "mcp_tool"
            event["mcp_tool_name"] = request["params"]["name"]
            return (project_id, None, status)
        price = model.MODELS[model_index]
        ok = status == "success"
        input_tokens = int(tokens_in)
        output_tokens = int(tokens_out) if ok else 0
        cache_read = int(input_tokens * 0.6) if cache_u < 0.4 else 0
        cache_write = int(input_tokens * 0.3) if 0.4 <= cache_u < 0.5 else 0
        cost = math.ceil(
            (input_tokens * price.input_cents_per_mtok + output_tokens * price.output_cents_per_mtok)
            / 1_000_000
        )
        event["event_type"] = "streaming" if stream_u < 0.3 else "api_call"
        event["model"] = price.name
        event["input_tokens"] = input_tokens
        event["output_tokens"] = output_tokens
        event["cache_read_tokens"] = cache_read
        event["cache_write_tokens"] = cache_write
        event["cost_cents"] = cost
        if ok:
            event["time_to_first_token_ms"] = min(duration, int(duration * 0.2) + 80)
        return (project_id, price.name, status, input_tokens, output_tokens, cache_read, cache_write, cost)


def _break(kind: str, event: dict[str, Any], u: float) -> bytes:
    """`event` made invalid in the way `kind` names (the reason the validator gives for it)."""
    bad = dict(event)
    if kind == "not_json":
        return orjson.dumps(event)[: max(1, int(u * 200))]  # cut short: an unterminated object
    if kind == "not_utf8":
        return b'{"event_id": "\xff\xfe' + orjson.dumps(event)[16:]
    if kind == "not_object":
        return orjson.dumps([event] if u < 0.5 else event["event_id"])
    if kind == "missing_field":
        field_name = ("event_id", "organization_id", "started_at", "duration_ms")[int(u * 4)]
        if u < 0.9:
            del bad[field_name]
        else:
            bad[field_name] = None
    elif kind == "bad_uuid":
        name = "organization_id" if u < 0.5 else "event_id"
        bad[name] = f"org-{int(u * 10_000)}" if u < 0.5 else bad[name][:-4] + "zzzz"
    elif kind == "bad_type":
        bad["duration_ms"] = str(bad["duration_ms"]) if u < 0.5 else [bad["duration_ms"]]
    elif kind == "negative_value":
        bad["duration_ms" if u < 0.7 else "bytes_in"] = -1 - int(u * 1000)
    elif kind == "out_of_range":
        bad["status_code"] = 700 + int(u * 200)
    elif kind == "too_long":
        if u < 0.5:
            bad["rpc_method"] = "tools/" + "x" * (101 + int(u * 100))
        else:
            bad["user_id"] = "u" * (256 + int(u * 500))
    elif kind == "bad_ip":
        bad["remote_ip"] = ("999.1.2.3", "localhost", "10.0.0", "fe80::1%eth0")[int(u * 4)]
    elif kind == "bad_timestamp":
        started = bad["started_at"]
        bad["started_at"] = (started[:-1], started.replace("T", " ")[:-5], "yesterday", started[:10])[
            int(u * 4)
        ]
    elif kind == "bad_enum":
        bad["level"] = ("verbose", "ERROR ", "critical")[int(u * 3)]
    else:  # pragma: no cover - INVALID_KINDS is closed
        raise AssertionError(kind)
    return orjson.dumps(bad)
