"""Results of a run as JSON (`bench/results/<stamp>.json` + `latest.json`), a markdown table and a
PNG chart (`bench/results/bench.png`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.harness.targets import arrival_of

# (result key, label) of every throughput bar, in chart order.
THROUGHPUT = (
    ("ceiling_kafka_confluent", "Kafka consume, confluent-kafka (ref.)"),
    ("ceiling_kafka_aiokafka", "Kafka consume, aiokafka (ceiling)"),
    ("ceiling_gzip", "gzip, ISA-L level 1 (ceiling)"),
    ("ceiling_validate", "decode + validate (ref.)"),
    ("ceiling_copy", "COPY into log_index (ceiling)"),
    ("ceiling_index_transaction", "index transaction alone (ref.)"),
    ("variant_index_only", "ingest, 1 worker, no aggregates (attribution)"),
    ("variant_no_merger", "ingest, 1 worker, parts but no merger (attribution)"),
    ("drain_200k", "ingest end to end, 1 worker, 200 k backlog"),
    ("ingest_1_worker", "ingest end to end, 1 worker, reference backlog"),
    ("drain_5m", "ingest end to end, 1 worker, 5 M backlog"),
    ("drain_1m_random", "ingest end to end, 1 worker, 1 M backlog"),
    ("ingest_2_workers", "ingest end to end, 2 workers"),
    ("peer_faust", "faust-streaming peer"),
)


def write_json(result: dict[str, Any], out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = result["started_at"].replace(":", "").replace("-", "").replace("+0000", "Z")
    text = json.dumps(result, indent=2, sort_keys=False) + "\n"
    path = out_dir / f"{stamp}-{result['mode']}.json"
    path.write_text(text)
    (out_dir / "latest.json").write_text(text)
    return path


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f}"


def _num(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


PROCESSES = ("worker", "merger", "postgres", "broker", "s3", "harness", "unattributed")


def arrival_label(r: dict[str, Any]) -> str:
    """How a drain's backlog arrived, for its label (results without the field: random)."""
    arrival = arrival_of(r)
    return f"{arrival} arrival" + (" (worst case)" if arrival == "random" and "ratio_to_ordered" in r else "")


def drain_rows(s: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(key, label, result) of every drain, the 1-worker ones by size (arrival order before random
    at the same size), then the scaling ones."""
    rows = [
        (k, f"1 worker, {v['events']:,} backlog, {arrival_label(v)}", v)
        for k, v in s.items()
        if k.startswith("drain_")
    ]
    rows.sort(key=lambda r: (int(r[2]["events"]), arrival_of(r[2]) != "ordered"))
    scaling = s.get("scaling_workers", {})
    for key in sorted((k for k in scaling if k.startswith("workers_")), key=lambda k: int(k.split("_")[1])):
        r = scaling[key]
        label = f"{r['workers']} worker(s), {r['events']:,} backlog, {arrival_label(r)}"
        rows.append((f"scaling_workers.{key}", label, r))
    return rows


def _unique(rows: list[tuple[str, str, dict[str, Any]]]) -> list[tuple[str, str, dict[str, Any]]]:
    """Each drain once: the scaling's 1-worker point may be a 1-worker drain of the same size (the
    same object in a run, an equal copy once read back from JSON)."""
    out: list[tuple[str, str, dict[str, Any]]] = []
    for row in rows:
        if not any(row[2] is kept[2] or row[2] == kept[2] for kept in out):
            out.append(row)
    return out


def markdown(result: dict[str, Any]) -> str:
    s = result["scenarios"]
    lines = [
        f"Mode `{result['mode']}`, {result['machine']['cpus']} cores, all services co-located, "
        f"commit `{result['git_commit']}`, {result['started_at']}, run took {result['duration_s']:,.0f} s.",
        "",
        _arrival_line(result),
        "",
        "| scenario | events | events/s | notes |",
        "|---|---:|---:|---|",
    ]
    shown: set[int] = set()
    for key, label in THROUGHPUT:
        if key not in s or "events_per_s" not in s[key] or id(s[key]) in shown:
            continue  # a drain that is also the reference appears once
        r = s[key]
        shown.add(id(r))
        arrival = f", {arrival_label(r)}" if "workers" in r else ""  # a drain: how its backlog arrived
        notes = ""
        if "ratio_to_ordered" in r:
            notes = f"{_times(r['ratio_to_ordered'].get('events_per_s'))} the same drain in arrival order"
        elif "ratio_to" in r:
            ratio = r["ratio_to"]
            notes = (
                f"{ratio['copy']:.2f}× COPY, {ratio['kafka_aiokafka']:.2f}× Kafka, {ratio['gzip']:.3f}× gzip"
            )
        elif key == "ceiling_gzip":
            notes = f"{r['mb_per_s']} MB/s, ratio {r['ratio']}"
        elif key == "peer_faust":
            notes = f"batches of {r['batch']}; ours is {r['ours_over_peer']}× this"
        if r.get("aggregates_events_per_s"):
            caught_up = f"{_fmt(r['aggregates_events_per_s'])}/s with the aggregates caught up"
            notes = f"{caught_up}; {notes}" if notes else caught_up
        lines.append(f"| {label}{arrival} | {_fmt(r['events'])} | {_fmt(r['events_per_s'])} | {notes} |")
    f = s["freshness"]
    vis = f.get("aggregates_visible", {})
    lines.append(
        f"| freshness at {_fmt(f['rate'])} events/s (half of 1 worker) | {_fmt(f['events'])} | – | "
        f"p50 {f['p50_s']} s, p99 {f['p99_s']} s (worker histogram: p50 {f['metric_p50_s']} s, "
        f"p99 {f['metric_p99_s']} s); aggregates visible after commit: p50 {vis.get('p50_s')} s, "
        f"p99 {vis.get('p99_s')} s |"
    )
    m = s["memory"]
    lines.append(
        f"| worker peak RSS, largest drain ({_fmt(m['backlog_events'])}) | – | – | {m['peak_rss_mib']} MiB |"
    )
    sc = s["scaling_aggregates"]
    lines.append(
        f"| aggregate stage alone, 1 → 3 writers | {_fmt(sc['stage_1']['events'])} | "
        f"{_fmt(sc['stage_1']['events_per_s'])} → {_fmt(sc['stage_3']['events_per_s'])} | "
        f"× {sc['stage_3_over_1']} |"
    )
    lines += ["", *_drains_table(s), "", *_scaling_table(s)]
    for _key, label, r in _unique(drain_rows(s)):
        lines += ["", *_cpu_table(label, r)]
    for key, label, r in _unique(drain_rows(s)):
        if key.startswith("drain_"):
            lines += ["", *_statements_table(label, r)]
    lines += ["", *_targets_table(result["targets"], result.get("version", 0))]
    return "\n".join(lines) + "\n"


def _times(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def _arrival_line(result: dict[str, Any]) -> str:
    traffic = result.get("traffic", {})
    arrival = traffic.get("arrival", "random")
    if arrival == "ordered":
        text = (
            f"Backlogs arrive in time order (started_at and the UUIDv7 event ids grow with the position, "
            f"± {traffic.get('order_jitter_ms', 0) / 1000:g} s), as a gateway's stream that fell behind"
        )
    else:
        text = "Backlogs arrive in random order (started_at and event ids spread at random over the hour)"
    worst = [r for r in result["scenarios"].values() if isinstance(r, dict) and "ratio_to_ordered" in r]
    if worst:
        r = worst[0]
        text += (
            f"; the worst case, {r['events']:,} events in random order, drains at "
            f"{_times(r['ratio_to_ordered'].get('events_per_s'))} the ordered rate to the index and "
            f"{_times(r['ratio_to_ordered'].get('aggregates_events_per_s'))} with the aggregates"
        )
    return text + "."


def _drains_table(s: dict[str, Any]) -> list[str]:
    lines = [
        "| drain | index caught up | events/s | aggregates caught up | events/s | events/s per fifth "
        "| produced at | worker peak RSS |",
        "|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for _, label, r in _unique(drain_rows(s)):
        fifths = " · ".join(_fmt(x) for x in r.get("fifths_events_per_s", []))
        lines.append(
            f"| {label} | {_num(r['seconds'])} s | {_fmt(r['events_per_s'])} | "
            f"{_num(r.get('aggregates_seconds'))} s | {_fmt(r.get('aggregates_events_per_s'))} | {fifths} | "
            f"{_fmt(r.get('produce_events_per_s'))}/s | {max(r['peak_rss_mib'])} MiB |"
        )
    return lines


def _scaling_table(s: dict[str, Any]) -> list[str]:
    scaling = s.get("scaling_workers", {})
    lines = [
        f"Scaling on one backlog of {scaling.get('backlog', 0):,} events, "
        f"{scaling.get('partitions')} partitions. CPU in µs/event, from the first consume until the "
        "aggregates caught up (the workers: until the index caught up):",
        "",
        "| workers | events/s | × 1 worker | events/s once all consume | worker | merger | postgres | broker "
        "| s3 | harness | other | machine busy |",
        "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, _, r in drain_rows(s):
        if not key.startswith("scaling_workers."):
            continue
        n = r["workers"]
        speedup = scaling.get(f"speedup_{n}_over_1", 1.0 if n == 1 else None)
        cpu = _cpu_per_event(r)
        whole = r["cpu"].get("aggregates", r["cpu"]["index"])
        steady = r.get("all_workers_consuming") or {}
        after = (
            f"{_fmt(steady['events_per_s'])} (after {steady['after_s']} s)"
            if steady.get("events_per_s")
            else "–"
        )
        lines.append(
            f"| {n} | {_fmt(r['events_per_s'])} | {speedup} | {after} | "
            + " | ".join(_num(cpu.get(p)) for p in PROCESSES)
            + f" | {whole['machine_utilisation'] * 100:.0f} % |"
        )
    return lines


def _cpu_per_event(r: dict[str, Any]) -> dict[str, float | None]:
    """µs/event per process: the worker to the index caught up, the others to the aggregates."""
    index = r["cpu"]["index"]["processes"]
    whole = r["cpu"].get("aggregates", r["cpu"]["index"])["processes"]
    out = {p: whole[p]["us_per_event"] for p in PROCESSES if p in whole}
    if "worker" in index:
        out["worker"] = index["worker"]["us_per_event"]
    return out


def _cpu_table(label: str, r: dict[str, Any]) -> list[str]:
    windows = [("index", "to index caught up"), ("aggregates", "to aggregates caught up")]
    windows = [(k, t) for k, t in windows if k in r["cpu"]]
    head = " | ".join(f"{t}: CPU s | µs/event | cores" for _, t in windows)
    lines = [
        f"CPU, {label}:",
        "",
        f"| process | {head} |",
        "|---|" + "---:|---:|---:|" * len(windows),
    ]
    for p in PROCESSES:
        cells = []
        for k, _ in windows:
            u = r["cpu"][k]["processes"].get(p)
            cells += (
                ["–"] * 3
                if u is None
                else [_num(u["cpu_s"], 2), _num(u["us_per_event"]), _num(u["cores"], 2)]
            )
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    cells = []
    for k, _ in windows:
        c = r["cpu"][k]
        cells += [_num(c["machine_busy_s"], 2), _num(c["machine_us_per_event"]),
                  f"{c['machine_utilisation'] * 100:.0f} % of {c['wall_s']:.1f} s"]  # fmt: skip
    lines.append("| machine (all processes) | " + " | ".join(cells) + " |")
    missing = sorted({m for k, _ in windows for m in r["cpu"][k].get("missing", [])})
    if missing:
        lines.append(f"\nNot readable during this drain: {', '.join(missing)}.")
    return lines


def _statements_table(label: str, r: dict[str, Any]) -> list[str]:
    st = r.get("statements", {})
    if not st.get("available"):
        return [f"Statements, {label}: unavailable ({st.get('reason', 'not measured')})."]
    until = "aggregates caught up" if "aggregates" in r.get("cpu", {}) else "index caught up"
    lines = [
        f"Statements, {label} (pg_stat_statements, first consume → {until}): "
        f"{st['total_ms']:,.0f} ms in total, {_num(st['total_us_per_event'])} µs/event.",
        "",
        "| statement | by | calls | rows | total ms | share | µs/row | µs/event |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for q in st["top"]:
        text = q["query"].replace("|", "\\|")
        text = text if len(text) <= 90 else text[:89] + "…"
        share = "–" if q["share"] is None else f"{q['share'] * 100:.1f} %"
        lines.append(
            f"| `{text}` | {q['by']} | {q['calls']:,} | {q['rows']:,} | {q['total_ms']:,.0f} | {share} | "
            f"{_num(q['us_per_row'], 2)} | {_num(q['us_per_event'], 2)} |"
        )
    return lines


def _targets_table(rows: list[dict[str, Any]], version: int) -> list[str]:
    """The targets with the arrival order their figure was measured with (runs before version 3
    drained every backlog in random order and stored no arrival)."""
    lines = ["| target | goal | reached | met | arrival |", "|---|---|---:|---|---|"]
    for t in rows:
        value = "–" if t["value"] is None else f"{t['value']:,}"
        status = {"met": "yes", "not met": "**no**"}.get(t["status"], t["status"])
        note = f" ({t['note']})" if t.get("note") else ""
        measured = t["value"] is not None
        arrival = t.get("arrival") or ("random" if version < 3 and measured else "–")
        lines.append(f"| {t['target']} | {t['goal']} | {value} | {status}{note} | {arrival} |")
    return lines


def chart(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["scenarios"]
    bars = [(label, s[key]["events_per_s"], key) for key, label in THROUGHPUT if key in s]
    fig, ax = plt.subplots(figsize=(10, 0.45 * len(bars) + 1.6))
    colours = [
        "#9aa5b1" if key.startswith("ceiling") else "#f0a04b" if key == "peer_faust" else
        "#c9d6e3" if key.startswith(("variant", "tuning")) else "#2f6db5"
        for _, _, key in bars
    ]  # fmt: skip
    ax.barh([b[0] for b in bars], [b[1] for b in bars], color=colours)
    ax.set_xscale("log")
    ax.invert_yaxis()
    for i, (_, value, _) in enumerate(bars):
        ax.text(value * 1.05, i, f"{value:,.0f}", va="center", fontsize=8)
    ax.axvline(25_000, color="#c0392b", linestyle="--", linewidth=1)
    ax.text(25_000, -0.8, " target 25k/s", color="#c0392b", fontsize=8)
    f, m = s["freshness"], s["memory"]
    ax.set_xlabel("events per second (log scale)")
    ax.set_title(
        f"omnilog bench ({result['mode']}, {result['machine']['cpus']} cores): freshness p99 "
        f"{f['p99_s']} s at {f['rate']:,.0f}/s, worker RSS {m['peak_rss_mib']} MiB",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
