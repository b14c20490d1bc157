"""Fixtures of the DIMSE tests: the test PKI of the DICOM TLS tests."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization

from tests.pki import Pki, make_ca


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    key, cert = make_ca(folder)
    (folder / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return Pki(folder, key, cert)
