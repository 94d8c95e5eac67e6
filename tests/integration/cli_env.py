"""The environment an `omnilog` command runs with in the integration tests."""

from __future__ import annotations

import os

from pipeline.settings import Settings


def command_env(settings: Settings, **extra: str) -> dict[str, str]:
    """This process's environment, the stack's database, object store and credentials from
    `settings`, then `extra` (other OMNILOG_* settings). Good for a subprocess and for CliRunner
    alike (the runner lays its env over os.environ)."""
    assert settings.aws_access_key_id and settings.aws_secret_access_key
    return {
        **os.environ,
        "OMNILOG_DATABASE_URL": settings.database_url.get_secret_value(),
        "OMNILOG_S3_ENDPOINT_URL": settings.s3_endpoint_url,
        "OMNILOG_S3_BUCKET": settings.s3_bucket,
        "AWS_ACCESS_KEY_ID": settings.aws_access_key_id.get_secret_value(),
        "AWS_SECRET_ACCESS_KEY": settings.aws_secret_access_key.get_secret_value(),
        "AWS_REGION": settings.aws_region,
        **extra,
    }
