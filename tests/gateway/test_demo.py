"""The demo: what it seeds, that a second run adds nothing, that production refuses it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from consent.access import permitted_studies
from consent.links import LinkPolicy, exchange
from consent.models import Institution, User
from consent.principals import Kind, Operation, user_principal
from gateway.archive import Archive, Level, RetrieveRequest
from gateway.archive.models import Patient
from gateway.config import Settings
from gateway.demo import seed as demo
from gateway.demo.synthetic import DEMO_COMMENT, one_page_pdf
from gateway.serve import refuse_demo_data
from gateway.transfers.records import list_transfers

pytestmark = pytest.mark.fast


@pytest.fixture
def seeded(tmp_path: Path) -> tuple[Settings, Archive, demo.Summary]:
    settings = Settings(data_dir=tmp_path / "var")
    archive = Archive.open(settings, migrate_schema=True)
    summary = demo.seed(settings, archive, ct_slices=6)
    yield settings, archive, summary
    archive.close()


def _user(archive: Archive, username: str):  # type: ignore[no-untyped-def]
    with archive.db.reading() as session:
        user_id = session.scalar(select(User.id).where(User.username == username))
    return user_principal(archive.db, user_id)


def test_demo_seeds_a_small_world(seeded) -> None:  # type: ignore[no-untyped-def]
    settings, archive, summary = seeded
    ct, mr, cr, old = demo.CT.study_uid, demo.MR.study_uid, demo.CR.study_uid, demo.OLD_CR.study_uid
    with archive.db.reading() as session:
        names = {p.patient_name for p in session.scalars(select(Patient))}
        institutions = {i.name: i for i in session.scalars(select(Institution))}
    assert {"KIM^MINJUN=김^민준", "LEE^SEOYEON=이^서연", "SMITH^JANE"} <= names
    assert institutions[demo.CLINIC.name].disabled_at is not None  # the clinic closed
    [transfer] = list_transfers(archive.db)
    assert transfer.reason == "closure" and transfer.status == "complete"
    # The CT with its SR and PDF; every instance says it is synthetic demo data.
    found = archive.find_instances(RetrieveRequest(Level.STUDY, study_uids=[ct]))
    assert len(found) == 6 + 2
    with archive.store.open(found[0].blob_key) as fh:
        assert pydicom.dcmread(fh).PatientComments == DEMO_COMMENT
    # The patient sees their studies at two institutions, the closed clinic included.
    minjun = _user(archive, "minjun")
    assert permitted_studies(archive.db, minjun, Operation.VIEW, [ct, mr, cr, old]) == {ct, old}
    # Busan's radiologist sees the consented CT and their own CR, not the MR.
    busan = _user(archive, "rad.busan")
    assert permitted_studies(archive.db, busan, Operation.VIEW, [ct, mr, cr, old]) == {ct, cr}
    assert busan.kind is Kind.STAFF and demo.totp_secret(archive, "rad.busan")
    assert len(demo.current_code(archive, "rad.busan")) == 6
    # The share link works with its access code and lets its holder download.
    token = summary.share_url.split("#", 1)[1]
    policy = LinkPolicy.from_settings(settings)
    issued = exchange(archive.db, token, policy, client="t", access_code=demo.ACCESS_CODE)
    assert issued.token.startswith("sbat_")
    assert "/viewer/share#sbl_" in summary.share_url
    text = "\n".join(summary.lines())
    assert demo.PASSWORD in text and "rad.north" in text and demo.ACCESS_CODE in text


def test_a_second_run_adds_nothing(seeded) -> None:  # type: ignore[no-untyped-def]
    settings, archive, first = seeded
    marks = demo.demo_marks(archive)
    again = demo.seed(settings, archive, ct_slices=6)
    assert again.created == 0 and first.created > 0
    assert demo.demo_marks(archive) == marks
    assert again.share_url == first.share_url
    assert demo.study_count(archive) == 4


def test_production_refuses_the_demo(seeded, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings, archive, _summary = seeded
    production = settings.model_copy(update={"profile": "production"})
    with pytest.raises(demo.DemoRefused):
        demo.seed(production, archive)
    with pytest.raises(demo.DemoRefused):
        demo.refuse_in_production(production, archive)
    with pytest.raises(SystemExit, match="refusing to start"):
        refuse_demo_data(production)
    # A production configuration on a database without demo data starts.
    fresh = Settings(data_dir=tmp_path / "fresh", profile="production")
    Archive.open(fresh, migrate_schema=True).close()
    refuse_demo_data(fresh)
    # And the command line says no in plain words.
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "demo", "--data-dir", str(tmp_path / "p")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "STUDYBRIDGE_PROFILE": "production"},
    )
    assert result.returncode == 2 and "never seeds a production" in result.stderr + result.stdout


def test_the_demo_pdf_is_a_pdf() -> None:
    pdf = one_page_pdf(["Title", "a line (with parentheses)"])
    assert pdf.startswith(b"%PDF-1.4") and pdf.rstrip().endswith(b"%%EOF")
    assert b"\\(with parentheses\\)" in pdf
