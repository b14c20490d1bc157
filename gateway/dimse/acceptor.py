"""Associations we accept: pynetdicom negotiates, storage-only ones then go fast.

``Acceptor`` is pynetdicom's ``Association`` with three changes (written against
pynetdicom 3.0, pinned in ``pyproject.toml``):

1. While waiting for the A-ASSOCIATE-RQ it notices a connection that closed (a port
   probe, a client that gave up) or a shutdown, instead of sleeping the whole ACSE
   timeout in pynetdicom's queue wait: such a connection no longer counts as an
   active association, so it neither holds a slot nor delays shutdown.
2. Once an association whose accepted contexts are all storage SOP classes (or
   Verification) is established, its DUL thread stops reading after sending the
   A-ASSOCIATE-AC, and the association's own thread serves the data phase with
   ``receive.StorageReceiver``: blocking reads of whole PDUs, data sets written
   straight to the staging file (see that module for why). Any other association
   (query, retrieve, mixed) runs on pynetdicom's reactor as before.
3. ``request_stop`` (server shutdown): an association still negotiating is dropped,
   one between messages is aborted at once, one in the middle of a message finishes
   that message (answered) and is then aborted.
"""

from __future__ import annotations

import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from pynetdicom import evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.sop_class import _STORAGE_CLASSES
from pynetdicom.transport import AssociationSocket, RequestHandler

from gateway.archive import Digests
from gateway.dimse.receive import VERIFICATION, StorageReceiver, StoreResult

_STORAGE = frozenset(str(uid) for uid in _STORAGE_CLASSES.values())
_WAIT_SLICE = 0.1  # seconds between checks while waiting for the association request
# The DUL's states from the accepted A-ASSOCIATE-RQ to the data phase: Sta3 (our
# response queued, not yet sent) and Sta6 (established).
_NEGOTIATED = ("Sta3", "Sta6")


def storage_only(contexts: dict[int, Any]) -> bool:
    """Whether every accepted context is one we serve as storage SCP (or Verification)."""
    if not contexts:
        return False
    for cx in contexts.values():
        uid = str(cx.abstract_syntax)
        if uid == VERIFICATION:
            continue
        if uid not in _STORAGE or not cx.as_scp:
            return False
    return True


class _DUL(DULServiceProvider):
    def _is_transport_event(self) -> bool:
        if self.state_machine.current_state == "Sta6" and self.assoc.fast_data_phase:
            # The association thread reads the socket from now on: stop this thread
            # before it reads anything of the data phase.
            self._kill_thread = True
            return False
        return super()._is_transport_event()


class Acceptor(Association):
    """An acceptor association (see the module docstring)."""

    def __init__(self, ae: Any, mode: str) -> None:
        super().__init__(ae, mode)
        self.dul = _DUL(self)
        # The timeout setters configure the DUL's ARTIM and idle timers: apply them
        # to the replacement DUL.
        self.acse_timeout = self.acse_timeout
        self.network_timeout = self.network_timeout
        self._fast: bool | None = None
        self._receiver: StorageReceiver | None = None
        self._stop_requested = False
        self._serving = False
        self._connection_closed = False
        self.bind(evt.EVT_CONN_CLOSE, self._on_connection_closed)

    def _on_connection_closed(self, _event: Any) -> None:
        self._connection_closed = True

    @property
    def fast_data_phase(self) -> bool:
        """Whether the data phase is ours (decided once, from the accepted contexts)."""
        if self._fast is None:
            store = getattr(self._server, "store_instance", None)
            self._fast = store is not None and storage_only(self._accepted_cx)
        return self._fast

    # -- association thread ----------------------------------------------------------
    def run_reactor(self) -> None:
        if not self.is_acceptor:
            super().run_reactor()
            return
        if not self._started_dul:
            self.dul.start()
            self._started_dul = True
            self._dul_ready.wait()
        primitive = self._wait_for_request()
        if primitive is not None:
            self.requestor.primitive = primitive
            evt.trigger(self, evt.EVT_REQUESTED, {})
            # A handler may have rejected or aborted in EVT_REQUESTED.
            if not self.is_aborted and not self.is_rejected:
                self.acse.negotiate_association()
            if self.is_established:
                self._run_reactor()
        else:
            if self.dul.state_machine.current_state != "Sta1":
                # Still connected: let the DUL close the connection its own way (as
                # when the ARTIM timer expires), so that kill() finds it idle.
                self.dul.artim_timer.timeout = 0
            self.kill()
        sock = self.dul.socket
        if self._server is not None and sock is not None and sock.socket is not None:
            self._server.shutdown_request(sock.socket)

    def _wait_for_request(self) -> Any:
        """The A-ASSOCIATE-RQ primitive, or None (timeout, closed, shutting down)."""
        timeout = self.acse_timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            primitive = self.dul.receive_pdu(wait=True, timeout=_WAIT_SLICE)
            if primitive is not None:
                return primitive
            if self._stop_requested or self._connection_closed or not self.dul.is_alive():
                return None
            if deadline is not None and time.monotonic() > deadline:
                return None

    def _run_reactor(self) -> None:
        if self.fast_data_phase and self._handed_over():
            self._serve_storage()
        else:
            super()._run_reactor()

    def _handed_over(self) -> bool:
        """Wait for the DUL thread to stop at the start of the data phase.

        ``negotiate_association`` only queues the A-ASSOCIATE-AC: the DUL thread
        sends it and enters Sta6 when it next runs, which on a busy machine can be
        well after this thread gets here. Until then it is in Sta3, and waiting is
        right: giving up there would leave pynetdicom's reactor to find the DUL
        thread stopped (it stops itself in Sta6) and drop the connection silently.
        """
        while self.dul.is_alive():
            self.dul.join(_WAIT_SLICE)
            if self.dul.state_machine.current_state not in _NEGOTIATED:
                return False  # it is handling something else (an abort): its reactor runs
        return (
            self.dul.state_machine.current_state == "Sta6"
            and self.dul.event_queue.empty()
            and not self.dul.to_provider_queue.queue
        )

    def _serve_storage(self) -> None:
        sock = self.dul.socket
        assert sock is not None and sock.socket is not None
        receiver = StorageReceiver(
            sock.socket,
            self._accepted_cx,
            self._store,
            staging_dir=Path(tempfile.gettempdir()),
            network_timeout=self.network_timeout,
            peer_max_pdu=int(self.requestor.maximum_length or 0),
        )
        self._receiver = receiver
        if self._stop_requested:
            receiver.request_stop()
        receiver.run()
        self.is_established = False
        if receiver.outcome == "released":
            self.is_released = True
            evt.trigger(self, evt.EVT_RELEASED, {})
        else:
            self.is_aborted = True
            evt.trigger(self, evt.EVT_ABORTED, {})
        self.dul.state_machine.current_state = "Sta1"
        self.kill()

    def _store(self, path: Path, digests: Digests) -> StoreResult:
        return self._server.store_instance(path, self, digests)  # type: ignore[union-attr]

    def _serve_request(self, msg: Any, context_id: int) -> None:
        self._serving = True
        try:
            super()._serve_request(msg, context_id)
        finally:
            self._serving = False
            # pynetdicom's idle timer runs from the last PDU received, so a request
            # that took longer than network_timeout to serve (a loaded machine, a
            # slow flush) would abort the association as soon as it was answered.
            # The timeout is for a silent peer: count from our answer instead.
            self.dul._idle_timer.restart()
        if self._stop_requested and self.is_established:
            self.abort()

    # -- other threads ---------------------------------------------------------------
    def request_stop(self) -> None:
        """Shutdown: end this association as soon as it holds no unfinished message."""
        self._stop_requested = True
        receiver = self._receiver
        if receiver is not None:
            receiver.request_stop()
        elif self.is_established and not self._serving and self.dimse.message is None:
            self.abort()
        # Still negotiating: _wait_for_request returns within _WAIT_SLICE.


class AcceptorHandler(RequestHandler):
    """pynetdicom's request handler, creating ``Acceptor`` associations.

    Mirrors ``RequestHandler._create_association`` of pynetdicom 3.0 with our class.
    """

    def _create_association(self) -> Association:
        server = self.server
        assoc = Acceptor(self.ae, MODE_ACCEPTOR)
        assoc._server = server
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
        assoc.set_socket(AssociationSocket(assoc, client_socket=self.request))
        acceptor = assoc.acceptor
        acceptor.maximum_length = self.ae.maximum_pdu_size
        acceptor.ae_title = server.ae_title
        acceptor.address_info = self.local
        acceptor.implementation_class_uid = self.ae.implementation_class_uid
        acceptor.implementation_version_name = self.ae.implementation_version_name
        # Negotiation only reads the supported contexts: no per-association copy.
        acceptor.supported_contexts = list(server.contexts)
        assoc.requestor.address_info = self.remote
        for event in server._handlers:
            if event.is_intervention and server._handlers[event]:
                assoc.bind(event, *server._handlers[event])
            elif isinstance(event, evt.NotificationEvent):
                for handler in server._handlers[event]:
                    assoc.bind(event, handler[0], handler[1])
        return assoc
