"""Presentation context negotiation in the requestor's order (gateway.dimse.negotiation)."""

from __future__ import annotations

import pytest
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import _STORAGE_CLASSES

from gateway.config import Settings
from gateway.dimse.negotiation import negotiate_in_requestor_order
from gateway.dimse.server import build_ae

pytestmark = pytest.mark.fast

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"


@pytest.fixture(scope="module")
def supported() -> list[PresentationContext]:
    return build_ae(Settings()).supported_contexts


def _proposed(*items: tuple[str, list[str]]) -> list[PresentationContext]:
    contexts = []
    for n, (abstract, syntaxes) in enumerate(items):
        cx = build_context(abstract, syntaxes)
        cx.context_id = 2 * n + 1
        contexts.append(cx)
    return contexts


def test_the_requestors_first_common_syntax_is_accepted(supported):
    accepted, _roles = negotiate_in_requestor_order(
        _proposed((CT, [JPEG_BASELINE, IMPLICIT]), (MR, ["1.2.3.999", IMPLICIT, EXPLICIT])),
        supported,
    )
    assert [(cx.context_id, cx.result, cx.transfer_syntax) for cx in accepted] == [
        (1, 0x00, [JPEG_BASELINE]),
        (3, 0x00, [IMPLICIT]),
    ]
    assert all(cx.as_scp and not cx.as_scu for cx in accepted)


def test_unknown_abstract_and_unknown_syntaxes_are_rejected_with_their_reasons(supported):
    accepted, _roles = negotiate_in_requestor_order(
        _proposed(("1.2.3.4", [EXPLICIT]), (CT, ["1.2.3.999"]), (MR, [EXPLICIT])), supported
    )
    assert [(cx.context_id, cx.result) for cx in accepted] == [(1, 0x03), (3, 0x04), (5, 0x00)]
    assert not any(cx.as_scp or cx.as_scu for cx in accepted[:2])


def test_role_selection_is_answered_for_the_accepted_context(supported):
    accepted, roles = negotiate_in_requestor_order(
        _proposed((MR, [EXPLICIT])), supported, {MR: (True, True)}
    )
    assert accepted[0].result == 0x00 and accepted[0].as_scu and accepted[0].as_scp
    assert [(str(r.sop_class_uid), r.scu_role, r.scp_role) for r in roles] == [(MR, True, True)]


def test_a_sender_proposing_every_storage_class_gets_each_its_first_syntax(supported):
    # What dcmtk's storescu proposes without -R: ~120 contexts, several syntaxes each.
    classes = sorted(str(uid) for uid in _STORAGE_CLASSES.values())[:120]
    proposed = _proposed(*[(uid, [IMPLICIT, EXPLICIT, JPEG_BASELINE]) for uid in classes])
    accepted, _roles = negotiate_in_requestor_order(proposed, supported)
    assert len(accepted) == 120
    assert {(cx.result, cx.transfer_syntax[0]) for cx in accepted} == {(0x00, IMPLICIT)}
    assert [str(cx.abstract_syntax) for cx in accepted] == classes
