"""One receiving process of the DICOM node.

pynetdicom serves each association in a Python thread under one GIL, so
``studybridge serve`` starts several of these processes on the same port. The
supervisor binds the listening socket once and every process accepts from it, the
least busy one first (``balance``). A process started on its own (``run_worker``
without a listening socket, as in tests) binds with ``SO_REUSEPORT`` instead.
pynetdicom negotiates every association; the data phase of storage-only
associations is served by ``receive.StorageReceiver`` (see ``acceptor``), the rest
by pynetdicom. Incoming data sets stream to a staging file, never into memory, and
that file becomes the blob by a rename.
"""

from __future__ import annotations

import logging
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, _config
from pynetdicom.sop_class import (
    _STORAGE_CLASSES,
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StorageCommitmentPushModel,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from gateway.archive import Archive
from gateway.config import Settings
from gateway.dimse import client, fastpath, negotiation, tls
from gateway.dimse.acceptor import Acceptor, AcceptorHandler
from gateway.dimse.balance import AcceptBalance
from gateway.dimse.commitment import CommitmentSCP
from gateway.dimse.handlers import Handlers
from gateway.peers import PeerRegistry
from gateway.runtime import configure_serving_process, freeze_startup_heap

log = logging.getLogger(__name__)

_QR_MODELS = [
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelMove,
    PatientRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelGet,
]


def configure_pynetdicom() -> None:
    """Process-wide pynetdicom settings for a receiving process."""
    # Stream incoming data sets to files instead of memory.
    _config.STORE_RECV_CHUNKED_DATASET = True
    # pynetdicom's standard handlers format every PDU for the log: costly, and the
    # identifiers they log would put patient data in our logs.
    _config.LOG_HANDLER_LEVEL = "none"
    _config.LOG_REQUEST_IDENTIFIERS = False
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    configure_serving_process()
    negotiation.install()
    fastpath.install()


class ReusePortServer(ThreadedAssociationServer):
    """An association server whose port several processes can bind at once.

    Its associations are ``acceptor.Acceptor``s; ``store_instance`` (set by
    ``make_server``) is what their storage data phase calls for each instance.
    """

    store_instance: Callable[[Path, Any, Any], tuple[int, str]] | None = None

    def __init__(
        self,
        *args: Any,
        listener: socket.socket | None = None,
        balance: AcceptBalance | None = None,
        **kwargs: Any,
    ) -> None:
        # A listening socket shared with the other receiving processes (made by
        # ``serve``), and this process's share of the accepting; None: bind our own
        # socket with SO_REUSEPORT.
        self.listener = listener
        self.balance = balance
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        if self.listener is not None:
            self.socket.close()
            self.socket = self.listener
            # Non-blocking: when another process wins the race for a connection,
            # accept() fails at once (socketserver ignores the error) instead of
            # blocking this process's accept loop until the next connection.
            self.socket.setblocking(False)
            self.server_address = self.socket.getsockname()
            return
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().server_bind()

    def server_activate(self) -> None:
        if self.listener is None:  # a shared socket is listening already
            super().server_activate()

    def get_request(self) -> Any:
        if self.balance is None:
            return super().get_request()
        self.balance.wait()
        request, address = super().get_request()
        self.balance.opened(request)
        return request, address

    def shutdown_request(self, request: Any) -> None:
        if self.balance is not None:
            self.balance.closed(request)
        super().shutdown_request(request)

    def process_request(self, request: Any, client_address: Any) -> None:
        # Small C-STORE responses must not wait for Nagle's algorithm.
        try:
            sock = request if isinstance(request, socket.socket) else None
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        super().process_request(request, client_address)


def build_ae(settings: Settings) -> AE:
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_associations = settings.max_associations
    ae.maximum_pdu_size = settings.max_pdu_size
    # Its timeouts also govern the associations of C-MOVE sub-operations.
    client.configure(ae, settings)
    ae.require_called_aet = False
    ae.add_supported_context(Verification)
    for uid in _STORAGE_CLASSES.values():
        # Accept either role the requestor proposes: SCU when it stores to us, SCP
        # when it receives C-GET results over its own association.
        ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES, scu_role=True, scp_role=True)
    for model in _QR_MODELS:
        ae.add_supported_context(model)
    ae.add_supported_context(StorageCommitmentPushModel)
    return ae


class TLSReusePortServer(tls.TLSServerMixin, ReusePortServer):
    """The DICOM TLS port: handshakes in each association's thread (``tls``)."""


def make_server(
    settings: Settings,
    archive: Archive,
    *,
    port: int | None = None,
    ssl_context: Any = None,
    listener: socket.socket | None = None,
    balance: AcceptBalance | None = None,
) -> ReusePortServer:
    """The association server on the DIMSE port, or (with ``ssl_context``) the TLS one;
    on ``listener`` when given (a socket the receiving processes share, accepted
    from as ``balance`` says)."""
    ae = build_ae(settings)
    peers = PeerRegistry(archive.db)
    handlers = Handlers(archive, peers)
    commitment = CommitmentSCP(settings, archive.db, peers)
    server = ae.make_server(
        (settings.dimse_host, port or settings.dimse_port),
        evt_handlers=handlers.bindings() + commitment.bindings(),
        server_class=ReusePortServer if ssl_context is None else TLSReusePortServer,
        request_handler=AcceptorHandler,
        ssl_context=ssl_context,
        listener=listener,
        balance=balance if listener is not None else None,
    )
    server.store_instance = handlers.store_instance  # type: ignore[attr-defined]
    if ssl_context is not None:
        server.handshake_timeout = settings.acse_timeout  # type: ignore[attr-defined]
    # AE.start_server registers its servers; make_server does not, but shutdown expects it.
    ae._servers.append(server)
    return server  # type: ignore[return-value]


def run_worker(
    settings: Settings,
    index: int,
    ready: Any = None,
    listeners: dict[str, socket.socket] | None = None,
    counts: Any = None,
) -> None:
    """Entry point of one receiving process: serve until SIGTERM, then drain.

    ``listeners`` ("dimse", "dimse-tls") are listening sockets shared by the
    receiving processes of ``serve`` and ``counts`` their connection counts (one slot
    each, ``balance``); without them this process binds its own sockets."""
    listeners = listeners or {}
    # An error escaping an association's thread would otherwise only reach stderr.
    threading.excepthook = _log_thread_error
    balance = AcceptBalance(counts, index) if listeners and counts is not None else None
    configure_pynetdicom()
    settings.staging_dir.mkdir(parents=True, exist_ok=True)
    # pynetdicom's chunked receive writes to tempfile's folder: keep it beside the
    # blobs so that storing is a rename on the same filesystem.
    tempfile.tempdir = str(settings.staging_dir)
    archive = Archive.open(settings, post_ingest=True)
    servers = [make_server(settings, archive, listener=listeners.get("dimse"), balance=balance)]
    if settings.dimse_tls_port:
        context = tls.server_context(settings)
        servers.append(
            make_server(
                settings,
                archive,
                port=settings.dimse_tls_port,
                ssl_context=context,
                listener=listeners.get("dimse-tls"),
                balance=balance,
            )
        )
    freeze_startup_heap()
    stop = threading.Event()

    def _on_signal(_signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    for server in servers:
        threading.Thread(target=server.serve_forever, name="dimse-accept", daemon=True).start()
        log.info("DIMSE worker %d listening on %s:%d", index, *server.server_address[:2])
    if ready is not None:
        ready.set()
    stop.wait()
    drain(servers, settings.shutdown_grace)
    archive.close()


def _log_thread_error(args: threading.ExceptHookArgs) -> None:
    if issubclass(args.exc_type, SystemExit):
        return
    name = args.thread.name if args.thread is not None else "?"
    log.error(
        "unhandled error in thread %s",
        name,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),  # type: ignore[arg-type]
    )


def drain(servers: list[ReusePortServer], grace: float) -> None:
    """Stop accepting; let messages in progress finish (bounded by ``grace``), then
    end every association: idle or still-negotiating ones at once."""
    for server in servers:
        server.shutdown()
        for assoc in server.active_associations:
            if isinstance(assoc, Acceptor):
                assoc.request_stop()
    deadline = time.monotonic() + grace
    while any(s.active_associations for s in servers) and time.monotonic() < deadline:
        time.sleep(0.02)
    for server in servers:
        for assoc in server.active_associations:
            assoc.abort()
