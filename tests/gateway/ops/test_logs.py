"""Log lines: secrets masked in both formats; JSON lines carry the request ID."""

from __future__ import annotations

import json
import logging

import pytest

from gateway.ops.logs import JSONFormatter, redact, request_id

pytestmark = pytest.mark.fast


@pytest.mark.parametrize(
    ("line", "secret"),
    [
        ("connect postgresql+psycopg://sb:s3cr3t-pw@db:5432/sb failed", "s3cr3t-pw"),
        ("GET /share?token=abcDEF123456 200", "abcDEF123456"),
        ("settings s3_secret_key='minio-secret-99' bucket=x", "minio-secret-99"),
        ("Authorization: Bearer eyJhbGciOi.payload.sig", "eyJhbGciOi.payload.sig"),
        ("amqp://guest:guestpw@127.0.0.1:5672//", "guestpw"),
    ],
)
def test_secrets_are_masked(line: str, secret: str):
    masked = redact(line)
    assert secret not in masked
    assert "***" in masked


def test_plain_text_is_left_alone():
    line = "C-STORE refused (invalid-uid): Study Instance UID 1.2..3 is not valid"
    assert redact(line) == line


def test_json_line_with_request_id():
    record = logging.LogRecord(
        "studybridge.test", logging.WARNING, __file__, 1, "user %s token=%s", ("x", "zz9"), None
    )
    token = request_id.set("req-42")
    try:
        entry = json.loads(JSONFormatter().format(record))
    finally:
        request_id.reset(token)
    assert entry["request_id"] == "req-42"
    assert entry["level"] == "WARNING" and entry["logger"] == "studybridge.test"
    assert "zz9" not in entry["message"]
    assert entry["ts"].endswith("+00:00")
