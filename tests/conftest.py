"""Shared fixtures. The ONLY place that starts the embedded stack for the test session.

- `stack_info` (session): a running stack in a temp root, torn down (purged) at the end.
- `stack` (function): the same `Stack`, for tests that stop/start services (outages); anything
  a test left stopped is started again after it, so later tests always get a whole stack.
- `fresh_database_url` (function): a new, empty database on the stack's server, dropped after.
- `scratch_stack_root` (function): a directory for a test that needs a stack of its own.
- `make_settings` (function): `Settings` for the stack with a unique topic, DLQ topic, consumer
  group and bucket per call, so tests never see each other's data.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pipeline.devtools.stack import Stack, StackInfo, create_database, drop_database
from pipeline.devtools.stack.s3 import S3Credentials, ensure_bucket
from pipeline.settings import Settings, load_settings

_INTEGRATION_DIR = Path(__file__).parent / "integration"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Everything under tests/integration needs the stack: mark it, so `-m "not integration"` works."""
    for item in items:
        if (
            _INTEGRATION_DIR in Path(str(item.fspath)).parents
            and item.get_closest_marker("integration") is None
        ):
            item.add_marker(pytest.mark.integration)


@contextlib.contextmanager
def _scratch_stack_root() -> Iterator[Path]:
    """A fresh directory for a stack root, NOT under pytest's tmp dirs.

    PostgreSQL runs as an unprivileged user, which must traverse to its data dir. pytest's
    /tmp/pytest-of-<user> is 0700, and every pytest session that starts (other runs on the
    same machine) chmods it back to 0700, which can break an initdb or a restart in flight.
    """
    parent = Path(tempfile.mkdtemp(prefix="omnilog-test-stack-"))
    try:
        yield parent / "root"
    finally:
        shutil.rmtree(parent, ignore_errors=True)


@pytest.fixture(scope="session")
def _session_stack() -> Iterator[Stack]:
    with _scratch_stack_root() as root:
        stack = Stack(root)
        try:
            stack.up()
            yield stack
        finally:
            stack.down(purge=True)


@pytest.fixture
def scratch_stack_root() -> Iterator[Path]:
    """A root for a test's own, second stack (CLI tests); removed after the test."""
    with _scratch_stack_root() as root:
        yield root


@pytest.fixture(scope="session")
def stack_info(_session_stack: Stack) -> StackInfo:
    return _session_stack.info()


@pytest.fixture
def stack(_session_stack: Stack) -> Iterator[Stack]:
    yield _session_stack
    # A test that simulated an outage and failed midway must not leave it to the next test.
    _session_stack.up()


def _unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:12]}"


@pytest.fixture
def fresh_database_url(stack_info: StackInfo) -> Iterator[str]:
    name = _unique("t_")
    url = create_database(stack_info, name)
    yield url
    drop_database(stack_info, name)


def _alias(name: str) -> str:
    """Settings only accept their environment names (populate_by_name=False): map field names."""
    field = Settings.model_fields.get(name)
    alias = getattr(field.validation_alias, "choices", [None])[0] if field else None
    return alias if isinstance(alias, str) else name


@pytest.fixture
def make_settings(stack_info: StackInfo) -> Callable[..., Settings]:
    """`make_settings(batch_max_events=100, database_url=...)`: field or env names both work."""
    credentials = S3Credentials(stack_info.aws_access_key_id, stack_info.aws_secret_access_key)
    s3_port = int(stack_info.s3_endpoint_url.rsplit(":", 1)[1])

    def build(**overrides: object) -> Settings:
        suffix = uuid.uuid4().hex[:12]
        values: dict[str, object] = {
            **stack_info.env(),
            "OMNILOG_TOPIC": f"test.{suffix}",
            "OMNILOG_DLQ_TOPIC": f"test.{suffix}.dlq",
            "OMNILOG_CONSUMER_GROUP": f"test-{suffix}",
            "OMNILOG_S3_BUCKET": f"test-{suffix}",
            # Any free port: tests run side by side (pytest-xdist, other sessions on the machine),
            # and the default 9400 would collide. A test that needs it reads worker.health.bound_port.
            "OMNILOG_METRICS_PORT": "0",
        }
        values.update({_alias(key): value for key, value in overrides.items()})
        settings = load_settings(None, **values)
        ensure_bucket(s3_port, credentials, settings.s3_bucket)
        return settings

    return build
