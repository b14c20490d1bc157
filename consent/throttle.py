"""Throttling of guessed secrets: failures counted per subject and per client address.

One mechanism for every secret a caller can guess: a share link's access code
(subject: the link), a local account's password (subject: the user name) and a
DICOMweb client's secret (subject: the client id). After ``max_failures`` failures
for one subject, or ``max_failures_per_client`` from one address, within ``window``,
the next attempts are refused before the secret is even checked (so a right secret
during a lockout is refused too) until enough failures have aged out of the window;
``retry_after`` says how long that is. Failures are rows (``auth_failures``), so
every gateway process sees the same counts.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass

from sqlalchemy import select

from consent.models import AuthFailure
from gateway.archive.db import Database
from gateway.archive.models import utcnow

ACCESS_CODE = "access-code"
SIGN_IN = "sign-in"  # a local account's password (and TOTP code)
CLIENT_CREDENTIALS = "client-creds"  # a DICOMweb client's secret


@dataclass(frozen=True)
class Standing:
    locked_by: str | None  # "subject", "client", or None while attempts are open
    retry_after: int  # seconds, while locked
    remaining: int  # failures left before a lockout, while open


@dataclass(frozen=True)
class Throttle:
    kind: str
    max_failures: int
    max_failures_per_client: int
    window: dt.timedelta

    def standing(
        self, db: Database, subject: str, client: str, now: dt.datetime | None = None
    ) -> Standing:
        """Whether ``subject`` or ``client`` is locked out, for how long, and how many
        failures are left before it is."""
        now = now or utcnow()
        since = now - self.window
        subject, client = subject[:128], client[:64]
        with db.reading() as session:
            base = select(AuthFailure.at).where(
                AuthFailure.kind == self.kind, AuthFailure.at > since
            )
            by_subject = session.scalars(
                base.where(AuthFailure.subject == subject).order_by(AuthFailure.at)
            ).all()
            by_client = session.scalars(
                base.where(AuthFailure.client == client).order_by(AuthFailure.at)
            ).all()
        remaining = min(
            self.max_failures - len(by_subject), self.max_failures_per_client - len(by_client)
        )
        for what, times, limit in (
            ("subject", by_subject, self.max_failures),
            ("client", by_client, self.max_failures_per_client),
        ):
            if len(times) >= limit:
                # Open again once all but limit - 1 of them have aged out.
                ends = times[len(times) - limit] + self.window
                seconds = max(1, math.ceil((ends - now).total_seconds()))
                return Standing(what, seconds, 0)
        return Standing(None, 0, remaining)

    def retry_after(
        self, db: Database, subject: str, client: str, now: dt.datetime | None = None
    ) -> tuple[str, int] | None:
        """None while attempts are open; otherwise what is locked (``subject`` or
        ``client``) and the seconds until the next attempt may be made."""
        got = self.standing(db, subject, client, now)
        return (got.locked_by, got.retry_after) if got.locked_by else None

    def failed(
        self, db: Database, subject: str, client: str, now: dt.datetime | None = None
    ) -> None:
        with db.writing() as session:
            session.add(
                AuthFailure(
                    kind=self.kind, subject=subject[:128], client=client[:64], at=now or utcnow()
                )
            )
