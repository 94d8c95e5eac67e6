"""The embedded local stack: PostgreSQL, the Tansu Kafka-compatible broker, SeaweedFS S3.

Everything listens on 127.0.0.1 only and lives under one root directory (default
`./.omnilog`). See docs/stack.md.
"""

from pipeline.devtools.stack.binaries import BinaryNotFoundError
from pipeline.devtools.stack.databases import create_database, drop_database
from pipeline.devtools.stack.errors import StackError
from pipeline.devtools.stack.info import ServiceStatus, StackInfo
from pipeline.devtools.stack.launcher import SERVICES, ServiceStartError, Stack, UpResult, default_root
from pipeline.devtools.stack.ports import PortInUseError

__all__ = [
    "SERVICES",
    "BinaryNotFoundError",
    "PortInUseError",
    "ServiceStartError",
    "ServiceStatus",
    "Stack",
    "StackError",
    "StackInfo",
    "UpResult",
    "create_database",
    "default_root",
    "drop_database",
]
