"""The stack's server processes (PostgreSQL, the Kafka broker, S3), found by the port each listens
on, so the harness can measure their CPU whether it started the stack or reuses one."""

from __future__ import annotations

from urllib.parse import urlsplit

import psutil

from pipeline.devtools.stack import StackInfo


def ports(info: StackInfo) -> dict[str, int]:
    """Service name -> TCP port, from the stack's URLs."""
    kafka = info.kafka_bootstrap_servers.split(",")[0].rsplit(":", 1)[-1]
    return {
        "postgres": urlsplit(info.database_url).port or 5432,
        "broker": int(kafka),
        "s3": urlsplit(info.s3_endpoint_url).port or 80,
    }


def listening_pids(wanted: dict[str, int]) -> dict[str, int]:
    """Service name -> pid of the process listening on its port (services not found are left out:
    on a reused stack in another container they are not visible)."""
    by_port: dict[int, int] = {}
    try:
        connections = psutil.net_connections("tcp")
    except psutil.Error:
        return {}
    for c in connections:
        if c.status == psutil.CONN_LISTEN and c.pid is not None and c.laddr:
            by_port.setdefault(c.laddr[1], c.pid)
    return {name: by_port[port] for name, port in wanted.items() if port in by_port}
