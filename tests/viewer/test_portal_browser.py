"""The patient portal and the institution inbox in headless Chromium against a real
``studybridge serve`` (no demo profile: every request is signed in).

Seeded before the server starts: the viewer's synthetic study sent by "North" for
patient NORTH/VIEW001, a second study of the same patient from "Old Clinic" (which
closed: a closure transfer), institutions North, East and Old Clinic, the patient
account ``alice`` linked to NORTH/VIEW001 by an operator, and East's radiologist
``east_rad`` with a TOTP second factor. Screenshots go to the shots folder
(``STUDYBRIDGE_VIEWER_SHOTS``), named ``portal-*``.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pyotp
import pytest

from consent.accounts import enable_totp, set_password
from consent.audit import Auditor
from consent.patients import link_patient
from consent.principals import Kind, Role, add_institution, add_user, user_principal
from gateway.cli_common import open_archive, settings_from
from gateway.transfers.records import create_transfer
from tests.factories import ct_slice, uid, write
from tests.servers import missing, running_gateway
from tests.viewer.conftest import CHROMIUM, CHROMIUM_ARGS, Page
from tests.viewer.studies import make_study

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PASSWORD = "correct horse battery"
CODE = "4321"


@dataclass
class Portal:
    url: str
    shots: Path
    browser: Any
    study: str  # the viewer study (North)
    old_study: str  # from the closed clinic
    totp: pyotp.TOTP  # east_rad's authenticator

    def api(self, method: str, path: str, body: Any = None, token: str | None = None) -> Any:
        request = urllib.request.Request(
            f"{self.url}/api/{path}",
            method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json"}
            | ({"Authorization": f"Bearer {token}"} if token else {}),
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                return json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            return {"status": exc.code, **json.loads(exc.read() or b"{}")}

    def token(self, username: str) -> str:
        code = self.totp.now() if username == "east_rad" else None
        answer = self.api(
            "POST", "session", {"username": username, "password": PASSWORD, "code": code}
        )
        return str(answer["access_token"])


def _seed(data_dir: Path, tmp: Path) -> tuple[str, str, str]:
    old = ct_slice(patient_id="VIEW001", issuer="NORTH", study_uid=uid(), rows=64, columns=64)
    old.StudyDescription = "CT chest (archived)"
    old.StudyDate = "20190611"
    (tmp / "old").mkdir()
    write(old, tmp / "old" / "1.dcm")
    settings = settings_from(data_dir, None)
    archive = open_archive(settings)
    try:
        db = archive.db
        add_institution(db, "North", issuer="NORTH")
        add_institution(db, "East", issuer="EAST")
        add_institution(db, "Old Clinic", issuer="NORTH")
        create_transfer(db, institution="Old Clinic", reason="closure", issuer="NORTH")
        alice = add_user(db, "alice", Kind.PATIENT, display_name="홍길동 Hong Gildong")
        op = add_user(db, "op", Kind.OPERATOR)
        add_user(
            db,
            "east_rad",
            Kind.STAFF,
            institution="East",
            role=Role.RADIOLOGIST,
            display_name="Dr. Lee",
        )
        for name in ("alice", "east_rad"):
            set_password(db, name, PASSWORD)
        secret = enable_totp(db, "east_rad")
        auditor = Auditor(db)
        operator = user_principal(db, op)
        assert operator is not None
        link_patient(
            db,
            auditor,
            account_id=alice,
            issuer="NORTH",
            patient_id="VIEW001",
            by=operator,
            evidence="identity card checked at the desk (synthetic)",
        )
        auditor.close()
    finally:
        archive.close()
    return secret, old.StudyInstanceUID, str(tmp / "old")


@pytest.fixture(scope="module")
def portal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Portal]:
    if not CHROMIUM.exists():
        missing("Debian's chromium is not installed at /usr/bin/chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("Playwright's Python package is not installed (pip install playwright)")
    import os

    tmp = tmp_path_factory.mktemp("portal")
    shots = Path(os.environ.get("STUDYBRIDGE_VIEWER_SHOTS") or tmp / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    study = make_study(tmp / "data")
    with running_gateway(tmp) as gw:
        gw.cli("import", str(tmp / "data"), "--issuer", "NORTH", "--institution", "North")
        secret, old_study, old_dir = _seed(gw.data_dir, tmp)
        gw.cli("import", old_dir, "--issuer", "NORTH", "--institution", "Old Clinic")
        gw.start()
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
            )
            try:
                yield Portal(
                    f"http://127.0.0.1:{gw.http_port}",
                    shots,
                    browser,
                    study.study_uid,
                    old_study,
                    pyotp.parse_uri(secret),
                )
            finally:
                browser.close()


@pytest.fixture
def context(portal: Portal) -> Iterator[Any]:
    ctx = portal.browser.new_context(viewport={"width": 1280, "height": 900}, locale="en-US")
    try:
        yield ctx
    finally:
        ctx.close()


def open_page(ctx: Any) -> Page:
    page = Page(ctx.new_page())
    page.attach()
    return page


def shot(portal: Portal, page: Page, name: str, full: bool = False) -> None:
    page.page.screenshot(path=str(portal.shots / f"portal-{name}.png"), full_page=full)


def sign_in(portal: Portal, page: Page, username: str, *, code: bool = False) -> None:
    p = page.page
    p.goto(f"{portal.url}/viewer/signin")
    p.fill("#username", username)
    p.fill("#password", PASSWORD)
    p.click("#submit")
    if code:
        p.wait_for_selector("#code", state="visible")
        assert p.locator("#signin-error").is_hidden()  # asking for the code is no error
        p.fill("#code", portal.totp.now())
        p.click("#submit")
    p.wait_for_selector("body[data-ready='true']", timeout=30_000)


def no_problems(page: Page) -> None:
    # 401s of the "who am I" probe on the sign-in page are expected answers.
    real = [x for x in page.problems if "401" not in x]
    assert real == []


def wait_for(page: Page, check: Any, what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        page.page.wait_for_timeout(100)
    raise AssertionError(f"timed out waiting for {what}; problems: {page.problems}")


def test_sign_in_errors_are_clear(portal: Portal, context: Any) -> None:
    page = open_page(context)
    p = page.page
    p.goto(f"{portal.url}/viewer/signin")
    p.fill("#username", "alice")
    p.fill("#password", "not the password")
    p.click("#submit")
    error = p.locator("#signin-error")
    error.wait_for(state="visible")
    assert error.inner_text() == "The username, password or code is not right."
    assert error.get_attribute("role") == "alert"
    # Staff: the password first, then the code; a wrong code says so.
    p.fill("#username", "east_rad")
    p.fill("#password", PASSWORD)
    p.click("#submit")
    p.wait_for_selector("#code", state="visible")
    p.fill("#code", "000000")
    p.click("#submit")
    wait_for(page, lambda: "not right" in error.inner_text(), "the wrong-code message")
    assert p.evaluate("document.activeElement.id") == "code"
    shot(portal, page, "signin-error")
    no_problems(page)


def test_patient_journey_share_link(portal: Portal, context: Any) -> None:
    page = open_page(context)
    p = page.page
    sign_in(portal, page, "alice")
    assert p.url.endswith("/viewer/portal")
    # The session cookie is out of reach of the page's scripts.
    cookies = {c["name"]: c for c in context.cookies()}
    assert cookies["sb_session"]["httpOnly"] and cookies["sb_session"]["sameSite"] == "Strict"
    assert "sb_session" not in p.evaluate("document.cookie")
    # Studies grouped by hospital; the closed clinic is marked.
    groups = [
        (g.get_attribute("data-institution"), g.get_attribute("data-closed"))
        for g in p.locator("#study-groups .group").all()
    ]
    assert groups == [("North", "false"), ("Old Clinic", "true")]
    assert "closed" in p.locator(".group[data-closed='true'] h3 .badge").inner_text()
    north = p.locator(f".study[data-uid='{portal.study}']").inner_text()
    assert "Mar 1, 2026" in north and "CT" in north and "OT" in north
    assert p.locator(f".study[data-uid='{portal.old_study}']").is_visible()
    shot(portal, page, "studies", full=True)

    # Create a link with an access code, for the North study.
    p.check(f"#share-studies input[value='{portal.study}']")
    p.fill("#share-code", CODE)
    p.select_option("#share-recipient", "")
    p.fill("#share-label", "For Dr. Park")
    p.click("#share-create")
    p.wait_for_selector("#share-result:not([hidden])")
    url = p.input_value("#share-url")
    parts = urlsplit(url)
    token = parts.fragment
    assert token.startswith("sbl_") and len(token) > 30
    assert token not in parts.path + parts.query  # only in the fragment
    assert all(token not in r for r in page.requests)  # no request URL carried it
    assert CODE in p.locator("#share-code-reminder").inner_text()
    qr = wait_for(
        page,
        lambda: p.evaluate(
            "() => { const i = document.getElementById('share-qr');"
            " return i.complete && i.naturalWidth > 0 && i.src.startsWith('blob:') && i.naturalWidth; }"
        ),
        "the QR code image",
    )
    assert qr >= 21  # at least a version-1 QR code, in modules
    shot(portal, page, "link-created")
    # The server agrees: the link is live and asks for the code.
    described = portal.api("POST", "links/describe", {"token": token})
    assert described["status"] == "usable" and described["needs_access_code"] is True

    # The list shows it; revoking asks first and says what cannot be recalled.
    row = p.locator("#link-list .row").first
    wait_for(page, lambda: row.get_attribute("data-status") == "active", "the new link listed")
    assert "For Dr. Park" in row.inner_text() and "access code" in row.inner_text()
    row.locator("button.danger").click()
    dialog = p.locator("#revoke-dialog")
    dialog.wait_for(state="visible")
    assert "cannot be recalled" in dialog.inner_text()
    shot(portal, page, "revoke-dialog")
    p.click("#revoke-confirm")
    wait_for(page, lambda: row.get_attribute("data-status") == "revoked", "the revoked link")
    assert "revoked" in row.inner_text()
    assert "cannot be recalled" in p.locator("#page-message").inner_text()
    assert portal.api("POST", "links/describe", {"token": token})["status"] == "revoked"
    shot(portal, page, "links", full=True)
    no_problems(page)


def test_consent_grant_and_revoke(portal: Portal, context: Any) -> None:
    page = open_page(context)
    p = page.page
    sign_in(portal, page, "alice")
    p.select_option("#consent-institution", "East")
    p.select_option("#consent-purpose", "CAREMGT")
    p.check("#consent-some")
    p.check(f"#consent-studies input[value='{portal.old_study}']")
    p.fill("#consent-end", "2099-12-31")
    p.click("#consent-form button[type=submit]")
    row = p.locator("#consent-list .row").first
    wait_for(page, lambda: row.get_attribute("data-status") == "active", "the new consent")
    text = row.inner_text()
    assert "East" in text and "Care management" in text and "CT chest (archived)" in text
    shot(portal, page, "consents")
    row.locator("button.danger").click()
    wait_for(page, lambda: row.get_attribute("data-status") == "inactive", "the revoked consent")
    assert "ended" in row.inner_text()
    no_problems(page)


def test_request_approved_then_radiologist_inbox_and_history(portal: Portal, context: Any) -> None:
    east = portal.token("east_rad")
    asked = portal.api(
        "POST",
        "requests",
        {
            "issuer": "NORTH",
            "patient_id": "VIEW001",
            "reason": "Second opinion before surgery",
            "study_uids": [portal.study],
        },
        token=east,
    )
    assert "id" in asked, asked
    page = open_page(context)
    p = page.page
    sign_in(portal, page, "alice")
    request = p.locator(f"#request-list .row[data-request='{asked['id']}']")
    assert "Second opinion before surgery" in request.inner_text()
    shot(portal, page, "requests")
    request.locator("button.primary").click()
    wait_for(page, lambda: "No hospital" in p.locator("#request-list").inner_text(), "approval")
    assert "approved" in p.locator("#page-message").inner_text()
    consents = p.locator("#consent-list .row[data-status='active']").all_inner_texts()
    assert any("East" in c for c in consents)

    # East's radiologist: sign in with the code, the inbox lists the study, open it.
    staff_ctx = portal.browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        staff = open_page(staff_ctx)
        sign_in(portal, staff, "east_rad", code=True)
        s = staff.page
        assert s.url.endswith("/viewer/inbox")
        rows = s.locator("#inbox-rows tr[data-uid]")
        assert rows.count() == 1
        assert rows.first.get_attribute("data-uid") == portal.study
        assert "North" in rows.first.inner_text() and "consent" in rows.first.inner_text()
        assert "Dr. Lee · East" in s.locator("#who").inner_text()
        shot(portal, staff, "inbox")
        rows.first.locator("button.open").click()
        s.wait_for_selector("#canvas[data-ready='true']", timeout=30_000)
        variance = wait_for(
            staff,
            lambda: (
                (
                    v := s.evaluate(
                        "() => { const c = document.getElementById('canvas');"
                        " const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
                        " let n = 0, m = 0, m2 = 0; for (let i = 0; i < d.length; i += 4)"
                        " { n++; m += d[i]; m2 += d[i] * d[i]; } m /= n; return m2 / n - m * m; }"
                    )
                )
                > 10
                and v
            ),
            "the first image",
        )
        assert variance > 10
        assert "#study=" in s.url and "sbat_" not in s.url
        shot(portal, staff, "inbox-viewer")
        no_problems(staff)
    finally:
        staff_ctx.close()

    # Emergency access by East's radiologist is flagged in the patient's history.
    grant = portal.api(
        "POST",
        "break-glass",
        {"issuer": "NORTH", "patient_id": "VIEW001", "reason": "Unconscious, trauma bay"},
        token=east,
    )
    assert "id" in grant, grant
    with urllib.request.urlopen(
        urllib.request.Request(
            f"{portal.url}/dicom-web/studies/{portal.old_study}/metadata",
            headers={"Authorization": f"Bearer {east}"},
        ),
        timeout=30,
    ) as answer:
        assert answer.status == 200
    p.reload()
    p.wait_for_selector("body[data-ready='true']")
    history = p.locator("#history-rows")
    text = history.inner_text()
    assert "east_rad (East)" in text and "viewed" in text
    flagged = p.locator("#history-rows tr.break-glass")
    assert flagged.count() >= 1 and "emergency access" in flagged.first.inner_text()
    assert "Unconscious, trauma bay" in p.locator("#grant-list").inner_text()
    p.locator("#history").scroll_into_view_if_needed()
    shot(portal, page, "history")
    no_problems(page)


def test_the_password_never_goes_in_the_url_before_the_script_runs(portal: Portal) -> None:
    """A click or Enter before the page's script has loaded submits nothing: the
    button is enabled by the script, and the form would POST, not GET."""
    ctx = portal.browser.new_context()
    try:
        page = open_page(ctx)
        p = page.page
        p.route("**/js/signin.js", lambda route: route.abort())  # the script never loads
        p.goto(f"{portal.url}/viewer/signin")
        assert p.get_attribute("#signin", "method") == "post"
        assert p.locator("#submit").is_disabled()
        p.fill("#username", "alice")
        p.fill("#password", PASSWORD)
        p.click("#submit", force=True)
        p.press("#password", "Enter")
        p.wait_for_timeout(300)
        assert PASSWORD not in p.url and "password" not in p.url
        assert p.url.endswith("/viewer/signin")
    finally:
        ctx.close()


def test_korean_ui(portal: Portal) -> None:
    ctx = portal.browser.new_context(viewport={"width": 1280, "height": 900}, locale="ko-KR")
    try:
        page = open_page(ctx)
        p = page.page
        p.goto(f"{portal.url}/viewer/signin")
        wait_for(page, lambda: p.locator("h1").inner_text() == "로그인", "the Korean sign-in page")
        assert p.evaluate("document.documentElement.lang") == "ko"
        shot(portal, page, "signin-korean")
        sign_in(portal, page, "alice")
        assert p.locator("#studies-heading").inner_text() == "내 검사"
        assert "폐업" in p.locator("#study-groups").inner_text()
        assert "링크 만들기" in p.locator("#share-create").inner_text()
        shot(portal, page, "studies-korean")
        # The switch changes the language at once and is remembered.
        p.select_option("#lang", "en")
        wait_for(page, lambda: p.locator("#studies-heading").inner_text() == "My studies", "en")
        no_problems(page)
    finally:
        ctx.close()


def test_phone_layout(portal: Portal) -> None:
    ctx = portal.browser.new_context(
        viewport={"width": 390, "height": 844},
        device_scale_factor=2,
        is_mobile=True,
        has_touch=True,
        locale="en-US",
    )
    try:
        page = open_page(ctx)
        p = page.page
        sign_in(portal, page, "alice")
        width = p.evaluate("() => document.documentElement.scrollWidth")
        assert width <= 390, f"the page scrolls sideways ({width}px)"
        button = p.locator(f".study[data-uid='{portal.study}'] button.open")
        box = button.bounding_box()
        assert box is not None and box["width"] > 300 and box["height"] >= 40  # thumb-sized
        shot(portal, page, "phone")
        no_problems(page)
    finally:
        ctx.close()


def _tab_to(page: Page, selector: str, limit: int = 80) -> None:
    """Press Tab until ``selector`` has the focus (keyboard only)."""
    p = page.page
    for _ in range(limit):
        if p.evaluate("(s) => document.activeElement?.matches(s) ?? false", selector):
            return
        p.keyboard.press("Tab")
    raise AssertionError(f"Tab never reached {selector}")


def test_keyboard_only_sign_in_and_link(portal: Portal, context: Any) -> None:
    page = open_page(context)
    p = page.page
    p.goto(f"{portal.url}/viewer/signin")
    wait_for(page, lambda: p.evaluate("document.activeElement.id") == "username", "focus")
    p.keyboard.type("alice")
    p.keyboard.press("Tab")
    p.keyboard.type(PASSWORD)
    p.keyboard.press("Enter")
    p.wait_for_selector("body[data-ready='true']", timeout=30_000)
    # Skip link, then through the page to the share form.
    p.keyboard.press("Tab")
    assert p.evaluate("document.activeElement.className") == "skip"
    _tab_to(page, f"#share-studies input[value='{portal.old_study}']")
    p.keyboard.press("Space")
    _tab_to(page, "#share-days")
    p.keyboard.press("ArrowDown")  # 7 -> 30 days
    p.keyboard.press("Tab")
    p.keyboard.type("9876")
    _tab_to(page, "#share-download")
    p.keyboard.press("Space")
    _tab_to(page, "#share-create")
    p.keyboard.press("Enter")
    p.wait_for_selector("#share-result:not([hidden])")
    assert p.evaluate("document.activeElement.id") == "share-result"
    row = p.locator("#link-list .row").first
    wait_for(page, lambda: row.get_attribute("data-status") == "active", "the new link")
    text = row.inner_text()
    assert "download allowed" in text and "access code" in text
    # Revoke by keyboard too: the dialog opens on Cancel (the safe choice).
    row.locator("button.danger").focus()
    p.keyboard.press("Enter")
    assert p.evaluate("document.activeElement.id") == "revoke-cancel"
    p.keyboard.press("Escape")
    assert row.get_attribute("data-status") == "active"
    assert p.evaluate("document.activeElement.classList.contains('danger')")
    no_problems(page)
