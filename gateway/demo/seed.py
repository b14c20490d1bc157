"""Seeding the demo: institutions, a closed clinic, patients, studies, accounts, a
consent, a DICOM peer and a share link; and refusing all of it in production.

Idempotent: each object is created once and recorded in ``demo_marks``; a second run
finds the marks and creates nothing again (instances have UIDs derived from names, so
even a half-finished first run is completed without duplicates). The one secret that
cannot be read back, the share link's token, is kept in ``<data_dir>/demo/share-link``
(mode 0600) so a second run prints the same link while it is usable.
"""

from __future__ import annotations

import datetime as dt
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyotp
from sqlalchemy import func, select

from consent import consents
from consent.accounts import enable_totp, set_password
from consent.audit import Auditor
from consent.links import LinkPolicy, LinkRules, create_link, describe
from consent.models import Institution, User
from consent.patients import link_patient
from consent.principals import Kind, Role, add_institution, add_user, user_principal
from gateway.archive import Archive, Source
from gateway.archive.models import Study, utcnow
from gateway.config import Settings
from gateway.demo import synthetic
from gateway.demo.models import DemoMark
from gateway.demo.synthetic import Person, StudyInfo
from gateway.peers import PeerRegistry
from gateway.transfers.records import create_transfer, set_status

PASSWORD = "studybridge-demo"  # noqa: S105 - every demo account's (the demo is public)
ACCESS_CODE = "2468"


class DemoRefused(RuntimeError):
    """The demo's data and a production configuration do not mix."""


@dataclass(frozen=True)
class DemoInstitution:
    name: str
    issuer: str
    description: str


NORTH = DemoInstitution("Seoul North Hospital (demo)", "DEMO-SNH", "서울북부병원 (demo)")
BUSAN = DemoInstitution("Busan Harbor Medical Center (demo)", "DEMO-BHMC", "부산항 의료원 (demo)")
CLINIC = DemoInstitution(
    "Hanbit Imaging Clinic (demo, closed)", "DEMO-HANBIT", "한빛영상의원: closed, archive moved"
)

KIM_NORTH = Person("SNH-1001", NORTH.issuer, "KIM^MINJUN=김^민준", "19780412", "M")
KIM_CLINIC = Person("HB-0077", CLINIC.issuer, "KIM^MINJUN=김^민준", "19780412", "M")
LEE = Person("SNH-1002", NORTH.issuer, "LEE^SEOYEON=이^서연", "19920105", "F")
SMITH = Person("BH-2002", BUSAN.issuer, "SMITH^JANE", "19850923", "F")

CT = StudyInfo("kim-ct", KIM_NORTH, NORTH.name, "20261120", "091500", "SNH26001", "CT CHEST")
MR = StudyInfo("lee-mr", LEE, NORTH.name, "20261102", "143000", "SNH26002", "MR BRAIN")
CR = StudyInfo("smith-cr", SMITH, BUSAN.name, "20261015", "101000", "BH26003", "XR CHEST PA")
OLD_CR = StudyInfo(
    "kim-clinic-cr", KIM_CLINIC, CLINIC.name, "20190305", "160000", "HB19077", "XR CHEST PA"
)


@dataclass(frozen=True)
class Account:
    username: str
    kind: Kind
    display: str
    institution: DemoInstitution | None = None
    role: Role | None = None

    @property
    def needs_code(self) -> bool:
        return self.kind in (Kind.STAFF, Kind.OPERATOR)


ACCOUNTS = (
    Account("minjun", Kind.PATIENT, "김민준 (patient)"),
    Account("jane", Kind.PATIENT, "Jane Smith (patient)"),
    Account("rad.north", Kind.STAFF, "Radiologist, Seoul North", NORTH, Role.RADIOLOGIST),
    Account("rad.busan", Kind.STAFF, "Radiologist, Busan Harbor", BUSAN, Role.RADIOLOGIST),
    Account("operator", Kind.OPERATOR, "Operator"),
)
PEER = ("BHMC_PACS", "127.0.0.1", 11113)  # Busan Harbor's PACS ("send to our PACS")


@dataclass
class Summary:
    """What a person needs to try the demo (printed by the CLI)."""

    base_url: str
    share_url: str = ""
    access_code: str = ACCESS_CODE
    accounts: list[tuple[Account, str]] = field(default_factory=list)  # (account, totp secret)
    studies: dict[str, str] = field(default_factory=dict)  # description -> Study UID
    created: int = 0  # objects created by this run (0 on a second run)

    def lines(self) -> list[str]:
        out = [
            "studybridge demo (synthetic data; never use these accounts for real patients)",
            f"  Portal (sign in):  {self.base_url}/viewer/signin",
            f"  Share link:        {self.share_url}",
            f"  Access code:       {self.access_code}",
            f"  Password of every demo account: {PASSWORD}",
        ]
        for account, secret in self.accounts:
            line = f"  {account.username:<10} {account.display}"
            if secret:
                line += f"; one-time codes: `studybridge demo --code {account.username}`"
            out.append(line)
        out.append(f"  Studies: {', '.join(self.studies)}")
        return out


def base_url(settings: Settings) -> str:
    """Where people reach this server (its public address when configured)."""
    if settings.public_base_url:
        return settings.public_base_url.rstrip("/")
    host = settings.http_host
    if host in ("", "0.0.0.0", "::"):  # noqa: S104 - listening everywhere: use loopback
        host = "127.0.0.1"
    scheme = "https" if settings.http_tls else "http"
    return f"{scheme}://{host}:{settings.http_port}"


# -- marks -------------------------------------------------------------------------------
def _marked(archive: Archive, kind: str, ref: str) -> bool:
    with archive.db.reading() as session:
        found = session.scalar(
            select(DemoMark.id).where(DemoMark.kind == kind, DemoMark.ref == ref)
        )
    return found is not None


def _mark(archive: Archive, kind: str, ref: str) -> None:
    with archive.db.writing() as session:
        session.add(DemoMark(kind=kind, ref=ref[:128]))


def demo_marks(archive: Archive) -> int:
    with archive.db.reading() as session:
        return int(session.scalar(select(func.count()).select_from(DemoMark)) or 0)


def refuse_in_production(settings: Settings, archive: Archive) -> None:
    """A production configuration does not run on a database the demo seeded."""
    if settings.profile == "production" and demo_marks(archive):
        raise DemoRefused(
            "this database holds the demo's synthetic data (demo_marks): a production "
            "configuration refuses it; use a fresh data folder and database"
        )


# -- seeding -----------------------------------------------------------------------------
def seed(
    settings: Settings,
    archive: Archive,
    *,
    ct_slices: int = 250,
    say: Callable[[str], None] = lambda _m: None,
) -> Summary:
    if settings.profile == "production":
        raise DemoRefused("the demo never seeds a production configuration")
    base = base_url(settings)
    summary = Summary(base_url=base)
    db = archive.db
    auditor = Auditor(db)
    try:
        for inst in (NORTH, BUSAN, CLINIC):
            if not _marked(archive, "institution", inst.name):
                add_institution(db, inst.name, issuer=inst.issuer, description=inst.description)
                _mark(archive, "institution", inst.name)
                summary.created += 1
        summary.created += _closed_clinic(archive, say, ct_slices)
        for info, series in _studies(ct_slices):
            if not _marked(archive, "study", info.study_uid):
                say(f"demo: {info.description} of {info.person.name.split('=')[0]}")
                _ingest(archive, Source(door="demo", institution=info.institution), series())
                _mark(archive, "study", info.study_uid)
                summary.created += 1
            summary.studies[f"{info.description} ({info.institution})"] = info.study_uid
        summary.studies[f"{OLD_CR.description} ({CLINIC.name})"] = OLD_CR.study_uid
        summary.created += _accounts(archive, auditor, summary)
        summary.created += _consent_and_peer(archive)
        summary.share_url = _share_link(settings, archive, base)
    finally:
        auditor.close()
    return summary


def _studies(ct_slices: int) -> list[tuple[StudyInfo, Callable[[], list]]]:
    return [
        (
            CT,
            lambda: (
                synthetic.chest_ct(CT, slices=ct_slices)
                + synthetic.text_report(
                    CT,
                    "A 9 mm solid nodule in the right upper lobe. No effusion.",
                    "Solitary pulmonary nodule; follow-up CT in 3 months.",
                )
                + synthetic.pdf_report(
                    CT,
                    "Referral letter",
                    [
                        "Seoul North Hospital (demo) - Department of Radiology",
                        "Patient: KIM MINJUN (synthetic demo patient)",
                        "Please review the chest CT of 2026-11-20 for a second opinion.",
                    ],
                )
            ),
        ),
        (MR, lambda: synthetic.brain_mr(MR)),
        (
            CR,
            lambda: (
                synthetic.chest_cr(CR)
                + synthetic.text_report(CR, "Lungs are clear.", "Normal chest radiograph.")
            ),
        ),
    ]


def _ingest(archive: Archive, source: Source, datasets: list) -> None:
    archive.settings.staging_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=archive.settings.staging_dir, prefix="demo-") as tmp:
        for n, ds in enumerate(datasets):
            path = Path(tmp) / f"{n:05d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            archive.ingest_file(path, source, owned=True)


def _closed_clinic(archive: Archive, say: Callable[[str], None], ct_slices: int) -> int:
    """The clinic closed and handed its archive over: a closure transfer, its images
    ingested under it, and the clinic's accounts disabled."""
    if _marked(archive, "transfer", CLINIC.name):
        return 0
    db = archive.db
    transfer = create_transfer(
        db,
        institution=CLINIC.name,
        reason="closure",
        issuer=CLINIC.issuer,
        effective_on=dt.date(2025, 12, 31),
        custodian_name="Dr. Park Hanbit (demo)",
        custodian_contact="custodian@hanbit.example",
        notes="Demo: the clinic's archive was handed over when it closed.",
    )
    say(f"demo: closure transfer {transfer.id} of {CLINIC.name}")
    source = Source(
        door="demo", institution=CLINIC.name, issuer=CLINIC.issuer, transfer_id=transfer.id
    )
    _ingest(archive, source, synthetic.chest_cr(OLD_CR))
    set_status(db, transfer.id, "complete", finalized=True)
    with db.writing() as session:
        inst = session.scalar(select(Institution).where(Institution.name == CLINIC.name))
        if inst is not None and inst.disabled_at is None:
            inst.disabled_at = utcnow()
    _mark(archive, "transfer", CLINIC.name)
    _mark(archive, "study", OLD_CR.study_uid)
    return 2


def _accounts(archive: Archive, auditor: Auditor, summary: Summary) -> int:
    db = archive.db
    created = 0
    for account in ACCOUNTS:
        if not _marked(archive, "user", account.username):
            add_user(
                db,
                account.username,
                account.kind,
                display_name=account.display,
                institution=account.institution.name if account.institution else None,
                role=account.role,
            )
            set_password(db, account.username, PASSWORD)
            if account.needs_code:
                enable_totp(db, account.username, issuer="studybridge demo")
            _mark(archive, "user", account.username)
            created += 1
        summary.accounts.append((account, totp_secret(archive, account.username)))
    operator = user_principal(db, _user_id(archive, "operator"))
    assert operator is not None
    for username, person in (("minjun", KIM_NORTH), ("minjun", KIM_CLINIC), ("jane", SMITH)):
        ref = f"{username}:{person.issuer}:{person.patient_id}"
        if _marked(archive, "patient-link", ref):
            continue
        link_patient(
            db,
            auditor,
            account_id=_user_id(archive, username),
            issuer=person.issuer,
            patient_id=person.patient_id,
            by=operator,
            evidence="demo: synthetic patient, no identity check",
        )
        _mark(archive, "patient-link", ref)
        created += 1
    return created


def _consent_and_peer(archive: Archive) -> int:
    created = 0
    if not _marked(archive, "consent", f"minjun:{BUSAN.name}"):
        patient = user_principal(archive.db, _user_id(archive, "minjun"))
        assert patient is not None
        consents.grant(
            archive.db, patient, institution=BUSAN.name, purpose="TREAT", study_uids=[CT.study_uid]
        )
        _mark(archive, "consent", f"minjun:{BUSAN.name}")
        created += 1
    if not _marked(archive, "peer", PEER[0]):
        ae, host, port = PEER
        PeerRegistry(archive.db).add(
            ae, host, port, institution=BUSAN.name, description="Busan Harbor PACS (demo)"
        )
        _mark(archive, "peer", ae)
        created += 1
    return created


def _share_link(settings: Settings, archive: Archive, base: str) -> str:
    """Kim's chest CT shared with an access code, download allowed (one such link)."""
    stored = settings.data_dir / "demo" / "share-link"
    token = stored.read_text().strip() if stored.exists() else ""
    if not token or (info := describe(archive.db, token)) is None or info.status != "usable":
        patient = user_principal(archive.db, _user_id(archive, "minjun"))
        assert patient is not None
        link_id, token = create_link(
            archive.db,
            patient,
            [CT.study_uid],
            LinkRules(
                can_download=True,
                access_code=ACCESS_CODE,
                label="Chest CT for a second opinion (demo)",
            ),
            LinkPolicy.from_settings(settings),
        )
        _mark(archive, "link", str(link_id))
        stored.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(stored, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(token + "\n")
    return f"{base}/viewer/share#{token}"


def _user_id(archive: Archive, username: str) -> int:
    with archive.db.reading() as session:
        found = session.scalar(select(User.id).where(User.username == username))
    if found is None:
        raise DemoRefused(f"the demo account {username} is missing")
    return int(found)


def totp_secret(archive: Archive, username: str) -> str:
    with archive.db.reading() as session:
        return session.scalar(select(User.totp_secret).where(User.username == username)) or ""


def current_code(archive: Archive, username: str) -> str:
    """The current one-time code of a demo account (the demo prints it on request)."""
    if not _marked(archive, "user", username):
        raise DemoRefused(f"{username} is not a demo account")
    secret = totp_secret(archive, username)
    if not secret:
        raise DemoRefused(f"{username} signs in without a one-time code")
    return pyotp.TOTP(secret).now()


def study_count(archive: Archive) -> int:
    with archive.db.reading() as session:
        return int(session.scalar(select(func.count()).select_from(Study)) or 0)
