"""Micro-benchmark of `pipeline.contract.validate_event` on realistic ~750-byte gateway events.

    .venv/bin/python bench/validate_speed.py [--events 20000] [--repeat 7]

Builds a pool of distinct events (MCP tool calls and LLM calls, with request/response bodies,
about 1 in 10 IPv6 and 1 in 50 pretty-printed), then validates the whole pool `--repeat` times
with one clock reading per pool, as the ingest worker does per batch, and prints the best and
median µs per event next to a bare `orjson.loads` of the same values (the floor).
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import orjson

from pipeline.contract import InvalidEvent, ValidationPolicy, validate_event

_METHODS = ("tools/call", "tools/list", "resources/read", "prompts/get", "initialize")
_MODELS = ("gpt-4o-mini", "claude-3-5-sonnet", "llama-3.1-70b")
_TOOLS = ("search_docs", "run_query", "fetch_url", "create_ticket")


def _uuid7ish(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def make_event(rng: random.Random, now: datetime) -> bytes:
    started = now - timedelta(seconds=rng.uniform(0, 3600))
    method = rng.choice(_METHODS)
    status = rng.choices((200, 400, 429, 500), weights=(90, 4, 3, 3))[0]
    event: dict[str, object] = {
        "event_id": _uuid7ish(rng),
        "organization_id": _uuid7ish(rng),
        "started_at": started.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "duration_ms": rng.randint(1, 5000),
        "server_id": _uuid7ish(rng),
        "session_id": _uuid7ish(rng) if rng.random() < 0.6 else None,
        "rpc_method": method,
        "level": "error" if status >= 500 else "info",
        "status_code": status,
        "bytes_in": rng.randint(100, 4000),
        "bytes_out": rng.randint(100, 20000),
        "user_id": f"user-{rng.randint(1, 5000)}",
        "remote_ip": (
            f"2001:db8::{rng.randint(1, 0xFFFF):x}:{rng.randint(1, 0xFFFF):x}"
            if rng.random() < 0.1
            else f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
        ),
        "request": {
            "jsonrpc": "2.0",
            "id": rng.randint(1, 10**6),
            "method": method,
            "params": {"name": rng.choice(_TOOLS), "arguments": {"query": "x" * rng.randint(0, 10)}},
        },
        "response": {
            "jsonrpc": "2.0",
            "result": {"content": [{"type": "text", "text": "y" * rng.randint(0, 30)}]},
        },
        "headers": {"user-agent": "omnimesh-gateway/1.4"},
    }
    if rng.random() < 0.5:
        event.update(
            project_id=_uuid7ish(rng),
            model=rng.choice(_MODELS),
            event_type="api_call",
            status="success" if status < 400 else "error",
            input_tokens=rng.randint(10, 4000),
            output_tokens=rng.randint(10, 2000),
            cost_cents=rng.randint(0, 50),
        )
    else:
        event.update(mcp_tool_name=rng.choice(_TOOLS), client_id=_uuid7ish(rng))
    option = orjson.OPT_INDENT_2 if rng.random() < 0.02 else 0
    return orjson.dumps(event, option=option)


def _time_per_item(run: Callable[[], None], items: int, repeat: int) -> list[float]:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        samples.append((time.perf_counter() - start) / items * 1e6)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    now = datetime.now(UTC)
    rng = random.Random(args.seed)
    values = [make_event(rng, now) for _ in range(args.events)]
    policy = ValidationPolicy(max_age=timedelta(days=90), max_future_skew=timedelta(hours=1))
    sizes = [len(v) for v in values]
    invalid = [r for r in (validate_event(v, now, policy) for v in values) if isinstance(r, InvalidEvent)]
    if invalid:
        raise SystemExit(f"benchmark events must be valid, got {invalid[0]}")

    def validate_all() -> None:
        for value in values:
            validate_event(value, now, policy)

    def decode_all() -> None:
        for value in values:
            orjson.loads(value)

    # Results are discarded at once, so GC pauses are not what is measured here (the worker's
    # batch-level GC policy is its own concern).
    gc.collect()
    validate = _time_per_item(validate_all, len(values), args.repeat)
    decode = _time_per_item(decode_all, len(values), args.repeat)
    print(
        f"{len(values)} events, mean {statistics.fmean(sizes):.0f} B "
        f"(min {min(sizes)}, max {max(sizes)}), best of {args.repeat} runs"
    )
    print(f"validate_event: best {min(validate):.2f} µs/event, median {statistics.median(validate):.2f}")
    print(f"orjson.loads  : best {min(decode):.2f} µs/event, median {statistics.median(decode):.2f}")


if __name__ == "__main__":
    main()
