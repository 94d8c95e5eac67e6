"""What `omnilog bench` drains (bench/harness/runner.py Plan): every backlog in arrival order, and
one worst-case drain of the reference size in random order, under a key of its own."""

from __future__ import annotations

from bench.harness import traffic
from bench.harness.runner import Plan, drain_key


def test_full_run_drains_in_arrival_order_plus_one_random_drain_of_the_reference_size() -> None:
    plan = Plan.full()
    drains = plan.one_worker_drains()
    assert [key for key, _ in drains] == ["drain_200k", "drain_1m", "drain_5m", "drain_1m_random"]
    for key, scenario in drains[:-1]:
        assert scenario.ordered and scenario.arrival == traffic.ORDERED, key
        assert scenario.workers == 1 and scenario.seed == 1
    worst = drains[-1][1]
    assert not worst.ordered and worst.arrival == traffic.RANDOM
    # the same events as the ordered 1 M drain, only their arrival differs
    assert (worst.backlog, worst.seed, worst.workers) == (1_000_000, 1, 1)
    assert worst.label != drains[1][1].label  # its own topic, database and consumer group


def test_scaling_and_attribution_runs_arrive_in_order_too() -> None:
    plan = Plan.full()
    scaling = plan.scaling_scenarios()
    assert sorted(scaling) == [1, 2, 4]
    assert all(s.ordered and s.workers == n for n, s in scaling.items())
    variants = plan.variant_scenarios()
    assert [key for key, _ in variants] == ["variant_index_only", "variant_no_merger"]
    assert all(s.ordered and s.variant != "full" for _, s in variants)
    assert Plan.quick().variant_scenarios() == []


def test_the_worst_case_follows_the_reference_drain_and_can_be_left_out() -> None:
    plan = Plan.full().with_drains((200_000,))
    assert [key for key, _ in plan.one_worker_drains()] == ["drain_200k", "drain_200k_random"]
    quick = Plan.quick()
    assert [key for key, _ in quick.one_worker_drains()] == ["drain_30k", "drain_30k_random"]
    assert [key for key, _ in quick.without_random_drain().one_worker_drains()] == ["drain_30k"]


def test_random_arrival_everywhere_has_no_separate_worst_case() -> None:
    plan = Plan.full().with_arrival(ordered=False)
    drains = plan.one_worker_drains()
    assert [key for key, _ in drains] == ["drain_200k", "drain_1m", "drain_5m"]
    assert all(not s.ordered for _, s in drains)
    assert all(not s.ordered for s in plan.scaling_scenarios().values())
    assert plan.arrival == traffic.RANDOM


def test_drain_keys() -> None:
    assert drain_key(30_000) == "drain_30k"
    assert drain_key(5_000_000) == "drain_5m"
    assert drain_key(1_000_000, traffic.RANDOM) == "drain_1m_random"
    assert drain_key(1_234) == "drain_1234"
