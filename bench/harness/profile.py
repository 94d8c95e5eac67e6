"""Summaries of py-spy's collapsed stacks (`--format raw`): where a worker's samples went."""

from __future__ import annotations

from collections import Counter
from pathlib import Path


def _frames(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def _short(frame: str) -> str:
    # "function (path/to/module.py:123)" -> "function (module.py)"
    name, _, where = frame.partition(" (")
    file = where.rsplit("/", 1)[-1].split(":", 1)[0]
    return f"{name} ({file})" if file else name


def summarize(path: Path, top: int = 15) -> dict[str, object]:
    """Top frames by self and by inclusive share of all samples (idle included, labelled)."""
    stacks = _frames(path)
    total = sum(c for _, c in stacks) or 1
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for frames, count in stacks:
        names = [_short(f) for f in frames]
        own[names[-1]] += count
        for name in set(names):
            inclusive[name] += count
    return {
        "samples": total,
        "self": [(name, round(100 * c / total, 1)) for name, c in own.most_common(top)],
        "inclusive": [(name, round(100 * c / total, 1)) for name, c in inclusive.most_common(top * 2)],
    }
