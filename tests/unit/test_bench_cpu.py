"""CPU accounting of the bench harness (bench/harness/cpu.py): a process tree's CPU between two
snapshots includes children that were born and exited in between."""

from __future__ import annotations

import subprocess
import sys
import time

from bench.harness.cpu import Snapshot, Tracked, TreeSample, sample_tree, snapshot, usage_between

# A parent that sleeps while it runs short-lived children, each burning `BURN_S` of CPU, one
# after the other: only the reaped children's time can account for the tree's CPU.
BURN_S = 0.25
CHILDREN = 3
_CHILD = f"import time\nt = time.process_time()\nwhile time.process_time() - t < {BURN_S}: pass\n"
_PARENT = (
    "import subprocess, sys, time\n"
    "sys.stdin.readline()\n"
    f"for _ in range({CHILDREN}): subprocess.run([sys.executable, '-c', {_CHILD!r}], check=True)\n"
    "print('done', flush=True)\n"
    "sys.stdin.readline()\n"
)


def test_tree_total_adds_own_reaped_and_live_children() -> None:
    leaf = TreeSample(own=1.0, reaped=0.5)
    tree = TreeSample(
        own=2.0, reaped=3.0, children=(leaf, TreeSample(own=0.25, reaped=0.0, children=(leaf,)))
    )
    assert tree.total == 2.0 + 3.0 + 1.5 + (0.25 + 1.5)


def test_short_lived_children_are_counted_once_reaped() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdin is not None and parent.stdout is not None
        time.sleep(0.3)  # let the interpreter start before the first reading
        before = sample_tree(parent.pid)
        assert before is not None
        parent.stdin.write("go\n")
        parent.stdin.flush()
        assert parent.stdout.readline().strip() == "done"
        after = sample_tree(parent.pid)
        assert after is not None
        own = after.own - before.own
        used = after.total - before.total
        # Every child is gone: what the tree used is the parent's little own time plus the reaped.
        assert after.children == ()
        assert used >= CHILDREN * BURN_S * 0.9, (used, own)
        assert own < used / 2
    finally:
        parent.communicate(timeout=10)  # closes both pipes, then waits


def test_gone_process_reads_as_none_and_snapshot_flags_it() -> None:
    finished = subprocess.run([sys.executable, "-c", "pass"], check=True)
    assert finished.returncode == 0
    gone_pid = 2**22 + 12345  # above the default pid_max: never a live process
    assert sample_tree(gone_pid) is None
    shot = snapshot([Tracked("broker", (gone_pid,))])
    assert shot.groups["broker"] == 0.0
    assert shot.missing == ("broker",)
    assert shot.groups["harness"] > 0


def test_usage_between_per_event_cores_and_unattributed() -> None:
    start = Snapshot(at=100.0, machine_busy=1000.0, groups={"worker": 10.0, "postgres": 5.0, "harness": 1.0})
    end = Snapshot(at=110.0, machine_busy=1016.0, groups={"worker": 18.0, "postgres": 9.0, "harness": 1.5})
    usage = usage_between(start, end, events=200_000, cpus=2)
    processes = usage["processes"]
    assert isinstance(processes, dict)
    assert processes["worker"] == {"cpu_s": 8.0, "us_per_event": 40.0, "cores": 0.8}
    assert processes["postgres"]["us_per_event"] == 20.0
    assert processes["harness"]["cpu_s"] == 0.5
    # 16 s busy on the machine, 12.5 s of it attributed
    assert processes["unattributed"]["cpu_s"] == 3.5
    assert usage["machine_utilisation"] == 0.8
    assert usage["machine_us_per_event"] == 80.0
    assert usage["wall_s"] == 10.0


def test_usage_between_never_negative_and_no_events() -> None:
    start = Snapshot(at=0.0, machine_busy=10.0, groups={"worker": 5.0})
    end = Snapshot(at=1.0, machine_busy=10.5, groups={"worker": 4.0})  # a restarted process
    usage = usage_between(start, end, events=0, cpus=2)
    processes = usage["processes"]
    assert isinstance(processes, dict)
    assert processes["worker"] == {"cpu_s": 0.0, "us_per_event": None, "cores": 0.0}
    assert usage["machine_us_per_event"] is None
