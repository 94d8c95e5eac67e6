"""SeaweedFS `weed mini` with its S3 API on loopback, one static identity, and the bucket."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.stack.binaries import weed_binary
from pipeline.stack.ports import HOST
from pipeline.stack.service import Service

REGION = "us-east-1"


@dataclass(frozen=True)
class S3Credentials:
    access_key_id: str
    secret_access_key: str


def endpoint_url(port: int) -> str:
    return f"http://{HOST}:{port}"


def s3_client(port: int, credentials: S3Credentials, timeout: float = 5.0) -> Any:
    """A plain boto3 client for the stack (probes, bucket setup, tests)."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url(port),
        aws_access_key_id=credentials.access_key_id,
        aws_secret_access_key=credentials.secret_access_key,
        region_name=REGION,
        config=Config(
            connect_timeout=timeout,
            read_timeout=timeout,
            retries={"max_attempts": 1},
            s3={"addressing_style": "path"},
        ),
    )


def ensure_bucket(port: int, credentials: S3Credentials, bucket: str) -> None:
    from botocore.exceptions import ClientError

    client = s3_client(port, credentials)
    try:
        client.head_bucket(Bucket=bucket)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in {"404", "NoSuchBucket", "NotFound"}:
            raise
        client.create_bucket(Bucket=bucket)
        client.head_bucket(Bucket=bucket)


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

    def prepare(self) -> None:
        weed_binary()
        self.datadir.mkdir(parents=True, exist_ok=True)
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
                }
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
        client = s3_client(ports["port"], self.credentials, timeout)
        client.list_buckets()

    def after_healthy(self, ports: Mapping[str, int]) -> None:
        ensure_bucket(ports["port"], self.credentials, self.bucket)

    def purge(self) -> None:
        shutil.rmtree(self.datadir, ignore_errors=True)
        self.identities.unlink(missing_ok=True)
