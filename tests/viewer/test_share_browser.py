"""Share links in headless Chromium against a real ``studybridge serve``: the page at
``/viewer/share#sbl_...`` and the viewer it opens.

The study's patient has an account (linked to the study's Patient ID by an operator)
and creates links through the portal API; each link is opened in a fresh browser
context, as the person it was sent to would. Screenshots are saved for review.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from consent.accounts import set_password
from consent.audit import Auditor
from consent.patients import link_patient
from consent.principals import Kind, add_user, user_principal
from gateway.archive import Archive
from gateway.config import Settings
from tests.viewer.conftest import ISSUER, Page, Site, new_page
from tests.viewer.studies import CT_SLICES
from tests.viewer.test_viewer_browser import canvas, shot, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PASSWORD = "share-test-password"
CODE = "4711"


@dataclass
class Patient:
    site: Site
    headers: dict[str, str]

    def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.request(
            method, self.site.url + path, headers=self.headers, timeout=30, **kwargs
        )

    def link(self, **rules: Any) -> dict[str, Any]:
        body = {"study_uids": [self.site.study.study_uid], **rules}
        created = self.api("POST", "/api/me/links", json=body)
        assert created.status_code == 200, created.text
        return created.json()

    def revoke(self, link: dict[str, Any]) -> None:
        assert self.api("DELETE", f"/api/me/links/{link['id']}").status_code == 200


@pytest.fixture(scope="module")
def patient(site: Site) -> Patient:
    """The study's patient: an account linked to its Patient ID, signed in."""
    settings = Settings(data_dir=site.gateway.data_dir)
    archive = Archive.open(settings)
    auditor = Auditor(archive.db)
    try:
        account = add_user(archive.db, "share-patient", Kind.PATIENT)
        operator = add_user(archive.db, "share-operator", Kind.OPERATOR)
        set_password(archive.db, "share-patient", PASSWORD)
        link_patient(
            archive.db,
            auditor,
            account_id=account,
            issuer=ISSUER,
            patient_id="VIEW001",
            by=user_principal(archive.db, operator),
            evidence="synthetic test patient (no identity)",
        )
    finally:
        auditor.close()
        archive.close()
    signed = httpx.post(
        site.url + "/api/session",
        json={"username": "share-patient", "password": PASSWORD},
        timeout=30,
    )
    assert signed.status_code == 200, signed.text
    return Patient(site, {"Authorization": f"Bearer {signed.json()['access_token']}"})


@pytest.fixture
def fresh(site: Site) -> Iterator[Page]:
    """A fresh browser context: nothing in its storage, as on the recipient's computer."""
    context, page = new_page(site)
    try:
        yield page
    finally:
        context.close()


def _state(page: Page, name: str) -> str:
    page.page.wait_for_selector(f"#state[data-state='{name}']", timeout=20_000)
    return page.page.locator("#state").inner_text()


def _enter_code(page: Page, code: str) -> None:
    page.page.fill("#code", code)
    page.page.press("#code", "Enter")


def _viewer_image(page: Page) -> dict[str, Any]:
    page.page.wait_for_selector("#canvas[data-ready='true']", timeout=30_000)
    return wait_until(page, lambda: (c := canvas(page))["variance"] > 10 and c, "an image")


def test_share_link_journey(site: Site, patient: Patient, fresh: Page) -> None:
    link = patient.link(access_code=CODE)
    token = link["url"].split("#", 1)[1]
    assert link["url"] == f"{site.url}/viewer/share#{token}"
    page = fresh.page
    page.goto(link["url"])
    page.wait_for_selector("#code-form:not([hidden])")
    # The token left the address bar at once, and never went into a request URL.
    assert "sbl_" not in page.url
    assert "Link valid until" in page.locator("#facts").inner_text()
    assert page.evaluate("document.activeElement.id") == "code"
    shot(site, fresh, "share-code")

    _enter_code(fresh, "0000")
    page.wait_for_selector("#code-error:not([hidden])")
    assert "Tries left: 4" in page.locator("#code-error").inner_text()
    shot(site, fresh, "share-wrong-code")

    _enter_code(fresh, CODE)
    first = _viewer_image(fresh)
    assert page.url == site.viewer_url(site.study.study_uid)
    assert not any(token in url for url in fresh.requests)
    assert page.evaluate("JSON.parse(sessionStorage['studybridge.access']).source") == "link"
    # A view-only link offers no download.
    page.wait_for_load_state("networkidle")
    assert page.locator("#download").count() == 0

    page.locator("#viewport").focus()
    page.keyboard.press("ArrowDown")
    scrolled = wait_until(fresh, lambda: (c := canvas(fresh))["slice"] == "1" and c, "slice 2")
    assert scrolled["hash"] != first["hash"]
    page.select_option("#preset", "lung")
    lung = wait_until(fresh, lambda: (c := canvas(fresh))["window"] == "-600,1500" and c, "lung")
    assert lung["hash"] not in (first["hash"], scrolled["hash"])
    shot(site, fresh, "share-viewer")

    # The patient revokes the link: the next request of the open viewer is refused,
    # and the page says the link was revoked.
    patient.revoke(link)
    page.keyboard.press("End")
    text = _state(fresh, "revoked")
    assert "revoked" in text
    assert page.locator("#viewer").is_hidden()
    shot(site, fresh, "share-revoked-viewer")
    assert fresh.problems == [] or all("401" in p for p in fresh.problems)

    # Opening the link again says so too.
    again, reopened = new_page(site)
    try:
        reopened.page.goto(link["url"])
        assert "revoked" in _state(reopened, "revoked")
        shot(site, reopened, "share-revoked")
    finally:
        again.close()


def test_keyboard_only_through_the_link(site: Site, patient: Patient, fresh: Page) -> None:
    link = patient.link(access_code=CODE)
    page = fresh.page
    page.goto(link["url"])
    page.wait_for_selector("#code-form:not([hidden])")
    page.keyboard.type(CODE)  # the code field has focus when the page is ready
    page.keyboard.press("Enter")
    _viewer_image(fresh)
    page.keyboard.press("Tab")  # the skip link first, then to the image
    assert page.evaluate("document.activeElement.classList.contains('skip')")
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.id") == "viewport"
    page.keyboard.press("PageDown")
    wait_until(fresh, lambda: canvas(fresh)["slice"] == "10", "PageDown")
    page.keyboard.press("2")
    wait_until(fresh, lambda: canvas(fresh)["window"] == "-600,1500", "lung preset key")
    patient.revoke(link)


def test_single_use_link_waits_for_a_click(site: Site, patient: Patient, fresh: Page) -> None:
    """Scanners that run scripts must not use up a single-use link: it opens on a click."""
    link = patient.link(single_use=True)
    page = fresh.page
    page.goto(link["url"])
    page.wait_for_selector("#confirm:not([hidden])")
    page.reload()  # (the token left the address: a reload holds no link)
    assert "No link here" in _state(fresh, "no-link")
    described = httpx.post(
        site.url + "/api/links/describe", json={"token": link["token"]}, timeout=30
    ).json()
    assert described["status"] == "usable"  # showing the page twice consumed nothing
    page.goto(link["url"])
    page.click("#open")
    _viewer_image(fresh)
    other, second = new_page(site)
    try:
        second.page.goto(link["url"])
        assert "already used" in _state(second, "used")
    finally:
        other.close()


def test_download_allowed_link(site: Site, patient: Patient, fresh: Page) -> None:
    link = patient.link(can_download=True)
    page = fresh.page
    page.goto(link["url"])  # no code, not single use: opens at once
    _viewer_image(fresh)
    page.wait_for_selector("#download")
    with page.expect_download() as download:
        page.click("#download")
    body = download.value.path().read_bytes()
    with zipfile.ZipFile(io.BytesIO(body)) as zf:
        names = zf.namelist()
    assert names[0] == "DICOMDIR" and sum(n.startswith("DICOM/") for n in names) == CT_SLICES + 3
    # The token went in the form body: no request URL carried it.
    assert not any("sbat_" in url or "sbl_" in url for url in fresh.requests)
    shot(site, fresh, "share-download")
    patient.revoke(link)


def test_refusals_show_their_state(site: Site, patient: Patient) -> None:
    cases = []
    expired = patient.link(days=1 / 86400)  # one second
    cases.append((f"{site.url}/viewer/share#sbl_{'A' * 43}", "invalid", "not valid"))
    locked = patient.link(access_code=CODE)
    for _ in range(5):  # five wrong codes lock the link (per link)
        httpx.post(
            site.url + "/api/links/exchange",
            json={"token": locked["token"], "access_code": "0000"},
            timeout=30,
        )
    recipient = patient.link(recipient_institution="Viewer Hospital")
    page_context, page = new_page(site)
    try:
        page.page.wait_for_timeout(1200)
        page.page.goto(expired["url"])
        assert "expired" in _state(page, "expired")
        for url, state, words in cases:
            page.page.goto("about:blank")
            page.page.goto(url)
            assert words in _state(page, state)
        page.page.goto("about:blank")
        page.page.goto(locked["url"])
        page.page.wait_for_selector("#code-form:not([hidden])")
        _enter_code(page, CODE)
        assert "Too many" in _state(page, "locked")
        shot(site, page, "share-locked")
        page.page.goto("about:blank")
        page.page.goto(recipient["url"])
        assert "another institution" in _state(page, "recipient")
    finally:
        page_context.close()


def test_server_unavailable_then_retry(site: Site, patient: Patient, fresh: Page) -> None:
    link = patient.link()
    page = fresh.page
    page.route("**/api/links/describe", lambda route: route.abort("connectionrefused"))
    page.goto(link["url"])
    assert "not available" in _state(fresh, "unavailable")
    shot(site, fresh, "share-unavailable")
    page.unroute("**/api/links/describe")
    page.click("#state button")
    _viewer_image(fresh)
    patient.revoke(link)


def test_korean_and_phone(site: Site, patient: Patient) -> None:
    link = patient.link(access_code=CODE)
    context, page = new_page(
        site,
        locale="ko-KR",
        viewport={"width": 390, "height": 844},
        device_scale_factor=2,
        is_mobile=True,
        has_touch=True,
    )
    try:
        page.page.goto(link["url"])
        page.page.wait_for_selector("#code-form:not([hidden])")
        assert page.page.locator("label[for='code']").inner_text() == "접근 코드"
        assert "링크 유효 기간" in page.page.locator("#facts").inner_text()
        layout = page.page.evaluate(
            """() => {
              const r = (s) => document.querySelector(s).getBoundingClientRect();
              return {scroll: document.documentElement.scrollWidth, input: r('#code'),
                      button: r('#code-form button')};
            }"""
        )
        assert layout["scroll"] <= 390
        assert layout["input"]["width"] >= 250 and layout["button"]["right"] <= 390
        shot(site, page, "share-code-korean-phone")
        page.page.tap("#code")
        page.page.keyboard.type("0000")
        page.page.tap("#code-form button")
        page.page.wait_for_selector("#code-error:not([hidden])")
        assert "남은 횟수" in page.page.locator("#code-error").inner_text()
        page.page.fill("#code", CODE)
        page.page.tap("#code-form button")
        _viewer_image(page)
        assert page.page.locator("button[data-tool='scroll']").inner_text() == "스크롤"
        size = page.page.locator("#canvas").bounding_box()
        assert size["width"] >= 380 and size["height"] >= 400
        shot(site, page, "share-viewer-korean-phone")
    finally:
        context.close()
    patient.revoke(link)
