"""Presentation context negotiation that honours the requestor's preference.

pynetdicom, as acceptor, picks the first transfer syntax of *its own* list that the
requestor proposed. A sender lists the syntaxes of a context in its order of
preference, and its first choice is usually the syntax its data is already in, so
we accept in the requestor's order: data arrives as the sender holds it (stored
as received, no transcoding on either side), and C-GET results go out as stored
when the requestor accepts that.
"""

from __future__ import annotations

from typing import Any

from pynetdicom import acse
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor


def negotiate_in_requestor_order(
    rq_contexts: list[PresentationContext],
    ac_contexts: list[PresentationContext],
    roles: Any = None,
) -> tuple[list[PresentationContext], list[Any]]:
    supported = {cx.abstract_syntax: cx for cx in ac_contexts}
    results: list[PresentationContext] = []
    role_items: dict[str, Any] = {}
    ours = {cx.abstract_syntax: frozenset(cx.transfer_syntax) for cx in ac_contexts}
    for rq in rq_contexts:
        ac = supported.get(rq.abstract_syntax)
        # Offered to pynetdicom for this one context: when we do not support its
        # abstract syntax, one context of another (rejected, 0x03, as against all of
        # ours); else only the syntaxes both sides have, in the requestor's order
        # (none: rejected, 0x04). The others could not be chosen anyway, and building
        # a context validates each syntax it lists: all of ours for each of the ~120
        # contexts a storage sender may propose took ~100 ms per association.
        offered = ac_contexts[:1]
        if ac is not None:
            reordered = PresentationContext()
            reordered.abstract_syntax = ac.abstract_syntax
            reordered.transfer_syntax = [
                ts for ts in rq.transfer_syntax if ts in ours[ac.abstract_syntax]
            ]
            reordered.scu_role = ac.scu_role
            reordered.scp_role = ac.scp_role
            offered = [reordered]
        accepted, items = negotiate_as_acceptor([rq], offered, roles)
        results.extend(accepted)
        for item in items:
            role_items.setdefault(str(item.sop_class_uid), item)
    return results, list(role_items.values())


def install() -> None:
    """Use requestor-order negotiation for every association this process accepts."""
    acse.negotiate_as_acceptor = negotiate_in_requestor_order  # type: ignore[assignment]
