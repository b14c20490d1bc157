"""The real OHIF Viewer against a real ``studybridge serve``, in headless Chromium.

Everything runs on 127.0.0.1: ``studybridge serve`` (subprocess, its own data folder),
a small static server for OHIF's prebuilt ``dist/`` (SPA fallback to index.html,
``Cross-Origin-Opener-Policy``/``-Embedder-Policy`` so the page is cross-origin
isolated as OHIF's decoders want, and an ``app-config.js`` whose data source is the
one ``docs/ohif.md`` documents), and Debian's ``/usr/bin/chromium`` driven by
Playwright. The tests check the study list, the first image of a CT series (canvas
not blank), scrolling, a JPEG 2000 and a multi-frame instance, and that OHIF made no
studybridge request that failed. The module runs on both ``serve_stack`` kinds:
embedded, and production (PostgreSQL, S3, a worker taking the tasks over Redis).

Needs: ``scripts/ohif.sh --deps`` (OHIF's dist into ~/.cache/studybridge/ohif, Debian
chromium, Playwright's Python package; no browser download). Missing pieces skip the
module locally and fail it when CI=true. ``STUDYBRIDGE_OHIF_DIST`` points at another
dist folder. Screenshots are written to the module's temporary folder (printed in
failure messages) or to ``STUDYBRIDGE_OHIF_SHOTS``/<stack> when set.
"""

from __future__ import annotations

import functools
import http.server
import io
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pytest

from tests.conftest import STACKS, open_stack
from tests.factories import ct_series, uid
from tests.servers import free_port, missing, running_gateway

pytestmark = [pytest.mark.integration, pytest.mark.slow]

OHIF_VERSION = "3.13.2"  # keep equal to OHIF_VERSION in scripts/ohif.sh
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
CT_SLICES = 40


def _missing(message: str) -> NoReturn:
    missing(message + " (run scripts/ohif.sh --deps)")


def ohif_dist() -> Path:
    env = os.environ.get("STUDYBRIDGE_OHIF_DIST")
    cache = Path(os.environ.get("STUDYBRIDGE_OHIF_CACHE", Path.home() / ".cache/studybridge/ohif"))
    dist = Path(env) if env else cache / OHIF_VERSION / "dist"
    if not (dist / "index.html").is_file():
        _missing(f"OHIF's dist is not installed at {dist}")
    return dist


# -- OHIF's static files ---------------------------------------------------------------
class _OHIFHandler(http.server.SimpleHTTPRequestHandler):
    """dist/ with SPA fallback, COOP/COEP, and ``/app-config.js`` from memory."""

    extensions_map = {
        **http.server.SimpleHTTPRequestHandler.extensions_map,
        ".js": "text/javascript",
        ".mjs": "text/javascript",
        ".wasm": "application/wasm",
        ".json": "application/json",
    }
    site: _OHIFSite

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def end_headers(self) -> None:
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def send_head(self):  # type: ignore[no-untyped-def]
        path = self.path.split("?", 1)[0].split("#", 1)[0]
        if path == "/app-config.js":
            body = self.site.config_js.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/javascript")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            return io.BytesIO(body)
        last = path.rsplit("/", 1)[-1]
        if path != "/" and "." not in last and not Path(self.translate_path(path)).is_file():
            self.path = "/index.html"  # client-side routes: /viewer, /local ...
        return super().send_head()


@dataclass
class _OHIFSite:
    url: str
    dicomweb: str
    config_js: str = ""
    server: http.server.ThreadingHTTPServer | None = None

    def configure(self, **overrides: Any) -> None:
        """The data source of docs/ohif.md pointing at our server, plus overrides."""
        source = {
            "friendlyName": "studybridge",
            "name": "studybridge",
            "qidoRoot": self.dicomweb,
            "wadoRoot": self.dicomweb,
            "wadoUriRoot": self.dicomweb + "/wado",
            "qidoSupportsIncludeField": True,
            "supportsFuzzyMatching": True,
            "supportsWildcard": True,
            "supportsReject": False,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "staticWado": False,
            "bulkDataURI": {"enabled": True},
            "omitQuotationForMultipartRequest": True,
            "dicomUploadEnabled": True,
            **overrides,
        }
        config = {
            "routerBasename": "/",
            "showStudyList": True,
            "extensions": [],
            "modes": [],
            "dataSources": [
                {
                    "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
                    "sourceName": "studybridge",
                    "configuration": source,
                }
            ],
            "defaultDataSourceName": "studybridge",
        }
        self.config_js = "window.config = " + json.dumps(config, indent=1) + ";\n"


# -- data and servers ------------------------------------------------------------------
@dataclass
class Studies:
    ct: str
    ct_patient: str
    multiframe: str
    j2k: str


def _load_data(folder: Path) -> Studies:
    from pydicom.data import get_testdata_file

    ct = uid()
    ct_series(
        folder / "ct",
        CT_SLICES,
        study_uid=ct,
        rows=128,
        columns=128,
        patient_name="OHIF^BROWSER",
        patient_id="OHIF001",
        accession="OHIFACC1",
    )
    other = folder / "other"
    other.mkdir()
    found = {}
    for name in ("emri_small.dcm", "MR_small_jp2klossless.dcm"):
        path = get_testdata_file(name)
        if path is None:
            _missing(f"pydicom test file {name} is not available (pip install pydicom-data)")
        shutil.copy(str(path), other / name)
        import pydicom

        found[name] = pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID
    return Studies(
        ct=ct,
        ct_patient="OHIF, BROWSER",  # how OHIF's study list shows OHIF^BROWSER
        multiframe=found["emri_small.dcm"],
        j2k=found["MR_small_jp2klossless.dcm"],
    )


@pytest.fixture(scope="module", params=STACKS)
def environment(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Any, Studies, Path]]:
    """One served gateway for the module's tests: embedded, then production (its
    derived data, thumbnails included, prepared by a worker over Redis)."""
    dist = ohif_dist()
    if not CHROMIUM.exists():
        _missing("Debian's chromium is not installed at /usr/bin/chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("Playwright's Python package is not installed")

    tmp = tmp_path_factory.mktemp("ohif")
    chosen = os.environ.get("STUDYBRIDGE_OHIF_SHOTS")
    shots = Path(chosen) / request.param if chosen else tmp / "shots"
    shots.mkdir(parents=True, exist_ok=True)
    studies = _load_data(tmp / "data")

    ohif_port = free_port()
    site_origin = f"http://127.0.0.1:{ohif_port}"
    # CORS for OHIF's origin only, as docs/ohif.md recommends in production.
    env = {"STUDYBRIDGE_CORS_ORIGINS": json.dumps([site_origin])}
    with (
        open_stack(request.param, tmp / "stack", request, env) as stack,
        running_gateway(tmp, stack.env) as gw,
    ):
        gw.cli("import", str(tmp / "data"))
        # Demo profile: OHIF's requests arrive anonymous and are served as the demo
        # principal (what OHIF with ?token= sends is not tested here yet).
        gw.env["STUDYBRIDGE_PROFILE"] = "demo"  # the profile, without --demo's seeded studies
        gw.start()
        site = _OHIFSite(url=site_origin, dicomweb=f"http://127.0.0.1:{gw.http_port}/dicom-web")
        site.configure()
        handler = type("Handler", (_OHIFHandler,), {"site": site})
        site.server = http.server.ThreadingHTTPServer(
            ("127.0.0.1", ohif_port), functools.partial(handler, directory=str(dist))
        )
        site.server.daemon_threads = True
        thread = threading.Thread(target=site.server.serve_forever, daemon=True)
        thread.start()
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(
                    executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
                )
                try:
                    yield (site, browser), studies, shots
                finally:
                    browser.close()
        finally:
            site.server.shutdown()
            site.server.server_close()


# -- a page that records what OHIF asked studybridge -----------------------------------
@dataclass
class Recorder:
    api: str
    problems: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)

    def attach(self, page: Any) -> None:
        page.on("response", self._response)
        page.on("requestfailed", self._failed)
        page.on("console", self._console)

    def _response(self, response: Any) -> None:
        if not response.url.startswith(self.api):
            return
        self.requests.append(f"{response.status} {response.url[len(self.api) :]}")
        if response.status >= 400:
            try:
                body = response.text()[:300]
            except Exception as exc:  # pragma: no cover - body gone
                body = f"<{exc.__class__.__name__}>"
            accept = response.request.headers.get("accept")
            self.problems.append(
                f"{response.status} {response.request.method} {response.url} "
                f"(Accept: {accept}): {body}"
            )

    def _failed(self, request: Any) -> None:
        if request.url.startswith(self.api):
            self.problems.append(f"failed {request.method} {request.url}: {request.failure}")

    def _console(self, message: Any) -> None:
        if message.type == "error":
            self.console_errors.append(message.text[:300])


@pytest.fixture
def ohif(environment: tuple[Any, Studies, Path]) -> Iterator[tuple[Any, Recorder, _OHIFSite]]:
    (site, browser), _studies, _shots = environment
    site.configure()
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    recorder = Recorder(api=site.dicomweb)
    recorder.attach(page)
    try:
        yield page, recorder, site
    finally:
        context.close()


@pytest.fixture
def studies(environment: tuple[Any, Studies, Path]) -> Studies:
    return environment[1]


@pytest.fixture
def shots(environment: tuple[Any, Studies, Path]) -> Path:
    return environment[2]


_CANVAS_STATS = """() => Array.from(document.querySelectorAll('canvas.cornerstone-canvas'))
  .map((c, index) => {
    const out = {index, w: c.width, h: c.height, variance: 0, hash: 0};
    const ctx = c.getContext('2d');
    if (!ctx || !c.width || !c.height) return out;
    const d = ctx.getImageData(0, 0, c.width, c.height).data;
    let n = 0, s = 0, s2 = 0, h = 0;
    for (let i = 0; i < d.length; i += 4) {
      const v = (d[i] + d[i + 1] + d[i + 2]) / 3;
      n++; s += v; s2 += v * v; h = (h * 31 + d[i]) >>> 0;
    }
    const mean = s / n;
    out.variance = s2 / n - mean * mean;
    out.hash = h;
    return out;
  })"""


def wait_for_image(page: Any, timeout: float = 90.0) -> dict[str, Any]:
    """The first viewport canvas once it shows a non-blank image."""
    deadline = time.monotonic() + timeout
    stats: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        stats = page.evaluate(_CANVAS_STATS)
        drawn = [c for c in stats if c["w"] > 100 and c["variance"] > 10]
        if drawn:
            return drawn[0]
        page.wait_for_timeout(500)
    raise AssertionError(f"no image rendered within {timeout}s; canvases: {stats}")


def _report(recorder: Recorder, shot: Path) -> str:
    return (
        f"screenshot {shot}; failing studybridge requests: {recorder.problems}; "
        f"console errors: {recorder.console_errors[:10]}"
    )


# -- tests -----------------------------------------------------------------------------
def test_study_list_shows_our_studies(ohif, studies: Studies, shots: Path) -> None:
    page, recorder, site = ohif
    page.goto(site.url + "/", wait_until="domcontentloaded")
    page.wait_for_selector(f"tbody tr >> text={studies.ct_patient}", timeout=60_000)
    shot = shots / "study-list.png"
    page.screenshot(path=str(shot))
    rows = page.evaluate(
        "() => Array.from(document.querySelectorAll('tbody tr')).map(r => r.innerText)"
    )
    ct_rows = [" ".join(r.split()) for r in rows if studies.ct_patient in r]
    assert ct_rows, _report(recorder, shot)
    assert "CT HEAD" in ct_rows[0], ct_rows
    assert ct_rows[0].endswith(str(CT_SLICES)), ct_rows  # Instances column
    assert len([r for r in rows if "MR" in r]) >= 2, rows  # the multi-frame and J2K MRs
    assert page.evaluate("() => self.crossOriginIsolated") is True
    assert any("/studies?" in r for r in recorder.requests), recorder.requests
    assert not recorder.problems, _report(recorder, shot)


def test_viewer_renders_ct_and_scrolls(ohif, studies: Studies, shots: Path) -> None:
    page, recorder, site = ohif
    page.goto(f"{site.url}/viewer?StudyInstanceUIDs={studies.ct}", wait_until="domcontentloaded")
    first = wait_for_image(page)
    shot = shots / "viewer-ct.png"
    page.screenshot(path=str(shot))
    assert first["variance"] > 10, _report(recorder, shot)

    canvas = page.locator("canvas.cornerstone-canvas").nth(first["index"])
    changed = None
    # A deadline, not a speed check: the next slices' frames may take a while on a
    # loaded machine (on production they come from S3), and OHIF draws a slice only
    # once its frame is in. Down first, then up: past the end of the stack the wheel
    # changes nothing, in case OHIF opened the series at its far end. The pointer is put back over the canvas before every turn of the wheel: OHIF
    # may still be laying the page out (side panels open after the first image).
    under = ""
    for turn in range(75):
        box = canvas.bounding_box()
        assert box is not None
        x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        page.mouse.move(x, y)
        page.mouse.wheel(0, 120 if turn < 40 else -120)
        page.wait_for_timeout(400)
        now = page.evaluate(_CANVAS_STATS)[first["index"]]
        if now["hash"] != first["hash"] and now["variance"] > 10:
            changed = now
            break
        if turn % 25 == 24:  # what the wheel went to, for the failure message
            under = page.evaluate(
                "([x, y]) => { const e = document.elementFromPoint(x, y);"
                " return e ? e.tagName + '.' + e.className : 'nothing'; }",
                [x, y],
            )
    scrolled = shots / "viewer-ct-scrolled.png"
    page.screenshot(path=str(scrolled))
    frames = [r for r in recorder.requests if "/frames/" in r]
    assert changed is not None, (
        f"the image did not change on scrolling (under the pointer: {under}; "
        f"{len(frames)} frame requests answered); " + _report(recorder, scrolled)
    )
    assert frames and all(r.startswith("200 ") for r in frames), frames[:5]
    assert any(
        r.startswith("200 ") and r.split("?")[0].endswith("/metadata") for r in recorder.requests
    )
    assert not recorder.problems, _report(recorder, scrolled)


@pytest.mark.parametrize("which", ["multiframe", "j2k"])
def test_viewer_renders_multiframe_and_jpeg2000(
    ohif, studies: Studies, shots: Path, which: str
) -> None:
    page, recorder, site = ohif
    study = getattr(studies, which)
    page.goto(f"{site.url}/viewer?StudyInstanceUIDs={study}", wait_until="domcontentloaded")
    wait_for_image(page)
    shot = shots / f"viewer-{which}.png"
    page.screenshot(path=str(shot))
    assert any("/frames/" in r for r in recorder.requests), recorder.requests
    assert not recorder.problems, _report(recorder, shot)


def test_server_side_thumbnails(ohif, studies: Studies, shots: Path) -> None:
    """docs/ohif.md: thumbnailRendering 'thumbnail' also works."""
    page, recorder, site = ohif
    site.configure(thumbnailRendering="thumbnail")
    page.goto(f"{site.url}/viewer?StudyInstanceUIDs={studies.ct}", wait_until="domcontentloaded")
    wait_for_image(page)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any("/thumbnail" in r for r in recorder.requests):
        page.wait_for_timeout(500)
    page.wait_for_timeout(1000)
    shot = shots / "viewer-ct-server-thumbnail.png"
    page.screenshot(path=str(shot))
    thumbs = [r for r in recorder.requests if "/thumbnail" in r]
    assert thumbs, recorder.requests
    assert all(r.startswith("200 ") for r in thumbs), _report(recorder, shot)
    assert not recorder.problems, _report(recorder, shot)
