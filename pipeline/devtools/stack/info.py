"""What clients need to reach a running stack, as values and as docs/contract.md §7 variables."""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class StackInfo:
    root: Path
    database_url: str
    kafka_bootstrap_servers: str
    s3_endpoint_url: str
    s3_bucket: str
    aws_access_key_id: str
    aws_secret_access_key: str
    aws_region: str

    def env(self) -> dict[str, str]:
        """The stack as the environment variables of docs/contract.md §7."""
        return {
            "OMNILOG_KAFKA_BOOTSTRAP_SERVERS": self.kafka_bootstrap_servers,
            "OMNILOG_DATABASE_URL": self.database_url,
            "OMNILOG_S3_ENDPOINT_URL": self.s3_endpoint_url,
            "OMNILOG_S3_BUCKET": self.s3_bucket,
            "AWS_ACCESS_KEY_ID": self.aws_access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.aws_secret_access_key,
            "AWS_REGION": self.aws_region,
        }

    def env_file_text(self) -> str:
        lines = ["# Written by `omnilog stack up`; load with: source <this file>"]
        lines += [f"export {name}={shlex.quote(value)}" for name, value in self.env().items()]
        return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class ServiceStatus:
    name: str
    pid: int | None
    port: int | None
    healthy: bool
    detail: str = ""
