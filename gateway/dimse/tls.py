"""DICOM TLS: the DIMSE port that speaks TLS (PS3.15 B.9, the BCP 195 profile).

``server_context`` builds the server's ``ssl.SSLContext`` from the settings:

- TLS 1.2 or newer only; TLS 1.2 cipher suites limited to ephemeral (EC)DHE key
  exchange with AEAD ciphers (AES-GCM, ChaCha20-Poly1305), as RFC 9325 (BCP 195)
  recommends; TLS 1.3 suites are all of that kind; no compression, no
  renegotiation, the server's cipher order;
- client certificates: ``tls_client_certs = "none"`` (not asked for),
  ``"optional"`` (asked for, verified against ``tls_ca_file`` when sent) or
  ``"required"`` (a client without a valid certificate fails the handshake).

A verified client certificate is bound to the peer registry: when the calling AE
title is a registered peer, the certificate must name the peer's registered host
(a subjectAltName DNS name or IP address, or the subject's common name when it has
no subjectAltName), just as the TCP address must (``certificate_names_host``).

``TLSServerMixin`` makes the handshake happen in the association's own thread
with the ACSE timeout, not in the accept loop: a client that connects and says
nothing (or speaks plain DICOM to the TLS port) costs one thread for a few
seconds, never the listener.

Associations we open ourselves use the same profile (``hardened_context``) from
``gateway.dimse.client``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import ssl
from typing import Any

from gateway.config import Settings

log = logging.getLogger(__name__)

# TLS 1.2 suites: forward-secret key exchange and AEAD only (RFC 9325 section 4.2).
BCP195_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!SHA1"


class TLSConfigError(ValueError):
    """The TLS settings cannot make a working context (missing or unreadable files)."""


def hardened_context(purpose: int) -> ssl.SSLContext:
    """A context limited to the BCP 195 profile (server or client side)."""
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(BCP195_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    return ctx


def server_context(settings: Settings) -> ssl.SSLContext:
    """The server context for the DIMSE TLS port (and HTTPS) from the settings."""
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        raise TLSConfigError("TLS needs tls_cert_file and tls_key_file (PEM)")
    ctx = hardened_context(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(settings.tls_cert_file, settings.tls_key_file)
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(f"cannot load the TLS certificate or key: {exc}") from exc
    mode = settings.tls_client_certs
    if mode != "none":
        if settings.tls_ca_file is None:
            raise TLSConfigError(f"tls_client_certs={mode} needs tls_ca_file")
        try:
            ctx.load_verify_locations(cafile=settings.tls_ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise TLSConfigError(f"cannot load the client CA file: {exc}") from exc
        ctx.verify_mode = ssl.CERT_REQUIRED if mode == "required" else ssl.CERT_OPTIONAL
    return ctx


class TLSServerMixin:
    """For an association server class: TLS handshakes in the connection's thread."""

    ssl_context: ssl.SSLContext | None
    handshake_timeout: float = 30.0

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = self.socket.accept()  # type: ignore[attr-defined]
        assert self.ssl_context is not None
        wrapped = self.ssl_context.wrap_socket(
            sock, server_side=True, do_handshake_on_connect=False
        )
        return wrapped, address

    def finish_request(self, request: Any, client_address: Any) -> None:
        try:
            request.settimeout(self.handshake_timeout)
            request.do_handshake()
            request.settimeout(None)
        except (ssl.SSLError, OSError) as exc:
            # A plain-TCP client, an old protocol version, an untrusted certificate.
            log.warning("TLS handshake with %s failed: %s", client_address[0], exc)
            with contextlib.suppress(OSError):
                request.close()
            return
        super().finish_request(request, client_address)  # type: ignore[misc]


def peer_certificate(assoc: Any) -> dict[str, Any] | None:
    """The verified certificate the requestor of ``assoc`` presented, if any."""
    sock = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
    if not isinstance(sock, ssl.SSLSocket):
        return None
    with contextlib.suppress(ValueError, OSError):
        return sock.getpeercert() or None
    return None


def certificate_names_host(cert: dict[str, Any], host: str) -> bool:
    """Whether the certificate names ``host`` (an IP address or a DNS name)."""
    wanted = host.strip().lower().rstrip(".")
    try:
        wanted_ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(
            wanted
        )
    except ValueError:
        wanted_ip = None
    alt_names = cert.get("subjectAltName", ())
    for kind, value in alt_names:
        if kind == "IP Address" and wanted_ip is not None:
            with contextlib.suppress(ValueError):
                if ipaddress.ip_address(value.strip()) == wanted_ip:
                    return True
        elif kind == "DNS" and wanted_ip is None and value.lower().rstrip(".") == wanted:
            return True
    if alt_names:
        return False
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName" and value.strip().lower().rstrip(".") == wanted:
                return True
    return False
