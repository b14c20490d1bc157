"""National identification numbers: masked where found, nothing else touched."""

from __future__ import annotations

import logging

import pytest

from gateway.ops.logs import redact
from gateway.ops.national_ids import mask, mask_bytes

pytestmark = pytest.mark.fast


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("900101-1234567", "900101-1******"),
        ("PatientID=850230-2123456&x", "PatientID=850230-2******&x"),
        ('{"Value":["041231-3123456"]}', '{"Value":["041231-3******"]}'),
        ("a 900101-1234567 and 010203-4765432", "a 900101-1****** and 010203-4******"),
        # Not one: no hyphen, digits around, impossible dates, sex digit 0 or 9, UIDs.
        ("9001011234567", "9001011234567"),
        ("1900101-1234567", "1900101-1234567"),
        ("900101-12345678", "900101-12345678"),
        ("901301-1234567", "901301-1234567"),
        ("900132-1234567", "900132-1234567"),
        ("900101-9234567", "900101-9234567"),
        ("1.2.840.900101-1234567", "1.2.840.900101-1234567"),
        ("ACC-900101-1234567", "ACC-900101-1******"),
    ],
)
def test_mask(text: str, expected: str):
    assert mask(text) == expected
    assert mask_bytes(text.encode()) == expected.encode()


def test_logs_never_carry_them(caplog: pytest.LogCaptureFixture):
    assert redact("C-FIND PatientID=900101-1234567") == "C-FIND PatientID=900101-1******"
    from consent import redact as filters

    filters.install()
    logging.getLogger("test").warning("patient %s arrived", "900101-1234567")
    assert "1234567" not in caplog.text
