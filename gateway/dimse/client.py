"""Outgoing DIMSE associations: the one way studybridge calls a peer.

Every association we request goes through here: the census (C-FIND) and pull
(C-MOVE) of a closure transfer, forwarding (C-STORE), Storage Commitment reports
on a new association (N-EVENT-REPORT), and C-MOVE sub-operations (through
``destination``, because pynetdicom opens those itself). Each gets:

- the peer's registered host, port and AE title, and our AE title;
- the timeouts of the settings (connect, ACSE, DIMSE, network);
- DICOM TLS when the peer is registered with ``--tls`` (PS3.15 B.9, BCP 195 as in
  ``tls``): TLS 1.2 or newer, forward-secret AEAD suites, the peer's certificate
  verified against the configured CA (the peer's own ``tls_ca_file``, else the
  gateway's) and checked to name the peer's host (or its ``tls_server_name``),
  and our client certificate (``tls_client_cert_file``, else ``tls_cert_file``);
- one error, ``AssociationFailed``, saying in plain words why it failed (connection
  refused or timed out, TLS handshake failure with OpenSSL's reason, rejection
  with its reason, abort) and whether trying again later may help (``transient``).

``PeerClient`` keeps one association open for a series of requests and opens a new
one when the peer dropped it.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext

from gateway.config import Settings
from gateway.dimse.tls import TLSConfigError, hardened_context
from gateway.peers import Peer

# A-ASSOCIATE-RJ reasons (PS3.8 9.3.4), for the messages.
_REJECT_REASONS = {
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognized",
    (1, 7): "called AE title not recognized",
    (2, 1): "no reason given",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded",
}


class AssociationFailed(RuntimeError):
    """An association to a peer could not be established.

    ``transient`` says whether the same request may succeed later without a change of
    configuration (refused connection, timeout, rejected-transient, abort); a
    permanent rejection or a certificate that does not verify needs an operator.
    """

    def __init__(self, peer: Peer, reason: str, *, transient: bool) -> None:
        super().__init__(f"{peer.ae_title} at {peer.host}:{peer.port}: {reason}")
        self.peer = peer
        self.reason = reason
        self.transient = transient


class _RecordingSocket(ssl.SSLSocket):
    """Keeps the handshake error on its context: pynetdicom only logs it."""

    def connect(self, addr: Any) -> None:
        try:
            super().connect(addr)
        except OSError as exc:
            self.context.handshake_error = exc  # type: ignore[attr-defined]
            raise


def client_context(settings: Settings, peer: Peer) -> ssl.SSLContext:
    """The TLS context for one outgoing association to ``peer`` (a new one each time,
    so the handshake error it records belongs to that association)."""
    ca_file = peer.tls_ca_file or (str(settings.tls_ca_file) if settings.tls_ca_file else "")
    if not ca_file:
        raise TLSConfigError(
            f"peer {peer.ae_title} uses TLS but no CA is configured to verify it "
            "(tls_ca_file, or `peers add --tls-ca-file`)"
        )
    ctx = hardened_context(ssl.PROTOCOL_TLS_CLIENT)
    ctx.sslsocket_class = _RecordingSocket
    ctx.handshake_error = None  # type: ignore[attr-defined]
    try:
        ctx.load_verify_locations(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise TLSConfigError(f"cannot load the CA file for {peer.ae_title}: {exc}") from exc
    cert = settings.tls_client_cert_file or settings.tls_cert_file
    key = settings.tls_client_key_file or settings.tls_key_file
    if cert is not None:
        try:
            ctx.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise TLSConfigError(f"cannot load our client certificate or key: {exc}") from exc
    return ctx


def tls_args(settings: Settings, peer: Peer) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom's ``tls_args`` for an association to ``peer`` (None: plain TCP)."""
    if not peer.tls:
        return None
    return client_context(settings, peer), peer.tls_server_name or peer.host


def configure(ae: AE, settings: Settings) -> AE:
    """Our AE's timeouts from the settings (also used by the serving AE, whose
    C-MOVE sub-operations are outgoing associations too)."""
    ae.acse_timeout = settings.acse_timeout
    ae.dimse_timeout = settings.dimse_timeout
    ae.network_timeout = settings.network_timeout
    ae.connection_timeout = settings.dimse_connect_timeout
    return ae


def destination(
    settings: Settings, peer: Peer, contexts: list[PresentationContext]
) -> tuple[str, int, dict[str, Any]]:
    """What a C-MOVE handler yields for pynetdicom to associate with ``peer``."""
    kwargs: dict[str, Any] = {"contexts": contexts}
    args = tls_args(settings, peer)
    if args is not None:
        kwargs["tls_args"] = args
    return peer.host, peer.port, kwargs


def associate(
    settings: Settings,
    peer: Peer,
    contexts: list[PresentationContext],
    *,
    ext_neg: list[Any] | None = None,
) -> Association:
    """An established association to ``peer``, or ``AssociationFailed``."""
    if not contexts:
        raise ValueError("an association needs at least one presentation context")
    try:
        args = tls_args(settings, peer)
    except TLSConfigError as exc:
        raise AssociationFailed(peer, str(exc), transient=False) from exc
    ae = configure(AE(ae_title=settings.ae_title), settings)
    connected: list[bool] = []
    assoc = ae.associate(
        peer.host,
        peer.port,
        contexts=contexts,
        ae_title=peer.ae_title,
        ext_neg=ext_neg,
        tls_args=args,
        evt_handlers=[(evt.EVT_CONN_OPEN, lambda _event: connected.append(True))],
    )
    if assoc.is_established:
        return assoc
    raise _failure(peer, assoc, args, settings, connected=bool(connected))


def _failure(
    peer: Peer,
    assoc: Association,
    args: tuple[ssl.SSLContext, str] | None,
    settings: Settings,
    *,
    connected: bool,
) -> AssociationFailed:
    if assoc.is_rejected:
        rsp = assoc.acceptor.primitive
        result = int(getattr(rsp, "result", 0) or 0)
        source = int(getattr(rsp, "result_source", 0) or 0)
        diagnostic = int(getattr(rsp, "diagnostic", 0) or 0)
        why = _REJECT_REASONS.get((source, diagnostic), f"source {source}, reason {diagnostic}")
        kind = "transient" if result == 2 else "permanent"
        return AssociationFailed(
            peer, f"association rejected ({kind}): {why}", transient=result == 2
        )
    if connected:
        return AssociationFailed(
            peer,
            "connected, but the association was aborted or not answered within "
            f"{settings.acse_timeout:g} s",
            transient=True,
        )
    if args is not None:
        error = getattr(args[0], "handshake_error", None)
        if isinstance(error, ssl.SSLCertVerificationError):
            return AssociationFailed(
                peer,
                f"TLS: the peer's certificate does not verify ({error.verify_message})",
                transient=False,
            )
        if isinstance(error, ssl.SSLError):
            return AssociationFailed(
                peer, f"TLS handshake failed ({error.reason or error})", transient=True
            )
        if error is not None:
            return AssociationFailed(peer, f"no connection ({error})", transient=True)
    return AssociationFailed(
        peer,
        "unreachable (connection refused, or not accepted within "
        f"{settings.dimse_connect_timeout:g} s)",
        transient=True,
    )


@dataclass
class PeerClient:
    """One association to a peer kept for a series of requests (census, pull)."""

    settings: Settings
    peer: Peer
    contexts: list[PresentationContext]
    _assoc: Association | None = None

    def association(self) -> Association:
        """The open association, or a new one (``AssociationFailed`` if none)."""
        if self._assoc is None or not self._assoc.is_established:
            self._assoc = None
            self._assoc = associate(self.settings, self.peer, self.contexts)
        return self._assoc

    def drop(self) -> None:
        """Forget an association that stopped answering (aborting it)."""
        if self._assoc is not None and self._assoc.is_established:
            self._assoc.abort()
        self._assoc = None

    def close(self) -> None:
        if self._assoc is not None and self._assoc.is_established:
            self._assoc.release()
        self._assoc = None

    def __enter__(self) -> PeerClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
