"""Results of a run as JSON (`bench/results/<stamp>.json` + `latest.json`), a markdown table and a
PNG chart (`bench/results/bench.png`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
    ("tuning_batch_20k", "ingest, 1 worker, batches of 20k (tuning)"),
    ("ingest_1_worker", "ingest end to end, 1 worker"),
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


def _fmt(value: float) -> str:
    return f"{value:,.0f}"


def markdown(result: dict[str, Any]) -> str:
    s = result["scenarios"]
    lines = [
        f"Mode `{result['mode']}`, {result['machine']['cpus']} cores, all services co-located, "
        f"commit `{result['git_commit']}`, {result['started_at']}.",
        "",
        "| scenario | events | events/s | notes |",
        "|---|---:|---:|---|",
    ]
    for key, label in THROUGHPUT:
        if key not in s:
            continue
        r = s[key]
        notes = ""
        if "ratio_to" in r:
            ratio = r["ratio_to"]
            notes = (
                f"{ratio['copy']:.2f}× COPY, {ratio['kafka_aiokafka']:.2f}× Kafka, {ratio['gzip']:.3f}× gzip"
            )
        elif key == "ceiling_gzip":
            notes = f"{r['mb_per_s']} MB/s, ratio {r['ratio']}"
        elif key == "peer_faust":
            notes = f"batches of {r['batch']}; ours is {r['ours_over_peer']}× this"
        lines.append(f"| {label} | {_fmt(r['events'])} | {_fmt(r['events_per_s'])} | {notes} |")
    f = s["freshness"]
    lines.append(
        f"| freshness at {_fmt(f['rate'])} events/s (half of 1 worker) | {_fmt(f['events'])} | – | "
        f"p50 {f['p50_s']} s, p99 {f['p99_s']} s (worker histogram: p50 {f['metric_p50_s']} s, "
        f"p99 {f['metric_p99_s']} s) |"
    )
    m = s["memory"]
    lines.append(
        f"| worker peak RSS draining {_fmt(m['backlog_events'])} | – | – | {m['peak_rss_mib']} MiB |"
    )
    sc = s["scaling_aggregates"]
    if sc.get("available"):
        lines.append(
            f"| aggregate stage alone, 1 → 3 writers | {_fmt(sc['stage_1']['events'])} | "
            f"{_fmt(sc['stage_1']['events_per_s'])} → {_fmt(sc['stage_3']['events_per_s'])} | "
            f"× {sc['stage_3_over_1']} |"
        )
        lines.append(
            f"| ingest, 1 → 3 workers | {_fmt(sc['ingest_1']['events'])} | "
            f"{_fmt(sc['ingest_1']['events_per_s'])} → {_fmt(sc['ingest_3']['events_per_s'])} | "
            f"× {sc['ingest_3_over_1']} |"
        )
    else:
        lines.append(f"| aggregate scaling | – | – | not available: {sc.get('reason', '')} |")
    lines += ["", "| target | goal | reached | met |", "|---|---|---:|---|"]
    for t in result["targets"]:
        lines.append(f"| {t['target']} | {t['goal']} | {t['value']:,} | {'yes' if t['met'] else '**no**'} |")
    return "\n".join(lines) + "\n"


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
    ax.axvline(30_000, color="#c0392b", linestyle="--", linewidth=1)
    ax.text(30_000, -0.8, " target 30k/s", color="#c0392b", fontsize=8)
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
