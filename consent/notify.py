"""Telling patients what happens to their shares: a notification adapter interface.

A site plugs in e-mail or SMS by implementing ``Notifier``; the default writes one
log line (never the token, never the access code).
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger("studybridge.notify")


@dataclass(frozen=True)
class LinkOpened:
    link_id: int
    owner_user_id: int
    at: dt.datetime
    client: str
    opened_by: str  # who exchanged it: "anonymous holder" or a staff member's name


class Notifier(Protocol):
    def link_opened(self, event: LinkOpened) -> None: ...


class LogNotifier:
    def link_opened(self, event: LinkOpened) -> None:
        log.info(
            "share link %d of user %d opened at %s from %s by %s",
            event.link_id,
            event.owner_user_id,
            event.at.isoformat(),
            event.client,
            event.opened_by,
        )
