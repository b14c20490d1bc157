"""Who may forward what: forwarding a study is downloading it into another PACS.

So two principals must be permitted ``download`` of the study by the one access
decision (``consent.access``):

- the principal asking (a staff member of an institution that sent it or holds a
  consent for it; an operator only under break-glass; the demo principal);
- the destination peer, as the DIMSE door would see it (``peer_principal``: its
  registered institution, with that institution's consents): the study must be one
  the receiving institution may get anyway (``Gate.check_delivery``, the same rule
  a C-MOVE destination is held to). A peer without an institution gets nothing.

Every decision is audited (operation ``forward``, the destination in the detail).
A study the asker may not download is answered like one that does not exist.
Hand-back of a suspension (``transfers.handback``) is a custodial operator action
with its own audit record, not a forward by this rule.
"""

from __future__ import annotations

from consent.access import Gate, permitted_studies
from consent.audit import Attempt, Auditor
from consent.principals import Operation, Principal, peer_principal
from gateway.archive.db import Database
from gateway.forward.jobs import ForwardError
from gateway.peers import Peer, PeerRegistry

FORWARD_OPERATION = "forward"


class ForwardDenied(ForwardError):
    """The asker, or the destination, may not have this study."""


def authorize_forward(
    db: Database,
    auditor: Auditor,
    principal: Principal,
    study_uid: str,
    peer_ae: str,
    *,
    door: str,
    client: str = "",
) -> Peer:
    """The destination peer, once forwarding ``study_uid`` to it is permitted and
    audited; ``ForwardDenied`` (audited too) otherwise."""
    peer = PeerRegistry(db).get(peer_ae)
    if peer is None:
        raise ForwardError(f"no peer {peer_ae}: register it with `studybridge peers add`")
    if study_uid not in permitted_studies(db, principal, Operation.DOWNLOAD, [study_uid]):
        reason = f"no such study: {study_uid}"
        auditor.record(
            Attempt(
                principal=principal,
                door=door,
                operation=FORWARD_OPERATION,
                outcome="denied",
                study_uid=study_uid,
                client=client,
                detail=f"to {peer.ae_title} ({peer.institution or 'no institution'}): {reason}",
            )
        )
        raise ForwardDenied(reason)
    receiver = peer_principal(db, peer.ae_title, peer.institution)
    if not Gate(db, auditor).check_delivery(
        principal, receiver, [study_uid], door=door, operation=FORWARD_OPERATION, client=client
    ):
        raise ForwardDenied(
            f"{peer.ae_title}'s institution ({peer.institution or 'none registered'}) "
            "may not receive this study (no consent or share for it)"
        )
    return peer
