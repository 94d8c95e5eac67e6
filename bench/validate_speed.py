"""A/B micro-benchmark of `validate_event`: the validator before and after remembered ids.

    .venv/bin/python bench/validate_speed.py [--events 20000] [--rounds 9] [--traffic all]

"before" is the validator as it was before ids and addresses were remembered across events, kept
as the test oracle (tests/unit/contract/legacy_validate.py); "after" is `validate_event`. Both run
in one process, alternating round by round, so a busy machine slows both alike; each round
validates the whole pool once, with one clock reading, as the ingest worker does per batch. Times
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
import random
import statistics
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from importlib import util
from pathlib import Path

import orjson

from pipeline.contract import ValidationPolicy, validate_event
from pipeline.devtools.loadgen.generator import LoadConfig, generate

_ORACLE = Path(__file__).resolve().parents[1] / "tests" / "unit" / "contract" / "legacy_validate.py"

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
    spec = util.spec_from_file_location("legacy_validate", _ORACLE)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {_ORACLE}")
    module = util.module_from_spec(spec)
    spec.loader.exec_module(module)
    validate: Callable[[bytes | None, datetime, ValidationPolicy], object] = module.validate_event
    return validate


def _verdict(result: object) -> object:
    return getattr(result, "reason", None) or getattr(result, "event_id", None)


def compare(
    name: str,
    values: Sequence[bytes],
    now: datetime,
    rounds: int,
    before: Callable[[bytes | None, datetime, ValidationPolicy], object],
) -> None:
    # The same verdict on every message first: a faster validator that disagrees is no result.
    for value in values:
        old, new = before(value, now, POLICY), validate_event(value, now, POLICY)
        if _verdict(old) != _verdict(new):
            raise SystemExit(f"{name}: verdicts differ on {value[:120]!r}: {old} / {new}")

    def run(validate: Callable[[bytes | None, datetime, ValidationPolicy], object]) -> Callable[[], None]:
        def all_values() -> None:
            for value in values:
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
    args = parser.parse_args()

    now = datetime.now(UTC)
    traffic: dict[str, Callable[[], list[bytes]]] = {
        "loadgen": lambda: loadgen_traffic(args.events, now),
        "hostile": lambda: hostile_traffic(args.events, now),
        "fresh": lambda: fresh_traffic(args.events, now),
    }
    before = _load_oracle()
    for name, build in traffic.items():
        if args.traffic in (name, "all"):
            compare(name, build(), now, args.rounds, before)


if __name__ == "__main__":
    main()
