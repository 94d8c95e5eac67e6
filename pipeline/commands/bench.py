"""`omnilog bench`: the benchmark harness (docs/performance.md)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
from pathlib import Path

import click


@click.command("bench")
@click.option("--quick", is_flag=True, help="Small sizes for a CI smoke run (about 2 minutes).")
@click.option(
    "--use-env",
    is_flag=True,
    help="Reuse the running stack described by OMNILOG_*/AWS_* variables (e.g. `source .omnilog/stack.env`) "
    "instead of starting one.",
)
@click.option(
    "--root",
    type=click.Path(path_type=Path),
    default=None,
    help="Root of the stack the run starts (default: a fresh directory under /tmp); "
    "it is stopped and purged afterwards.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("bench/results"),
    show_default=True,
    help="Where the results JSON (timestamped + latest.json), bench.md and bench.png go.",
)
@click.option(
    "--drains",
    default=None,
    metavar="SIZES",
    help="Backlog sizes of the 1-worker drains, comma-separated (e.g. 200000,1m) [default: 30k with "
    "--quick, else 200k,1m,5m]. The 1 M drain (else the largest) is the reference the ratios, CPU and "
    "memory targets use; targets whose drain was not chosen say 'not measured'.",
)
@click.option(
    "--arrival",
    type=click.Choice(["ordered", "random"]),
    default="ordered",
    show_default=True,
    help="How every backlog's events arrive: roughly in time order as a gateway's stream does "
    "(started_at and the UUIDv7 event ids grow, ±2 s), or spread at random over the hour (the "
    "indexes' worst case; every run before arrival order was the default).",
)
@click.option(
    "--no-random-drain",
    is_flag=True,
    help="Skip the worst-case drain: the reference size once more, arriving in random order "
    "(reported in its own row with its ratio to the ordered drain). Implied by --arrival random.",
)
@click.option("--profile", is_flag=True, help="py-spy the reference drain (profile.svg in --out).")
@click.option("--no-chart", is_flag=True, help="Skip the PNG chart.")
def command(
    quick: bool,
    use_env: bool,
    root: Path | None,
    out: Path,
    drains: str | None,
    arrival: str,
    no_random_drain: bool,
    profile: bool,
    no_chart: bool,
) -> None:
    """Measure ingest throughput, freshness and memory against the ceilings and a faust peer."""
    try:
        from bench.harness import report
        from bench.harness.env import BenchEnv, info_from_environment, own_stack
        from bench.harness.runner import Plan, parse_sizes, run
    except ModuleNotFoundError as exc:
        # The harness lives next to the bench scripts, not in pipeline/: the container image
        # ships without it.
        if exc.name is None or exc.name.split(".")[0] != "bench":
            raise
        raise click.ClickException(
            "the benchmark harness (bench/harness/) is not installed here: "
            "run from a checkout installed with `pip install -e '.[dev,stack,bench]'`"
        ) from None

    logging.basicConfig(level=logging.WARNING)
    plan = Plan.quick() if quick else Plan.full()
    if drains is not None:
        try:
            plan = plan.with_drains(parse_sizes(drains))
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--drains") from None
    plan = plan.with_arrival(ordered=arrival == "ordered")
    if no_random_drain:
        plan = plan.without_random_drain()

    def say(line: str) -> None:
        click.echo(f"bench: {line}", err=True)

    work = Path(tempfile.mkdtemp(prefix="omnilog-bench-work-"))
    with contextlib.ExitStack() as stack:
        if use_env:
            try:
                info = info_from_environment()
            except ValueError as exc:
                raise click.UsageError(str(exc)) from None
        else:
            say("starting the embedded stack ...")
            info = stack.enter_context(own_stack(root))
        env = BenchEnv(info)

        async def main() -> dict[str, object]:
            try:
                return await run(env, plan, work, say, profile=profile)
            finally:
                await env.cleanup()

        try:
            result = asyncio.run(main())
        except BaseException:
            say(f"failed; worker and peer logs are kept in {work / 'logs'}")
            raise
    path = report.write_json(result, out)
    table = report.markdown(result)
    (out / f"bench-{plan.mode}.md").write_text(table)
    flame = work / "profile" / "profile.svg"
    if profile and flame.exists():
        # The flame graph only: the collapsed stacks (MBs) are summarised into the JSON.
        shutil.copy(flame, out / "profile.svg")
    if not no_chart:
        report.chart(result, out / "bench.png")
    shutil.rmtree(work, ignore_errors=True)
    click.echo(table)
    say(f"results: {path} (and {out / 'latest.json'})")
