"""Garbage-collector settings for the long-running processes (ingest worker, merger).

A worker holds up to three batches of 20 000 decoded events (the buffer and two in flight), which
is a few million tracked container objects. With CPython's default thresholds (700, 10, 10) a
young collection runs every 700 allocations and every 100th one is a full collection that walks
all of them, although nearly all of that memory is freed by reference counting, not by the
collector (events, rows and messages hold no cycles). So the collector is run far less often:
`gc.freeze()` moves what start-up allocated (modules, clients, settings) out of every later
collection, and the young generation is collected every OMNILOG_GC_GEN0_THRESHOLD allocations.
Cycles are still collected, later. Measured in docs/performance.md ("Garbage collector").
"""

from __future__ import annotations

import gc


def tune_gc(gen0_threshold: int) -> None:
    """Apply the collector settings; 0 keeps CPython's defaults."""
    if gen0_threshold <= 0:
        return
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(gen0_threshold, gen1, gen2)
