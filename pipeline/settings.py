"""Typed configuration from the environment (docs/contract.md §7) and an optional `.env`-style file.

Settings are read once, at start-up, by `load_settings`; nothing reads the environment at import
time. A bad value fails fast with one line naming the setting (`ConfigError`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipeline.log_format import scrub_credentials


class ConfigError(Exception):
    """A setting is missing or invalid; the message names it."""


def _env(name: str) -> AliasChoices:
    return AliasChoices(name)


class Settings(BaseSettings):
    """Every knob of a worker. Names are the environment variables of docs/contract.md §7."""

    model_config = SettingsConfigDict(
        frozen=True, extra="ignore", populate_by_name=False, env_ignore_empty=False
    )

    kafka_bootstrap_servers: str = Field(
        "127.0.0.1:9092", validation_alias=_env("OMNILOG_KAFKA_BOOTSTRAP_SERVERS")
    )
    database_url: SecretStr = Field(
        SecretStr("postgresql://omnilog@127.0.0.1:5432/omnilog"),
        validation_alias=_env("OMNILOG_DATABASE_URL"),
    )
    s3_endpoint_url: str = Field("", validation_alias=_env("OMNILOG_S3_ENDPOINT_URL"))
    s3_bucket: str = Field("omnilog", validation_alias=_env("OMNILOG_S3_BUCKET"), min_length=3, max_length=63)
    topic: str = Field("gateway.requests.v1", validation_alias=_env("OMNILOG_TOPIC"), min_length=1)
    dlq_topic: str = Field(
        "gateway.requests.v1.dlq", validation_alias=_env("OMNILOG_DLQ_TOPIC"), min_length=1
    )
    consumer_group: str = Field(
        "omnilog-ingest", validation_alias=_env("OMNILOG_CONSUMER_GROUP"), min_length=1
    )
    metrics_port: int = Field(9400, validation_alias=_env("OMNILOG_METRICS_PORT"), ge=0, le=65535)

    aws_access_key_id: SecretStr | None = Field(None, validation_alias=_env("AWS_ACCESS_KEY_ID"))
    aws_secret_access_key: SecretStr | None = Field(None, validation_alias=_env("AWS_SECRET_ACCESS_KEY"))
    aws_region: str = Field("us-east-1", validation_alias=_env("AWS_REGION"))

    # A dead member holds its partitions until this expires: lower means faster takeover after
    # a crash, higher tolerates longer pauses. The broker bounds it (group.min/max.session.timeout.ms).
    kafka_session_timeout_ms: int = Field(
        10_000, validation_alias=_env("OMNILOG_KAFKA_SESSION_TIMEOUT_MS"), ge=1000, le=300_000
    )

    # Batching (docs/ingest.md "One batch, end to end").
    # 20k events per batch, not the first design's 5k: objects, the transaction and the aggregate parts
    # cost per batch and per key rather than per event, and 20k measured 1.5x the throughput of 5k
    # at 234 MiB peak RSS (docs/performance.md). The age bound keeps quiet traffic fresh either way.
    batch_max_events: int = Field(20_000, validation_alias=_env("OMNILOG_BATCH_MAX_EVENTS"), gt=0)
    batch_max_bytes: int = Field(32 * 1024 * 1024, validation_alias=_env("OMNILOG_BATCH_MAX_BYTES"), gt=0)
    batch_max_age_s: float = Field(2.0, validation_alias=_env("OMNILOG_BATCH_MAX_AGE_S"), gt=0)
    max_inflight_bytes: int = Field(
        64 * 1024 * 1024, validation_alias=_env("OMNILOG_MAX_INFLIGHT_BYTES"), gt=0
    )
    # Batches in flight: 2 prepares the next batch while one commits (docs/ingest.md); 1 is one
    # flush at a time, about one batch's decoded events less memory (docs/performance.md).
    flush_pipeline_depth: int = Field(2, validation_alias=_env("OMNILOG_FLUSH_PIPELINE_DEPTH"), ge=1, le=2)
    # Allocations between young garbage collections in the worker and the merger (pipeline/gc_tuning.py);
    # 0 keeps CPython's default of 700.
    gc_gen0_threshold: int = Field(50_000, validation_alias=_env("OMNILOG_GC_GEN0_THRESHOLD"), ge=0)
    gzip_member_bytes: int = Field(64 * 1024, validation_alias=_env("OMNILOG_GZIP_MEMBER_BYTES"), gt=1024)
    gzip_level: int = Field(1, validation_alias=_env("OMNILOG_GZIP_LEVEL"), ge=0, le=3)
    # How long an organization's own bucket may keep failing before the flush dead-letters that
    # organization's events (`storage_unavailable`) instead of holding the batch (docs/storage.md).
    customer_bucket_outage_s: float = Field(
        300.0, validation_alias=_env("OMNILOG_CUSTOMER_BUCKET_OUTAGE_S"), ge=0, le=86_400
    )
    multipart_threshold_bytes: int = Field(
        16 * 1024 * 1024, validation_alias=_env("OMNILOG_MULTIPART_THRESHOLD_BYTES"), ge=5 * 1024 * 1024
    )

    # Lifecycle.
    shutdown_grace_s: float = Field(20.0, validation_alias=_env("OMNILOG_SHUTDOWN_GRACE_S"), gt=0)
    rebalance_drain_s: float = Field(10.0, validation_alias=_env("OMNILOG_REBALANCE_DRAIN_S"), gt=0)
    retry_max_s: float = Field(30.0, validation_alias=_env("OMNILOG_RETRY_MAX_S"), gt=0)
    # A stored offset outside the partition's log (topic re-created, or retention deleted unread
    # records) is always detected, counted and logged; this says what happens next. `earliest`
    # resumes at the first record still there: losing nothing more beats stopping every worker
    # that takes the partition while retention keeps deleting. `fail` stops for a human instead.
    offset_out_of_range: Literal["earliest", "fail"] = Field(
        "earliest", validation_alias=_env("OMNILOG_OFFSET_OUT_OF_RANGE")
    )

    # Validation (docs/contract.md §1): accepted lateness / future skew of started_at.
    max_event_age_days: int = Field(90, validation_alias=_env("OMNILOG_MAX_EVENT_AGE_DAYS"), gt=0)
    max_future_skew_s: int = Field(3600, validation_alias=_env("OMNILOG_MAX_FUTURE_SKEW_S"), ge=0)

    # server_stats window width (docs/aggregates.md §10); must divide a day (86400 s).
    server_stats_window_s: int = Field(
        60, validation_alias=_env("OMNILOG_SERVER_STATS_WINDOW_S"), ge=1, le=86400
    )

    # Dead-letter limit: stop consuming instead of draining a bad deploy into the DLQ.
    dlq_max_ratio: float = Field(0.5, validation_alias=_env("OMNILOG_DLQ_MAX_RATIO"), gt=0, le=1)
    dlq_min_window: int = Field(1000, validation_alias=_env("OMNILOG_DLQ_MIN_WINDOW"), gt=0)
    # A dead letter must always be producible: a record larger than this (key + value + headers) keeps
    # a truncated copy of its value, and the whole value goes to object storage under
    # OMNILOG_DLQ_OBJECT_PREFIX, named in its headers. Kafka's default record limit is 1 MiB
    # (message.max.bytes); keep this below the dead-letter topic's limit.
    dlq_max_record_bytes: int = Field(
        1_000_000, validation_alias=_env("OMNILOG_DLQ_MAX_RECORD_BYTES"), ge=16 * 1024, le=100 * 1024 * 1024
    )
    dlq_compression: Literal["none", "gzip"] = Field("gzip", validation_alias=_env("OMNILOG_DLQ_COMPRESSION"))
    dlq_object_prefix: str = Field(
        "dead-letters/",
        validation_alias=_env("OMNILOG_DLQ_OBJECT_PREFIX"),
        min_length=1,
        pattern=r"^[A-Za-z0-9._/-]+/$",
    )

    # Aggregates merger.
    # A pass costs what its deltas cost; spacing passes lets one rollup write absorb many batches'
    # deltas, and 4 s + the 2 s batch age still shows an event within 10 s.
    merge_interval_s: float = Field(4.0, validation_alias=_env("OMNILOG_MERGE_INTERVAL_S"), gt=0)
    # Mergers split the 64 organization slots into this many shards (docs/aggregates.md §3); a
    # merger with OMNILOG_MERGE_SHARD works on that shard only, without it on every shard in turn.
    merge_shards: int = Field(1, validation_alias=_env("OMNILOG_MERGE_SHARDS"), ge=1, le=64)
    merge_shard: int | None = Field(None, validation_alias=_env("OMNILOG_MERGE_SHARD"), ge=0, le=63)
    # The small setup: each worker also runs a merger, on its own thread. Off when `omnilog merge`
    # runs as its own Deployment.
    merger_in_worker: bool = Field(True, validation_alias=_env("OMNILOG_MERGER_IN_WORKER"))

    # Retention tiers `omnilog maintain` applies (docs/operations.md "Retention"): raw usage rows
    # (never longer than the organization's own retention), hourly and daily rollups.
    usage_raw_retention_days: int = Field(
        90, validation_alias=_env("OMNILOG_USAGE_RAW_RETENTION_DAYS"), ge=1, le=3650
    )
    usage_hourly_retention_days: int = Field(
        365, validation_alias=_env("OMNILOG_USAGE_HOURLY_RETENTION_DAYS"), ge=1, le=3650
    )
    usage_daily_retention_days: int = Field(
        5 * 365, validation_alias=_env("OMNILOG_USAGE_DAILY_RETENTION_DAYS"), ge=1, le=3650
    )

    # Where `omnilog maintain` pushes its run's metrics (a Prometheus Pushgateway, e.g.
    # http://omnilog-pushgateway:9091): a CronJob's process is gone before any scrape. Empty: no push.
    maintain_pushgateway_url: str = Field("", validation_alias=_env("OMNILOG_MAINTAIN_PUSHGATEWAY_URL"))

    log_level: str = Field("INFO", validation_alias=_env("OMNILOG_LOG_LEVEL"))

    # The read API (`omnilog serve`, docs/security.md). It connects as its own role (member of
    # omnilog_api: owns nothing, NOBYPASSRLS), never as the owner the worker uses.
    api_database_url: SecretStr = Field(
        SecretStr("postgresql://omnilog_api@127.0.0.1:5432/omnilog"),
        validation_alias=_env("OMNILOG_API_DATABASE_URL"),
    )
    api_host: str = Field("127.0.0.1", validation_alias=_env("OMNILOG_API_HOST"), min_length=1)
    api_port: int = Field(8080, validation_alias=_env("OMNILOG_API_PORT"), ge=0, le=65535)
    api_pool_size: int = Field(10, validation_alias=_env("OMNILOG_API_POOL_SIZE"), ge=1, le=200)
    api_max_page_size: int = Field(1000, validation_alias=_env("OMNILOG_API_MAX_PAGE_SIZE"), ge=1, le=10_000)
    api_max_range_days: int = Field(31, validation_alias=_env("OMNILOG_API_MAX_RANGE_DAYS"), ge=1, le=3660)
    api_request_timeout_s: float = Field(10.0, validation_alias=_env("OMNILOG_API_REQUEST_TIMEOUT_S"), gt=0)
    api_max_body_bytes: int = Field(16 * 1024, validation_alias=_env("OMNILOG_API_MAX_BODY_BYTES"), ge=0)
    api_rate_per_s: float = Field(20.0, validation_alias=_env("OMNILOG_API_RATE_PER_S"), gt=0)
    api_rate_burst: int = Field(100, validation_alias=_env("OMNILOG_API_RATE_BURST"), ge=1)

    @field_validator("kafka_bootstrap_servers")
    @classmethod
    def _bootstrap_hosts(cls, value: str) -> str:
        for hostport in value.split(","):
            host, sep, port = hostport.strip().rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"expected host:port[,host:port...], got {hostport.strip()!r}")
        return value

    @field_validator("database_url", "api_database_url")
    @classmethod
    def _postgres_url(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().startswith(("postgresql://", "postgres://")):
            raise ValueError("expected a postgresql:// URL")
        return value

    @field_validator("s3_endpoint_url")
    @classmethod
    def _endpoint(cls, value: str) -> str:
        if value and not value.startswith(("http://", "https://")):
            raise ValueError("expected an http(s):// URL, or empty for AWS")
        return value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        upper = value.upper()
        if upper not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("expected one of DEBUG, INFO, WARNING, ERROR")
        return upper


def _alias_of(field_name: str) -> str:
    field = Settings.model_fields.get(field_name)
    alias = field.validation_alias if field else None
    if isinstance(alias, AliasChoices):
        first = alias.choices[0]
        return first if isinstance(first, str) else field_name
    return field_name


def load_settings(env_file: str | Path | None = None, **overrides: object) -> Settings:
    """Build settings from the environment (and `env_file` if given).

    Raises ConfigError with one line per bad setting, naming its environment variable.
    """
    if env_file is not None and not Path(env_file).is_file():
        raise ConfigError(f"--env-file: no such file: {env_file}")
    try:
        # `_env_file` is pydantic-settings' per-call override; its signature is not typed.
        build: Any = Settings
        settings: Settings = build(_env_file=env_file, **overrides)
        return settings
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            name = _alias_of(str(err["loc"][0])) if err["loc"] else "?"
            shown = _shown_input(name, err.get("input"))
            lines.append(f"invalid setting {name}: {scrub_credentials(err['msg'])} (got {shown})")
        raise ConfigError("; ".join(lines)) from None


def _is_secret(name: str) -> bool:
    """Whether the setting of field or environment name `name` is a SecretStr."""
    for field_name, field in Settings.model_fields.items():
        if name in (field_name, _alias_of(field_name)):
            return SecretStr in (field.annotation, *get_args(field.annotation))
    return False


def _shown_input(name: str, value: object) -> str:
    """A rejected value as the error shows it: never a secret, never a password inside a URL."""
    if _is_secret(name):
        # A URL (the database's) stays recognisable without its password; other secrets are hidden.
        if isinstance(value, str) and "://" in value:
            return repr(scrub_credentials(value))
        return "a secret value, not shown"
    return repr(scrub_credentials(value)) if isinstance(value, str) else repr(value)
