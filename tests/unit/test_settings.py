"""Every invalid setting fails at start-up with one line naming its environment variable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.settings import ConfigError, Settings, load_settings

_ENV_NAMES = [
    "OMNILOG_KAFKA_BOOTSTRAP_SERVERS", "OMNILOG_DATABASE_URL", "OMNILOG_S3_ENDPOINT_URL",
    "OMNILOG_S3_BUCKET", "OMNILOG_TOPIC", "OMNILOG_DLQ_TOPIC", "OMNILOG_CONSUMER_GROUP",
    "OMNILOG_METRICS_PORT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for field in Settings.model_fields.values():
        alias = field.validation_alias
        for name in getattr(alias, "choices", []):
            monkeypatch.delenv(str(name), raising=False)


def test_defaults_follow_the_contract() -> None:
    s = load_settings()
    assert s.topic == "gateway.requests.v1"
    assert s.dlq_topic == "gateway.requests.v1.dlq"
    assert s.s3_endpoint_url == ""  # empty means AWS


def test_every_contract_variable_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    values = {
        "OMNILOG_KAFKA_BOOTSTRAP_SERVERS": "k1:9092,k2:9093",
        "OMNILOG_DATABASE_URL": "postgresql://u@db:5432/x",
        "OMNILOG_S3_ENDPOINT_URL": "http://s3:8333",
        "OMNILOG_S3_BUCKET": "logs-bucket",
        "OMNILOG_TOPIC": "in",
        "OMNILOG_DLQ_TOPIC": "in.dlq",
        "OMNILOG_CONSUMER_GROUP": "grp",
        "OMNILOG_METRICS_PORT": "9999",
        "AWS_ACCESS_KEY_ID": "AK",
        "AWS_SECRET_ACCESS_KEY": "SK",
        "AWS_REGION": "eu-west-1",
    }
    assert sorted(values) == sorted(_ENV_NAMES)
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    s = load_settings()
    assert (s.kafka_bootstrap_servers, s.s3_endpoint_url, s.s3_bucket) == (
        "k1:9092,k2:9093",
        "http://s3:8333",
        "logs-bucket",
    )
    assert (s.topic, s.dlq_topic, s.consumer_group, s.metrics_port) == ("in", "in.dlq", "grp", 9999)
    assert s.database_url.get_secret_value() == "postgresql://u@db:5432/x"
    assert s.aws_secret_access_key is not None and s.aws_secret_access_key.get_secret_value() == "SK"
    assert "SK" not in repr(s) and "postgresql://u@db" not in repr(s)  # secrets never printed


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("OMNILOG_KAFKA_BOOTSTRAP_SERVERS", "no-port", "host:port"),
        ("OMNILOG_DATABASE_URL", "mysql://x", "postgresql://"),
        ("OMNILOG_S3_ENDPOINT_URL", "s3.local:8333", "http(s)://"),
        ("OMNILOG_S3_BUCKET", "ab", "at least 3"),
        ("OMNILOG_TOPIC", "", "at least 1"),
        ("OMNILOG_METRICS_PORT", "abc", "valid integer"),
        ("OMNILOG_METRICS_PORT", "70000", "less than or equal to 65535"),
        ("OMNILOG_BATCH_MAX_EVENTS", "0", "greater than 0"),
        ("OMNILOG_BATCH_MAX_AGE_S", "-1", "greater than 0"),
        ("OMNILOG_GZIP_LEVEL", "9", "less than or equal to 3"),
        ("OMNILOG_DLQ_MAX_RATIO", "1.5", "less than or equal to 1"),
        ("OMNILOG_LOG_LEVEL", "chatty", "DEBUG, INFO"),
        ("OMNILOG_MULTIPART_THRESHOLD_BYTES", "1024", "greater than or equal to"),
    ],
)
def test_each_invalid_value_names_its_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, fragment: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert message.startswith(f"invalid setting {name}:"), message
    assert fragment in message
    assert "\n" not in message


def test_env_file_is_read_and_a_missing_one_is_named(tmp_path: Path) -> None:
    env = tmp_path / "omnilog.env"
    env.write_text("OMNILOG_TOPIC=from-file\nOMNILOG_METRICS_PORT=9500\n")
    s = load_settings(env)
    assert (s.topic, s.metrics_port) == ("from-file", 9500)
    with pytest.raises(ConfigError, match="--env-file: no such file"):
        load_settings(tmp_path / "missing.env")


def test_the_cli_fails_fast_with_one_line_and_exit_code_2() -> None:
    omnilog = str(Path(sys.executable).parent / "omnilog")
    result = subprocess.run(
        [omnilog, "ingest"],
        env={"OMNILOG_METRICS_PORT": "port"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [lines[0]] and "OMNILOG_METRICS_PORT" in lines[0], result.stderr
