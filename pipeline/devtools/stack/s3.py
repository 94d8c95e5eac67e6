"""SeaweedFS `weed mini` with its S3 API on loopback, the deployment's static identity, and the bucket.

A second identity stands for a customer's own credentials (docs/storage.md): it may use only
buckets named `customer-*`, so a test proves that a customer bucket is reached through the
customer's profile and not through the deployment's keys' permissions."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import urllib.request
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import aioboto3
from aiobotocore.config import AioConfig
from botocore.exceptions import ClientError
from tenacity import AsyncRetrying, retry_if_exception, stop_after_delay, wait_fixed

from pipeline.devtools.stack.binaries import weed_binary
from pipeline.devtools.stack.blocking import run_blocking
from pipeline.devtools.stack.ports import HOST, free_port_pair, free_ports
from pipeline.devtools.stack.service import ProbeFailedError, Service

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client

REGION = "us-east-1"
# weed mini's maintenance worker dials the admin server at its HTTP port + 10000, whatever
# -admin.port.grpc says: keep that convention so the worker reaches our own admin server.
_ADMIN_GRPC_OFFSET = 10000
# Every bucket is a SeaweedFS collection with volumes of its own; the automatic limit (free
# disk / 1 GiB volume size) can be under 100, and the tests create a bucket per case.
# Volumes are not preallocated, so a high limit costs nothing until written.
_MAX_VOLUMES = 2000


@dataclass(frozen=True)
class S3Credentials:
    access_key_id: str
    secret_access_key: str


CUSTOMER_BUCKET_PREFIX = "customer-"


def customer_credentials(deployment: S3Credentials) -> S3Credentials:
    """The customer identity's keys: derived from the stack's secret, so they are no constant in
    the code base and need no state of their own."""
    secret = hmac.new(deployment.secret_access_key.encode(), b"customer", hashlib.sha256).hexdigest()[:40]
    return S3Credentials("omnilog-customer", secret)


def endpoint_url(port: int) -> str:
    return f"http://{HOST}:{port}"


def _client(port: int, credentials: S3Credentials, timeout: float) -> AbstractAsyncContextManager[S3Client]:
    return aioboto3.Session().client(
        "s3",
        endpoint_url=endpoint_url(port),
        aws_access_key_id=credentials.access_key_id,
        aws_secret_access_key=credentials.secret_access_key,
        region_name=REGION,
        config=AioConfig(
            connect_timeout=timeout,
            read_timeout=timeout,
            retries={"max_attempts": 1},
            s3={"addressing_style": "path"},
        ),
    )


async def _list_buckets(port: int, credentials: S3Credentials, *, request_timeout: float) -> None:
    async with _client(port, credentials, request_timeout) as client:
        await client.list_buckets()


# What S3 answers a create of a bucket that exists: ours (a retried create whose first attempt
# succeeded, another `up` at the same time, any later `up`), or someone else's, which the
# `head_bucket` after it refuses with 403.
_BUCKET_EXISTS = frozenset({"BucketAlreadyOwnedByYou", "BucketAlreadyExists"})


# What a just-started SeaweedFS may answer for a few seconds while its filer catches up (seen on a
# loaded machine: NoSuchBucket from CreateBucket itself): worth another try, for a bounded time.
_NOT_SETTLED = frozenset({"NoSuchBucket", "404", "InternalError", "ServiceUnavailable", "503"})


def _not_settled(exc: BaseException) -> bool:
    return isinstance(exc, ClientError) and exc.response.get("Error", {}).get("Code") in _NOT_SETTLED


async def _ensure_bucket(port: int, credentials: S3Credentials, bucket: str) -> None:
    async with _client(port, credentials, 10.0) as client:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(_not_settled),
            wait=wait_fixed(0.5),
            stop=stop_after_delay(20),
            reraise=True,
        ):
            with attempt:
                # Create first, "exists" is success: a check then a create is a race between the two.
                try:
                    await client.create_bucket(Bucket=bucket)
                except ClientError as exc:
                    if exc.response.get("Error", {}).get("Code") not in _BUCKET_EXISTS:
                        raise
                await client.head_bucket(Bucket=bucket)


def _registered_volume_servers(master_port: int, timeout: float) -> set[str]:
    url = f"http://{HOST}:{master_port}/dir/status"
    with urllib.request.urlopen(url, timeout=timeout) as response:
        status = json.load(response)
    topology = status.get("Topology") or {}
    return {
        str(node.get("Url"))
        for dc in topology.get("DataCenters") or []
        for rack in dc.get("Racks") or []
        for node in rack.get("DataNodes") or []
    }


def ensure_bucket(port: int, credentials: S3Credentials, bucket: str) -> None:
    """Create `bucket` on the stack's S3 unless it exists (signed with the stack's identity)."""
    run_blocking(lambda: _ensure_bucket(port, credentials, bucket))


class SeaweedS3(Service):
    name = "s3"
    # `port` is the S3 API; weed mini also runs a master, a volume server, a filer and an
    # admin server, each with an HTTP and a gRPC port. All are pinned so none falls back to
    # a fixed default that another stack on the machine may hold.
    port_names = (
        "port",
        "s3_grpc",
        "master",
        "master_grpc",
        "volume",
        "volume_grpc",
        "filer",
        "filer_grpc",
        "admin",
        "admin_grpc",
    )
    stop_timeout = 20.0

    def __init__(self, root: Path, bucket: str, credentials: S3Credentials) -> None:
        super().__init__(root)
        self.bucket = bucket
        self.credentials = credentials
        self.datadir = root / "s3"
        self.identities = root / "s3-identities.json"

    def pick_ports(self, names: list[str], avoid: set[int]) -> dict[str, int]:
        chosen: dict[str, int] = {}
        if "admin" in names:
            admin = free_port_pair(_ADMIN_GRPC_OFFSET, avoid)
            chosen = {"admin": admin, "admin_grpc": admin + _ADMIN_GRPC_OFFSET}
        rest = [name for name in names if name not in chosen]
        chosen.update(zip(rest, free_ports(len(rest), avoid | set(chosen.values())), strict=True))
        return chosen

    def prepare(self) -> None:
        weed_binary()
        self.datadir.mkdir(parents=True, exist_ok=True)
        customer = customer_credentials(self.credentials)
        config = {
            "identities": [
                {
                    "name": "omnilog",
                    "credentials": [
                        {
                            "accessKey": self.credentials.access_key_id,
                            "secretKey": self.credentials.secret_access_key,
                        }
                    ],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                },
                {
                    "name": "customer",
                    "credentials": [
                        {"accessKey": customer.access_key_id, "secretKey": customer.secret_access_key}
                    ],
                    # A trailing * matches a bucket-name prefix (SeaweedFS canDo).
                    "actions": [
                        f"{action}:{CUSTOMER_BUCKET_PREFIX}*"
                        for action in ("Read", "Write", "List", "Tagging")
                    ],
                },
            ]
        }
        # The file holds the secret: create it private from the start.
        fd = os.open(self.identities, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(config, out, indent=2)

    def argv(self, ports: Mapping[str, int]) -> list[str]:
        flags = {
            "dir": str(self.datadir),
            "ip": HOST,
            "ip.bind": HOST,
            "s3.port": ports["port"],
            "s3.port.grpc": ports["s3_grpc"],
            "master.port": ports["master"],
            "master.port.grpc": ports["master_grpc"],
            "volume.port": ports["volume"],
            "volume.port.grpc": ports["volume_grpc"],
            "filer.port": ports["filer"],
            "filer.port.grpc": ports["filer_grpc"],
            "admin.port": ports["admin"],
            "admin.port.grpc": ports["admin_grpc"],
            "admin.ui": "false",
            "webdav": "false",
            "volume.max": _MAX_VOLUMES,
            "s3.port.iceberg": 0,
            "s3.port.lance": 0,
            # Never phone home from a test machine.
            "master.telemetry": "false",
            "s3.config": str(self.identities),
            "bucket": self.bucket,
        }
        return [str(weed_binary()), "mini", *(f"-{key}={value}" for key, value in flags.items())]

    def env(self) -> dict[str, str]:
        # `weed mini` falls back to S3_BUCKET and friends from the environment.
        return {k: v for k, v in os.environ.items() if not k.startswith(("S3_", "AWS_"))}

    def probe(self, ports: Mapping[str, int], timeout: float) -> None:
        # A signed request: proves the API is up AND that our identity file was loaded.
        run_blocking(lambda: _list_buckets(ports["port"], self.credentials, request_timeout=timeout))
        # The S3 gateway answers before the volume server has re-registered with the master
        # after a restart; until then every object read or write fails with InternalError
        # (measured: up to 4 s). So healthy also means "the master knows our volume server".
        volume_server = f"{HOST}:{ports['volume']}"
        if volume_server not in _registered_volume_servers(ports["master"], timeout):
            raise ProbeFailedError(f"volume server {volume_server} not yet registered with the master")

    def after_healthy(self, ports: Mapping[str, int]) -> None:
        ensure_bucket(ports["port"], self.credentials, self.bucket)

    def purge(self) -> None:
        shutil.rmtree(self.datadir, ignore_errors=True)
        self.identities.unlink(missing_ok=True)
