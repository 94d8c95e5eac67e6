"""The collector settings the worker and the merger apply at start-up."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from pipeline.gc_tuning import tune_gc


@pytest.fixture(autouse=True)
def _restore_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_the_young_generation_threshold_is_raised_and_start_up_objects_frozen() -> None:
    gc.set_threshold(700, 10, 10)
    kept = [object() for _ in range(10)]  # anything alive before tune_gc is start-up state
    tune_gc(50_000)
    assert gc.get_threshold() == (50_000, 10, 10)
    assert gc.get_freeze_count() > 0
    del kept


def test_zero_keeps_cpythons_defaults() -> None:
    gc.set_threshold(700, 10, 10)
    tune_gc(0)
    assert gc.get_threshold() == (700, 10, 10)
    assert gc.get_freeze_count() == 0
