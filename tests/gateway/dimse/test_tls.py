"""DICOM TLS against dcmtk (echoscu/storescu +tls) and HTTPS, with a test CA.

The CA, the node's certificate and the clients' certificates are made here with
``cryptography``. One gateway serves a TLS DIMSE port (client certificates
optional) beside its plain port, and HTTPS.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.config import Settings
from gateway.dimse.tls import TLSConfigError, certificate_names_host, server_context
from tests.factories import ct_series
from tests.pki import Pki, make_ca
from tests.servers import Gateway, free_port, require_tool, run_tool, running_gateway

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]


@pytest.fixture(scope="module")
def tls_gateway(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    require_tool("echoscu")
    server_key, server_cert = pki.issue("node", dns=["localhost"], ips=["127.0.0.1"], server=True)
    tls_port = free_port()
    env = {
        "STUDYBRIDGE_DIMSE_TLS_PORT": str(tls_port),
        "STUDYBRIDGE_TLS_CERT_FILE": str(server_cert),
        "STUDYBRIDGE_TLS_KEY_FILE": str(server_key),
        "STUDYBRIDGE_TLS_CA_FILE": str(pki.ca_file),
        "STUDYBRIDGE_TLS_CLIENT_CERTS": "optional",
        "STUDYBRIDGE_HTTP_TLS": "true",
        "STUDYBRIDGE_ACSE_TIMEOUT": "5",
    }
    with running_gateway(tmp_path_factory.mktemp("gw"), env) as gw:
        for aet in ("ECHOSCU", "STORESCU", "MOVED"):
            gw.cli(
                "peers",
                "add",
                aet,
                "--host",
                "127.0.0.1",
                "--port",
                "104",
                "--institution",
                "Test Hospital",
            )
        gw.start("--dimse-workers", "2")
        gw.tls_port = tls_port  # type: ignore[attr-defined]
        yield gw
        assert gw.stop() == 0, gw.log_text()


def _tls_args(key: Path, cert: Path, pki: Pki) -> list[str]:
    return ["+tls", str(key), str(cert), "+cf", str(pki.ca_file)]


def _echo(gw: Gateway, *args: str, aet: str = "ECHOSCU"):
    return run_tool(
        [require_tool("echoscu"), "-aet", aet, *args, "-aec", gw.ae_title, "127.0.0.1",
         str(gw.tls_port)],  # type: ignore[attr-defined]
        timeout=60,
    )  # fmt: skip


def test_echo_and_store_over_tls_with_a_client_certificate(tls_gateway, pki: Pki, tmp_path):
    key, cert = pki.issue("echo-client", ips=["127.0.0.1"])
    result = _echo(tls_gateway, *_tls_args(key, cert, pki))
    assert result.returncode == 0, result.stdout + result.stderr
    files = ct_series(tmp_path / "in", 3)
    stored = run_tool(
        [require_tool("storescu"), "-aet", "STORESCU", *_tls_args(key, cert, pki),
         "-aec", tls_gateway.ae_title, "127.0.0.1", str(tls_gateway.tls_port),
         *map(str, files)],
        timeout=120,
    )  # fmt: skip
    assert stored.returncode == 0, stored.stdout + stored.stderr
    assert '"instances": 3' in tls_gateway.cli("stats", "--json").stdout


def test_anonymous_tls_client_is_accepted_when_certificates_are_optional(tls_gateway, pki: Pki):
    result = _echo(tls_gateway, "+tla", "+cf", str(pki.ca_file))
    assert result.returncode == 0, result.stdout + result.stderr


def test_certificate_naming_another_host_than_the_peer_is_refused(tls_gateway, pki: Pki):
    key, cert = pki.issue("elsewhere", dns=["pacs.elsewhere.example"])
    result = _echo(tls_gateway, *_tls_args(key, cert, pki))
    assert result.returncode != 0
    assert "Calling AE Title Not Recognized" in result.stdout + result.stderr
    assert "certificate does not name" in tls_gateway.log_text()


def test_certificate_of_an_unknown_ca_fails_the_handshake(tls_gateway, pki: Pki, tmp_path):
    rogue_folder = tmp_path / "rogue"
    rogue_folder.mkdir()
    rogue = Pki(rogue_folder, *make_ca(rogue_folder, "Rogue CA"))
    key, cert = rogue.issue("rogue-client", ips=["127.0.0.1"])
    result = _echo(tls_gateway, *_tls_args(key, cert, pki))
    assert result.returncode != 0


def test_plain_tcp_and_weak_tls_are_refused_on_the_tls_port(tls_gateway, pki: Pki):
    # A plain DICOM client on the TLS port: no association.
    plain = _echo(tls_gateway)
    assert plain.returncode != 0
    # dcmtk's retired AES profile (TLS_RSA_WITH_AES_128_CBC_SHA, no forward secrecy).
    key, cert = pki.issue("weak-client", ips=["127.0.0.1"])
    weak = _echo(tls_gateway, *_tls_args(key, cert, pki), "+pa")
    assert weak.returncode != 0
    # TLS 1.1 and older are not spoken at all.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer TLS 1.1 at all
    with (
        pytest.raises((ssl.SSLError, ConnectionError)),
        socket.create_connection(("127.0.0.1", tls_gateway.tls_port), 10) as raw,
        ctx.wrap_socket(raw),
    ):
        pass
    # The plain port still answers plain DICOM, and the node survived the refusals.
    ok = run_tool(
        [require_tool("echoscu"), "-aet", "ECHOSCU", "-aec", tls_gateway.ae_title,
         "127.0.0.1", str(tls_gateway.dimse_port)],
        timeout=60,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert _echo(tls_gateway, "+tla", "+cf", str(pki.ca_file)).returncode == 0


def test_https_serves_the_dicomweb_door(tls_gateway, pki: Pki):
    with httpx.Client(verify=ssl.create_default_context(cafile=str(pki.ca_file))) as client:
        answer = client.get(f"https://127.0.0.1:{tls_gateway.http_port}/healthz")
    assert answer.status_code == 200
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{tls_gateway.http_port}/healthz", timeout=5)


@pytest.mark.fast
def test_certificate_names_host_by_san_or_common_name():
    cert_ip = {
        "subject": ((("commonName", "x"),),),
        "subjectAltName": (("IP Address", "127.0.0.1"),),
    }
    assert certificate_names_host(cert_ip, "127.0.0.1")
    assert not certificate_names_host(cert_ip, "10.0.0.1")
    assert not certificate_names_host(cert_ip, "x")  # SAN present: CN not consulted
    cert_dns = {"subjectAltName": (("DNS", "PACS.Example.org"),)}
    assert certificate_names_host(cert_dns, "pacs.example.org.")
    assert not certificate_names_host(cert_dns, "other.example.org")
    cert_cn = {"subject": ((("commonName", "pacs.example.org"),),)}
    assert certificate_names_host(cert_cn, "pacs.example.org")


@pytest.mark.fast
def test_server_context_follows_the_settings(pki: Pki, tmp_path: Path):
    key, cert = pki.issue("ctx-node", ips=["127.0.0.1"], server=True)
    base = {"data_dir": tmp_path, "tls_cert_file": cert, "tls_key_file": key}
    ctx = server_context(Settings(**base))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_NONE
    names = {c["name"] for c in ctx.get_ciphers()}
    assert names and all("GCM" in n or "CHACHA20" in n for n in names)
    required = server_context(
        Settings(**base, tls_client_certs="required", tls_ca_file=pki.ca_file)
    )
    assert required.verify_mode == ssl.CERT_REQUIRED
    with pytest.raises(TLSConfigError, match="needs tls_ca_file"):
        server_context(Settings(**base, tls_client_certs="optional"))
    with pytest.raises(TLSConfigError, match="tls_cert_file"):
        server_context(Settings(data_dir=tmp_path))
    with pytest.raises(TLSConfigError, match="cannot load"):
        server_context(Settings(**{**base, "tls_key_file": tmp_path / "missing.key"}))
