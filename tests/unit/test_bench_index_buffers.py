"""bench/harness/index_buffers.py: arms as the command line names them, medians per fifth."""

from __future__ import annotations

import pytest

from bench.harness.index_buffers import Arm, fifth_medians


def test_arms_parse_size_and_insert_order() -> None:
    assert Arm.parse("256MB") == Arm("256MB", sorted_insert=False)
    sorted_arm = Arm.parse("2GB:sorted")
    assert sorted_arm == Arm("2GB", sorted_insert=True) and sorted_arm.name == "2GB:sorted"
    with pytest.raises(ValueError, match="not an arm"):
        Arm.parse("2GB:shuffled")


def test_fifth_medians_are_in_order_and_per_row() -> None:
    # ten batches of 1 000 rows: 1 ms each in the first half, 3 ms in the second
    seconds = [0.001] * 5 + [0.003] * 5
    assert fifth_medians(seconds, 1_000) == [1.0, 1.0, 2.0, 3.0, 3.0]
    assert fifth_medians([0.002] * 3, 1_000) == [2.0, 2.0, 2.0]  # fewer batches than fifths
