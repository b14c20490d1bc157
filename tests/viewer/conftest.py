"""A running ``studybridge serve`` holding the viewer's synthetic study, and headless
Chromium (Debian's ``/usr/bin/chromium``, driven by Playwright; never downloaded).

The study is imported as sent by ``INSTITUTION``; the pages get a real access token
of that institution's DICOMweb client (``Gateway.access_token``: OAuth 2 client
credentials at ``/api/token``; ``Site.token``), as a share-link exchange would give one, and send it as a Bearer
header. Missing Chromium or Playwright skip locally and fail when CI=true. Screenshots go
to the session's temporary folder, or to ``STUDYBRIDGE_VIEWER_SHOTS`` when set.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.servers import missing, running_gateway
from tests.viewer.studies import ViewerStudy, make_study

INSTITUTION = "Viewer Hospital"
ISSUER = "VIEWER-HOSP"  # the study's Issuer of Patient ID (patients link to it)
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _missing(message: str) -> None:
    missing(message)


@dataclass
class Site:
    url: str  # http://127.0.0.1:PORT
    study: ViewerStudy
    shots: Path
    browser: Any
    gateway: Any
    token: str  # a real access token that may view the study (INSTITUTION's client)

    def viewer_url(self, study: str | None = None) -> str:
        return f"{self.url}/viewer/" + (f"#study={study}" if study else "")


@pytest.fixture(scope="session")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    if not CHROMIUM.exists():
        _missing("Debian's chromium is not installed at /usr/bin/chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("Playwright's Python package is not installed (pip install playwright)")
    tmp = tmp_path_factory.mktemp("viewer")
    shots = Path(os.environ.get("STUDYBRIDGE_VIEWER_SHOTS") or tmp / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    study = make_study(tmp / "data")
    # Every page comes from 127.0.0.1: the share-link tests' wrong access codes must
    # not lock the address out (the per-link lockout is what they test).
    env = {"STUDYBRIDGE_ACCESS_CODE_MAX_FAILURES_PER_CLIENT": "100"}
    with running_gateway(tmp, env) as gw:
        gw.cli("institutions", "add", INSTITUTION, "--issuer", ISSUER)
        gw.cli("import", str(tmp / "data"), "--institution", INSTITUTION, "--issuer", ISSUER)
        gw.start()
        url = f"http://127.0.0.1:{gw.http_port}"
        token = gw.access_token(INSTITUTION, "viewer-test")
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
            )
            try:
                yield Site(url, study, shots, browser, gw, token)
            finally:
                browser.close()


@dataclass
class Page:
    """A page with a record of what went wrong in it (console errors, failed requests,
    CSP violations)."""

    page: Any
    problems: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    def attach(self) -> None:
        self.page.on("console", self._console)
        self.page.on("requestfailed", self._failed)
        self.page.on("request", lambda r: self.requests.append(r.url))

    def _console(self, message: Any) -> None:
        # The tests' own canvas readbacks make Chromium suggest willReadFrequently.
        if message.type in ("error", "warning") and "willReadFrequently" not in message.text:
            self.problems.append(f"console {message.type}: {message.text[:300]}")

    def _failed(self, request: Any) -> None:
        failure = request.failure or ""
        if "ERR_ABORTED" not in failure:  # dropped prefetches are aborted on purpose
            self.problems.append(f"failed {request.method} {request.url}: {failure}")


def new_page(site: Site, **context_options: Any) -> tuple[Any, Page]:
    options = {"viewport": {"width": 1400, "height": 900}, "locale": "en-US", **context_options}
    context = site.browser.new_context(**options)
    page = Page(context.new_page())
    page.attach()
    return context, page


@pytest.fixture
def page(site: Site) -> Iterator[Page]:
    context, page = new_page(site)
    try:
        yield page
    finally:
        context.close()
