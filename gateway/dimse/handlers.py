"""DIMSE event handlers: each turns one protocol request into archive calls.

- association requests: calling AE title must be a registered peer calling from its
  registered host (unless the demo profile accepts everyone);
- C-STORE: the data set pynetdicom streamed to a staging file goes to ``ingest`` as
  it is (no decoding, no re-encoding); success only once stored and indexed; a peer
  with an open closure transfer delivers into that transfer; an instance of a study
  that exists and is not visible to the sender's institution is refused (Not
  Authorized), decided once per study and association (``consent.access``);
- C-FIND: the identifier becomes a ``Query`` for the one query engine; answers are
  encoded in the requester's character set, or UTF-8 when a value does not fit;
- C-MOVE / C-GET: the request becomes a ``RetrieveRequest``; instances are sent as
  stored (see ``sending``). A C-MOVE sends a study only if the destination peer's
  institution may download it too (``Gate.check_delivery``, as forwarding does); the
  others are failed sub-operations, answered "Refused: Not Authorized" (0x0124).
"""

from __future__ import annotations

import logging
import threading
import uuid
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName
from pynetdicom import evt
from pynetdicom.events import Event

from consent.access import Gate, StudyAdmission
from consent.audit import Auditor
from consent.principals import DEMO, Operation, Principal, institution_disabled, peer_principal
from gateway.archive import Archive, Digests, Level, Query, RetrieveRequest, Source
from gateway.archive.charsets import response_character_set
from gateway.archive.errors import ArchiveError, IndexUnavailable, InvalidQuery
from gateway.dimse import client, status, tls
from gateway.dimse.sending import StoredRef, contexts_for
from gateway.ops import metrics
from gateway.ops.logs import request_id
from gateway.peers import PeerRegistry
from gateway.transfers.records import TransferBindings

log = logging.getLogger(__name__)

# Audit operation of the destination check (the caller's own is "download").
MOVE_OPERATION = "move"

PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
PATIENT_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.1.2"
PATIENT_ROOT_GET = "1.2.840.10008.5.1.4.1.2.1.3"
_PATIENT_ROOT = {PATIENT_ROOT_FIND, PATIENT_ROOT_MOVE, PATIENT_ROOT_GET}

# Identifier elements that steer the query rather than match.
_CONTROL_KEYWORDS = {"QueryRetrieveLevel", "SpecificCharacterSet", "TimezoneOffsetFromUTC"}


class Handlers:
    """Event handlers bound to one AE, sharing one archive and peer registry."""

    def __init__(self, archive: Archive, peers: PeerRegistry) -> None:
        self.archive = archive
        self.peers = peers
        self.settings = archive.settings
        # C-FIND, C-MOVE and C-GET see what the calling AE's institution may see
        # (consent.access); every attempt goes to this process's audit chain.
        auditor = Auditor(archive.db, window_seconds=self.settings.audit_window_seconds)
        auditor.start_flusher()
        self.gate = Gate(archive.db, auditor)
        self.transfers = TransferBindings(archive.db)
        # Per association (and institution it stores as): the studies it may add to.
        self._admissions: weakref.WeakKeyDictionary[Any, tuple[str, StudyAdmission]] = (
            weakref.WeakKeyDictionary()
        )
        self._admissions_lock = threading.Lock()

    def bindings(self) -> list[tuple[Any, Any]]:
        return [
            (evt.EVT_REQUESTED, self.on_requested),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_STORE, self.on_store),
            (evt.EVT_C_FIND, self.on_find),
            (evt.EVT_C_MOVE, self.on_move),
            (evt.EVT_C_GET, self.on_get),
        ]

    # -- association ---------------------------------------------------------------
    def on_requested(self, event: Event) -> None:
        # Every log line of this association (its own thread) carries one ID.
        request_id.set(f"assoc-{uuid.uuid4().hex[:16]}")
        # The requestor's AE title is filled in only after this event: read the request.
        calling = str(event.assoc.requestor.primitive.calling_ae_title or "").strip()
        address = event.assoc.requestor.address
        try:
            peer = self.peers.get(calling)
            disabled = peer is not None and institution_disabled(self.archive.db, peer.institution)
        except IndexUnavailable:
            # Fail closed but retryable: rejected-transient, temporary congestion.
            log.warning("refused association from %r: peer registry unavailable", calling)
            event.assoc.acse.send_reject(0x02, 0x03, 0x01)
            event.assoc.kill()
            return
        if peer is None:
            if self.settings.effective_accept_unknown_peers:
                metrics.ASSOCIATIONS.labels("accepted").inc()
                return
            log.warning("refused association from unregistered AE %r at %s", calling, address)
            self._reject(event)
            return
        if not self.peers.host_matches(peer, address):
            log.warning(
                "refused association: AE %r registered for host %s, called from %s",
                calling,
                peer.host,
                address,
            )
            self._reject(event)
            return
        if disabled:
            assert peer is not None
            log.warning(
                "refused association: AE %r belongs to disabled institution %r",
                calling,
                peer.institution,
            )
            self._reject(event)
            return
        cert = tls.peer_certificate(event.assoc)
        if cert is not None and not tls.certificate_names_host(cert, peer.host):
            log.warning(
                "refused association: AE %r's TLS certificate does not name its host %s",
                calling,
                peer.host,
            )
            self._reject(event)
            return
        metrics.ASSOCIATIONS.labels("accepted").inc()

    @staticmethod
    def _reject(event: Event) -> None:
        metrics.ASSOCIATIONS.labels("rejected").inc()
        # Rejected permanent, by the service user, calling AE title not recognised.
        event.assoc.acse.send_reject(0x01, 0x01, 0x03)
        event.assoc.kill()

    def _principal(self, event: Event) -> Principal:
        """The calling AE as a principal: its registered institution, or (accepted
        unknown peers) the demo principal in the demo profile and nobody otherwise."""
        calling = (event.assoc.requestor.ae_title or "").strip()
        peer = self.peers.get(calling)
        if peer is None:
            return (
                DEMO
                if self.settings.profile == "demo"
                else peer_principal(self.archive.db, calling, "")
            )
        return peer_principal(self.archive.db, peer.ae_title, peer.institution)

    def _permitted(self, event: Event, instances: list[Any]) -> list[Any]:
        """The instances of studies the caller may retrieve; the others are treated as
        not there (zero sub-operations), exactly like studies we do not hold."""
        allowed = self.gate.check(
            self._principal(event),
            Operation.DOWNLOAD,
            {inst.study_uid for inst in instances},
            door="dimse",
            client=str(event.assoc.requestor.address),
        )
        return [inst for inst in instances if inst.study_uid in allowed]

    def _source(self, assoc: Any) -> Source:
        ae_title = (assoc.requestor.ae_title or "").strip()
        peer = self.peers.get(ae_title)
        # A registered peer with an open closure transfer delivers into that transfer,
        # under the transfer's one Issuer of Patient ID.
        transfer = self.transfers.for_ae(ae_title) if peer is not None else None
        institution = transfer.institution if transfer else peer.institution if peer else ""
        host = str(assoc.requestor.address)
        return Source(
            door="dimse",
            ae_title=ae_title,
            host=host,
            institution=institution,
            issuer=transfer.issuer if transfer else peer.issuer if peer else "",
            transfer_id=transfer.id if transfer else None,
            admit=self._admission(assoc, ae_title, host, institution, known=peer is not None),
        )

    def _admission(
        self, assoc: Any, ae_title: str, host: str, institution: str, *, known: bool
    ) -> StudyAdmission:
        """The association's admission check for the institution it stores as (made
        once: the principal lookup and each study's decision are not repeated)."""
        held = self._admissions.get(assoc)
        if held is not None and held[0] == institution:
            return held[1]
        if not known and self.settings.profile == "demo":
            principal = DEMO
        else:
            principal = peer_principal(self.archive.db, ae_title, institution)
        admission = StudyAdmission(self.gate, principal, door="dimse", client=host)
        with self._admissions_lock:
            self._admissions[assoc] = (institution, admission)
        return admission

    # -- verification --------------------------------------------------------------
    @staticmethod
    def on_echo(event: Event) -> int:
        return status.SUCCESS

    # -- storage -------------------------------------------------------------------
    def on_store(self, event: Event) -> Dataset | int:
        try:
            path = event.dataset_path
        except AttributeError:
            return status.status_dataset(status.STORE_PROCESSING_FAILURE, "no data set received")
        code, comment = self.store_instance(path, event.assoc)
        return status.status_dataset(code, comment) if comment else code

    def store_instance(
        self, path: Path, assoc: Any, digests: Digests | None = None
    ) -> tuple[int, str]:
        """Ingest the staged data set at ``path`` (consumed): DIMSE status and comment.

        Used by pynetdicom's C-STORE event and by the storage data phase of
        ``receive.StorageReceiver`` (which hashed the file as it wrote it: ``digests``).
        The file is gone when this returns, whatever the outcome.
        """
        try:
            try:
                source = self._source(assoc)
            except BaseException:
                # Not handed to ingest (which consumes it): removed here.
                path.unlink(missing_ok=True)
                raise
            self.archive.ingest_file(path, source, owned=True, digests=digests)
        except ArchiveError as exc:
            log.info("C-STORE refused (%s): %s", exc.reason, exc)
            return status.store_failure_status(exc)
        except Exception as exc:
            log.exception("C-STORE failed unexpectedly")
            return status.store_failure_status(exc)
        return status.SUCCESS, ""

    # -- query ---------------------------------------------------------------------
    def on_find(self, event: Event) -> Iterator[tuple[int, Dataset | None]]:
        try:
            identifier = event.identifier
            query = self._query_from(identifier, event.request.AffectedSOPClassUID)
            query.study_scope = self.gate.search_scope(
                self._principal(event),
                door="dimse",
                client=str(event.assoc.requestor.address),
                detail=" ".join(f"{k}={v}" for k, v in query.keys.items() if v),
            )
            requested = identifier.get("SpecificCharacterSet")
            result = self.archive.query(query)
        except ArchiveError as exc:
            yield status.query_failure(exc).Status, None
            return
        except Exception as exc:
            log.exception("C-FIND failed")
            yield status.query_failure(exc).Status, None
            return
        for ds in result.datasets:
            if event.is_cancelled:
                yield status.CANCEL, None
                return
            ds.SpecificCharacterSet = response_character_set(ds, requested)
            ds.RetrieveAETitle = self.settings.ae_title
            yield status.PENDING, ds
        yield status.SUCCESS, None

    def _query_from(self, identifier: Dataset, sop_class: Any) -> Query:
        level = _level(identifier)
        keys: dict[str, str] = {}
        for elem in identifier:
            keyword = elem.keyword
            if not keyword or keyword in _CONTROL_KEYWORDS or elem.tag.group == 0x0002:
                continue
            keys[keyword] = _match_text(elem.value, elem.VR)
        return Query(
            level=level,
            keys=keys,
            patient_root=str(sop_class) in _PATIENT_ROOT,
            strict_levels=False,
        )

    # -- retrieve ------------------------------------------------------------------
    def _retrieve_request(self, identifier: Dataset, sop_class: Any) -> RetrieveRequest:
        level = _level(identifier)
        if level is Level.PATIENT and str(sop_class) not in _PATIENT_ROOT:
            raise _invalid("PATIENT level retrieve needs the Patient Root model")
        return RetrieveRequest(
            level=level,
            patient_ids=_uid_list(identifier, "PatientID"),
            issuer=str(identifier.get("IssuerOfPatientID", "") or "") or None,
            study_uids=_uid_list(identifier, "StudyInstanceUID"),
            series_uids=_uid_list(identifier, "SeriesInstanceUID"),
            sop_uids=_uid_list(identifier, "SOPInstanceUID"),
        )

    def on_move(self, event: Event) -> Iterator[Any]:
        destination = (event.move_destination or "").strip()
        peer = self.peers.get(destination)
        if peer is None:
            log.warning("C-MOVE to unknown destination %r refused", destination)
            yield None, None  # pynetdicom answers 0xA801 Move Destination unknown
            return
        try:
            request = self._retrieve_request(event.identifier, event.request.AffectedSOPClassUID)
            instances = self._permitted(event, self.archive.find_instances(request))
        except ArchiveError as exc:
            yield peer.host, peer.port
            yield status.query_failure(exc).Status, None
            return
        # The destination's institution must be allowed the study too (the rule
        # forwarding follows): otherwise the caller could hand it to anyone.
        deliverable = self.gate.check_delivery(
            self._principal(event),
            peer_principal(self.archive.db, peer.ae_title, peer.institution),
            {inst.study_uid for inst in instances},
            door="dimse",
            operation=MOVE_OPERATION,
            client=str(event.assoc.requestor.address),
        )
        sent = [inst for inst in instances if inst.study_uid in deliverable]
        refused = [inst for inst in instances if inst.study_uid not in deliverable]
        try:
            target = client.destination(self.settings, peer, contexts_for(sent or refused))
        except tls.TLSConfigError as exc:
            log.warning("C-MOVE to %s refused: %s", destination, exc)
            yield None, None  # answered as 0xA801: we cannot reach the destination
            return
        yield target
        yield len(instances)
        yield from self._send_each(event, sent)
        if refused:
            log.warning(
                "C-MOVE to %s: %d instance(s) of %d study(ies) refused, its institution "
                "may not receive them",
                destination,
                len(refused),
                len({inst.study_uid for inst in refused}),
            )
            failed = Dataset()
            failed.FailedSOPInstanceUIDList = [inst.sop_uid for inst in refused]
            comment = "destination's institution may not receive the study"
            yield status.status_dataset(status.MOVE_NOT_AUTHORIZED, comment), failed

    def on_get(self, event: Event) -> Iterator[Any]:
        try:
            request = self._retrieve_request(event.identifier, event.request.AffectedSOPClassUID)
            instances = self._permitted(event, self.archive.find_instances(request))
        except ArchiveError as exc:
            yield 0
            yield status.query_failure(exc).Status, None
            return
        yield len(instances)
        yield from self._send_each(event, instances)

    def _send_each(self, event: Event, instances: list[Any]) -> Iterator[Any]:
        store = self.archive.store
        for inst in instances:
            if event.is_cancelled:
                yield status.CANCEL, None
                return
            with store.local_path(inst.blob_key) as path:
                yield status.PENDING, StoredRef(path, inst)


def _invalid(message: str) -> ArchiveError:
    return InvalidQuery(message)


def _level(identifier: Dataset) -> Level:
    """The identifier's Query/Retrieve Level, or InvalidQuery."""
    text = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    try:
        return Level(text)
    except ValueError as exc:
        raise _invalid(f"Query/Retrieve Level {text[:16]!r} is not valid") from exc


def _match_text(value: Any, vr: str) -> str:
    """An identifier value as the matching string the query engine expects."""
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(_match_text(v, vr) for v in value)
    if isinstance(value, PersonName):
        return str(value)
    if vr == "SQ":
        return ""  # sequence matching is not supported: treated as a return key
    return str(value).strip()


def _uid_list(identifier: Dataset, keyword: str) -> list[str]:
    value = identifier.get(keyword)
    if value is None:
        return []
    if isinstance(value, MultiValue | list | tuple):
        return [str(v).strip() for v in value if str(v).strip()]
    text = str(value).strip()
    return [u for u in text.split("\\") if u] if text else []
