"""No password in a configuration error or a log line (settings masking, log scrubbing)."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.log_format import CredentialFilter, JsonFormatter, configure_logging, scrub_credentials
from pipeline.settings import ConfigError, Settings, _shown_input, load_settings

PASSWORD = "hunter2-S3cr3t"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for field in Settings.model_fields.values():
        for name in getattr(field.validation_alias, "choices", []):
            monkeypatch.delenv(str(name), raising=False)


@pytest.mark.parametrize(
    "url",
    [
        f"mysql://omnilog:{PASSWORD}@db:5432/omnilog",
        f"mysql://omnilog:{PASSWORD}@with-at@db/omnilog",  # an unescaped "@" in the password
        f"mysql://db/omnilog?user=omnilog&password={PASSWORD}",
        f"not a url, password={PASSWORD}",
        PASSWORD,
    ],
)
def test_a_bad_database_url_is_named_without_its_password(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("OMNILOG_DATABASE_URL", url)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert "OMNILOG_DATABASE_URL" in message
    assert "hunter2" not in message
    assert "\n" not in message


def test_the_masked_url_keeps_user_and_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMNILOG_DATABASE_URL", f"mysql://omnilog:{PASSWORD}@db:5432/omnilog")
    with pytest.raises(ConfigError, match=r"'mysql://omnilog:\*\*\*@db:5432/omnilog'"):
        load_settings()


def test_other_settings_lose_url_passwords_and_secrets_are_never_shown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OMNILOG_S3_ENDPOINT_URL", f"ftp://key:{PASSWORD}@s3.internal")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "OMNILOG_S3_ENDPOINT_URL" in str(caught.value)
    assert "ftp://key:***@s3.internal" in str(caught.value)
    assert "hunter2" not in str(caught.value)
    # Every SecretStr setting, by environment name or field name.
    for name in (
        "AWS_SECRET_ACCESS_KEY",
        "aws_secret_access_key",
        "AWS_ACCESS_KEY_ID",
        "OMNILOG_DATABASE_URL",
    ):
        assert _shown_input(name, PASSWORD) == "a secret value, not shown"
    assert _shown_input("OMNILOG_TOPIC", "in") == "'in'"


def test_the_cli_prints_one_line_without_the_password(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMNILOG_", "AWS_"))}
    env["OMNILOG_DATABASE_URL"] = f"mysql://omnilog:{PASSWORD}@127.0.0.1:1/omnilog"
    omnilog = Path(sys.executable).with_name("omnilog")
    done = subprocess.run(
        [str(omnilog), "migrate"],
        check=False,
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "hunter2" not in done.stderr + done.stdout
    assert done.stderr.count("\n") == 1 and "OMNILOG_DATABASE_URL" in done.stderr


# Log scrubbing.

_user = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789._-"), min_size=0, max_size=12)
# Anything but the characters that end a URL's authority (a real URL percent-encodes them).
_password = st.text(
    st.characters(codec="utf-8", exclude_characters="/?#", exclude_categories=["Zs", "Zl", "Zp", "Cc"]),
    min_size=0,
    max_size=20,
).map(lambda p: f"PW{p}")
_around = st.text(st.sampled_from("ab :/@?=&\n"), max_size=10)


@settings(max_examples=500, deadline=None)
@given(user=_user, password=_password, before=_around, after=_around)
def test_url_passwords_are_masked_wherever_they_appear(
    user: str, password: str, before: str, after: str
) -> None:
    text = f"{before}postgresql://{user}:{password}@db.internal:5432/omnilog{after}"
    scrubbed = scrub_credentials(text)
    assert f"postgresql://{user}:***@db.internal:5432/omnilog" in scrubbed
    assert password not in scrubbed


def test_text_without_credentials_is_unchanged() -> None:
    for text in ("http://127.0.0.1:8333/bucket", "postgresql://omnilog@db/x", "ratio 3:4 @ noon", ""):
        assert scrub_credentials(text) == text


@pytest.fixture
def root_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _connect_failure() -> Exception:
    try:
        try:
            raise OSError(f"connect to postgresql://omnilog:{PASSWORD}@db:5432/omnilog failed")
        except OSError as inner:
            raise RuntimeError("worker cannot start") from inner
    except RuntimeError as exc:
        return exc


def test_json_log_lines_carry_no_password(capsys: pytest.CaptureFixture[str], root_logging: None) -> None:
    configure_logging("INFO")
    log = logging.getLogger("omnilog.test")
    log.info(
        "connecting to %s",
        f"postgresql://omnilog:{PASSWORD}@db/omnilog",
        extra={"dsn": f"x://u:{PASSWORD}@h"},
    )
    failure = _connect_failure()
    log.error("start failed", exc_info=(type(failure), failure, failure.__traceback__))
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    assert all("hunter2" not in line for line in lines)
    first, second = (json.loads(line) for line in lines)
    assert first["msg"] == "connecting to postgresql://omnilog:***@db/omnilog"
    assert first["dsn"] == "x://u:***@h"
    assert "postgresql://omnilog:***@db:5432/omnilog" in second["exc"]


def test_the_filter_scrubs_the_record_for_any_handler() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(CredentialFilter())
    log = logging.getLogger("omnilog.test.filter")
    log.addHandler(handler)
    log.propagate = False
    try:
        failure = _connect_failure()
        log.warning("retrying %s in %d s", f"postgres://u:{PASSWORD}@h/db", 5, exc_info=failure)
    finally:
        log.removeHandler(handler)
    text = stream.getvalue()
    assert "retrying postgres://u:***@h/db in 5 s" in text
    assert "Traceback" in text and "RuntimeError: worker cannot start" in text
    assert "hunter2" not in text
    assert isinstance(JsonFormatter().format(logging.makeLogRecord({"msg": PASSWORD})), str)
