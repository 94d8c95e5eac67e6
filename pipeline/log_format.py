"""Structured JSON logs (one object per line on stderr) for lifecycle events and flush summaries.

No log line carries a password: every message, exception text and extra field goes through
`scrub_credentials`, whatever put it there (our code, asyncpg, botocore, aiokafka).
"""

from __future__ import annotations

import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any, Final

import orjson

# Attributes every LogRecord has; anything else was passed in `extra=` and belongs in the JSON.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

MASK: Final = "***"

# `scheme://user:password@host`: the user stays (it helps to know who failed to log in), the
# password goes. The authority ends at the first "/", "?", "#" or blank, and the user part at the
# LAST "@" before it, as URL parsers read it, so an unescaped "@" in a password is masked too.
# Anchored on "://" (not the scheme) so the search skips to it: linear on any text.
_URL_PASSWORD: Final = re.compile(r"://(?P<user>[^/?#\s:@]*):[^/?#\s]*@")
# libpq also takes the password as a parameter: `?password=...` in a URL, `password=...` in a
# key/value connection string.
_PASSWORD_PARAMETER: Final = re.compile(r"(?i)(?P<head>\b(?:ssl)?password=)(?:'(?:[^'\\]|\\.)*'|[^&\s]*)")


def scrub_credentials(text: str) -> str:
    """`text` with the password of every URL (and libpq `password=` parameter) replaced by ***."""
    if "://" in text:
        text = _URL_PASSWORD.sub(rf"://\g<user>:{MASK}@", text)
    if "assword=" in text or "ASSWORD=" in text:
        text = _PASSWORD_PARAMETER.sub(rf"\g<head>{MASK}", text)
    return text


def _scrub_value(value: Any) -> Any:
    return scrub_credentials(value) if isinstance(value, str) else value


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": scrub_credentials(record.getMessage()),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD:
                payload[key] = _scrub_value(value)
        if record.exc_info:
            payload["exc"] = scrub_credentials(self.formatException(record.exc_info))
        if record.stack_info:
            payload["stack"] = scrub_credentials(self.formatStack(record.stack_info))
        return orjson.dumps(
            payload, default=lambda v: scrub_credentials(str(v)), option=orjson.OPT_NON_STR_KEYS
        ).decode()


class CredentialFilter(logging.Filter):
    """Scrubs a record in place, for handlers that do not use `JsonFormatter` (e.g. a library's).

    The message is rendered and scrubbed once (its arguments are dropped), and the exception text
    is rendered and scrubbed into `exc_text`, which `logging.Formatter` prints instead of the
    traceback it would otherwise format again.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = scrub_credentials(record.getMessage())
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub_credentials(record.exc_text)
        return True


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(CredentialFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiokafka logs every rebalance step at INFO; keep its warnings only.
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
