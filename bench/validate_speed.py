"""A/B micro-benchmark of `validate_event`: the validator before and after remembered ids.

    .venv/bin/python bench/validate_speed.py [--events 20000] [--rounds 9] [--traffic all]
        [--against REV] [--clock batch|record]

"before" is the validator as it was before ids and addresses were remembered across events, kept
as the test oracle (tests/unit/contract/legacy_validate.py), or with `--against REV`
pipeline/contract/validate.py and rules.py as they were at that git revision; "after" is
`validate_event`. Both run in one process, alternating round by round, so a busy machine slows both
alike; each round validates the whole pool once. `--clock record` gives every message its own
reference time a millisecond apart, as the worker's record timestamps do (pipeline/processing/
flush.py `decode`); `batch` (the default) one clock reading for the whole pool. Times
are CPU time of this process (`time.process_time`), which other processes on a shared machine
disturb less than wall time. Printed: the median and best µs per message of each, and a bare
`orjson.loads` of the same values (the floor of both). Before timing, every message must get the
same verdict from both.

Traffic:
- `loadgen`: valid events of `pipeline.devtools.loadgen` (about 825 bytes, MCP and LLM bodies);
- `hostile`: the same generator with half of the messages broken, one of each invalid kind
  (not JSON, not UTF-8, a bad UUID, a negative counter...), plus 1 in 20 random bytes;
- `fresh`: valid events whose every id and address is new (a worst case: nothing recurs).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import random
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from types import ModuleType

import orjson

from bench.harness.sources import REPO, load_source, load_text, source_at
from pipeline.contract import ValidationPolicy, validate_event
from pipeline.devtools.loadgen.generator import LoadConfig, generate

_ORACLE = REPO / "tests" / "unit" / "contract" / "legacy_validate.py"

POLICY = ValidationPolicy(max_age=timedelta(days=90), max_future_skew=timedelta(hours=1))


def loadgen_traffic(count: int, now: datetime, invalid_fraction: float = 0.0) -> list[bytes]:
    config = LoadConfig(count=count, seed=1, base_time=now, invalid_fraction=invalid_fraction)
    return [message.value for message in generate(config)]


def hostile_traffic(count: int, now: datetime) -> list[bytes]:
    rng = random.Random(2)
    values = loadgen_traffic(count, now, invalid_fraction=0.5)
    return [rng.randbytes(rng.randint(0, 900)) if rng.random() < 0.05 else v for v in values]


def fresh_traffic(count: int, now: datetime) -> list[bytes]:
    rng = random.Random(3)
    out = []
    for value in loadgen_traffic(count, now):
        event = orjson.loads(value)
        for name in ("organization_id", "server_id", "session_id", "client_id", "project_id"):
            if name in event:
                event[name] = str(uuid.UUID(int=rng.getrandbits(128), version=4))
        event["remote_ip"] = f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(256)}"
        out.append(orjson.dumps(event))
    return out


def _load_oracle() -> Callable[[bytes | None, datetime, ValidationPolicy], object]:
    module = load_source(_ORACLE, "legacy_validate")
    validate: Callable[[bytes | None, datetime, ValidationPolicy], object] = module.validate_event
    return validate


def _load_revision(revision: str) -> Callable[[bytes | None, datetime, ValidationPolicy], object]:
    """validate_event of `revision`: its validate.py run against its own rules.py."""
    loaded: dict[str, ModuleType] = {}
    package = importlib.import_module("pipeline.contract")
    current_rules = sys.modules["pipeline.contract.rules"]
    try:
        for name in ("rules", "validate"):
            if name == "validate":  # its `from pipeline.contract import rules` must get the old rules
                sys.modules["pipeline.contract.rules"] = loaded["rules"]
                package.rules = loaded["rules"]  # type: ignore[attr-defined]
            text = source_at(revision, f"pipeline/contract/{name}.py")
            loaded[name] = load_text(text, f"_validate_speed_{name}_{revision}")
    finally:
        sys.modules["pipeline.contract.rules"] = current_rules
        package.rules = current_rules  # type: ignore[attr-defined]
    validate: Callable[[bytes | None, datetime, ValidationPolicy], object] = loaded["validate"].validate_event
    return validate


def _verdict(result: object) -> object:
    return getattr(result, "reason", None) or getattr(result, "event_id", None)


def compare(
    name: str,
    values: Sequence[bytes],
    clocks: Sequence[datetime],
    rounds: int,
    before: Callable[[bytes | None, datetime, ValidationPolicy], object],
) -> None:
    # The same verdict on every message first: a faster validator that disagrees is no result.
    for value, now in zip(values, clocks, strict=True):
        old, new = before(value, now, POLICY), validate_event(value, now, POLICY)
        if _verdict(old) != _verdict(new):
            raise SystemExit(f"{name}: verdicts differ on {value[:120]!r}: {old} / {new}")

    def run(validate: Callable[[bytes | None, datetime, ValidationPolicy], object]) -> Callable[[], None]:
        def all_values() -> None:
            for value, now in zip(values, clocks, strict=True):
                validate(value, now, POLICY)

        return all_values

    def decode_all() -> None:
        for value in values:
            with contextlib.suppress(orjson.JSONDecodeError):
                orjson.loads(value)

    contestants = {"before": run(before), "after (validate_event)": run(validate_event)}
    contestants["orjson.loads alone"] = decode_all
    samples: dict[str, list[float]] = {label: [] for label in contestants}
    gc.collect()
    for _ in range(rounds):
        for label, runner in contestants.items():
            start = time.process_time()
            runner()
            samples[label].append((time.process_time() - start) / len(values) * 1e6)
    sizes = [len(v) for v in values]
    print(
        f"{name}: {len(values)} messages, mean {statistics.fmean(sizes):.0f} B, {rounds} rounds interleaved"
    )
    for label, times in samples.items():
        print(f"  {label:24s} median {statistics.median(times):6.2f} µs/msg   best {min(times):6.2f}")
    ratio = statistics.median(samples["before"]) / statistics.median(samples["after (validate_event)"])
    print(f"  speed-up (median): x{ratio:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--traffic", choices=("loadgen", "hostile", "fresh", "all"), default="all")
    parser.add_argument("--against", help="compare with validate.py and rules.py at this git revision")
    parser.add_argument("--clock", choices=("batch", "record"), default="batch")
    args = parser.parse_args()

    now = datetime.now(UTC)
    traffic: dict[str, Callable[[], list[bytes]]] = {
        "loadgen": lambda: loadgen_traffic(args.events, now),
        "hostile": lambda: hostile_traffic(args.events, now),
        "fresh": lambda: fresh_traffic(args.events, now),
    }
    before = _load_revision(args.against) if args.against else _load_oracle()
    for name, build in traffic.items():
        if args.traffic in (name, "all"):
            values = build()
            step = timedelta(milliseconds=1 if args.clock == "record" else 0)
            clocks = [now - step * (len(values) - n) for n in range(len(values))]
            compare(name, values, clocks, args.rounds, before)


if __name__ == "__main__":
    main()
