"""How long emit-time redaction (`pipeline.sdk.redaction`) takes on 1 MiB bodies.

    .venv/bin/python bench/redaction_speed.py [--size 1048576] [--repeat 5]

Redaction runs on the gateway's event loop, so its cost is request latency. Measures the default
`RedactionConfig` on bodies of ``--size`` characters:

- a JSON-RPC response of records (short strings, numbers, one e-mail in ten records), through
  `RedactionConfig.redact` as the producer calls it;
- single strings through `redact_text`: prose, url-safe base64 (a run of e-mail local-part
  characters with no "@": the input that was quadratic), one letter repeated, and text that is
  nothing but e-mail addresses (one marker every 23 characters);
- the previous implementation (one alternation of the old patterns, `re.sub`) on url-safe base64
  at 20 kB and 40 kB, to show what the rewrite removed (it is quadratic: 1 MiB would take minutes).

Prints the best and the median of ``--repeat`` runs, in milliseconds.
"""

from __future__ import annotations

import argparse
import platform
import random
import re
import statistics
import time
from collections.abc import Callable
from typing import Any

import orjson

from pipeline.sdk.redaction import MARKER, RedactionConfig

_PREVIOUS = re.compile(
    "|".join(
        f"(?:{p})"
        for p in (
            r"\b(?i:bearer)\s+[A-Za-z0-9\-._~+/]+=*",
            r"\bsk-[A-Za-z0-9_\-]{16,}",
            r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
            r"\bgh[pousr]_[A-Za-z0-9]{36,}\b",
            r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}",
        )
    )
)
_BASE64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_WORDS = [
    "the",
    "of",
    "tools",
    "call",
    "result",
    "content",
    "text",
    "error",
    "server",
    "session",
    "user",
    "request",
    "id",
    "name",
]


def _records_body(size: int, rng: random.Random) -> dict[str, Any]:
    records: list[dict[str, Any]] = []
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "result": {"content": [{"type": "text", "text": "ok"}], "records": records},
    }
    while len(orjson.dumps(body)) < size:
        for _ in range(100):
            i = len(records)
            records.append(
                {
                    "id": i,
                    "name": " ".join(rng.choices(_WORDS, k=3)),
                    "email": f"user{i}@example.com" if i % 10 == 0 else None,
                    "tags": rng.choices(_WORDS, k=3),
                    "score": rng.random(),
                    "note": " ".join(rng.choices(_WORDS, k=12)),
                }
            )
    return body


def _time(run: Callable[[], object], repeat: int) -> tuple[float, float]:
    runs = []
    for _ in range(repeat):
        began = time.perf_counter()
        run()
        runs.append((time.perf_counter() - began) * 1000)
    return min(runs), statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1 << 20, help="characters per body")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    size, repeat = args.size, args.repeat
    rng = random.Random(1)
    config = RedactionConfig()

    body = _records_body(size, rng)
    event = {"event_id": "0190f0d8-0000-7000-8000-000000000001", "response": body}
    texts = {
        "prose": ("The quick brown fox jumps over the lazy dog; tools/call 200 OK. " * (size // 64 + 1))[
            :size
        ],
        "url-safe base64": "".join(rng.choices(_BASE64URL, k=size)),
        "one letter repeated": "a" * size,
        "only e-mail addresses": ("bob.smith@example.com, " * (size // 23 + 1))[:size],
    }

    print(f"python {platform.python_version()} on {platform.machine()}; best / median of {repeat} runs, ms")
    print(f"{'input':<44}{'best':>10}{'median':>10}")
    best, median = _time(lambda: config.redact(event), repeat)
    print(f"{f'JSON records body, {len(orjson.dumps(body))} B (redact)':<44}{best:>10.1f}{median:>10.1f}")
    for name, text in texts.items():
        best, median = _time(lambda text=text: config.redact_text(text), repeat)  # type: ignore[misc]
        print(f"{f'{name}, {len(text)} chars':<44}{best:>10.1f}{median:>10.1f}")
    for small in (20_000, 40_000):
        text = texts["url-safe base64"][:small]
        best, median = _time(lambda text=text: _PREVIOUS.sub(MARKER, text), min(repeat, 3))  # type: ignore[misc]
        print(f"{f'previous patterns, base64 {small} chars':<44}{best:>10.1f}{median:>10.1f}")


if __name__ == "__main__":
    main()
