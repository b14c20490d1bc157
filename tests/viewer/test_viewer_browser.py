"""The study viewer in headless Chromium against a real ``studybridge serve``.

One synthetic study (tests/viewer/studies.py): a 30-slice CT phantom with non-square
pixels and two measurement markers, a JPEG baseline image, a text SR and an
Encapsulated PDF. The tests look at what a person sees: the canvas pixels (variance,
a hash), the overlays, the state screens, screenshots (saved for review).
"""

from __future__ import annotations

import base64
import io
import re
import time
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.viewer.conftest import Page, Site, new_page
from tests.viewer.studies import (
    CT_SLICES,
    FINDING,
    IMPRESSION,
    MARKER_DISTANCE_MM,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

_CANVAS = """() => {
  const c = document.getElementById('canvas');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let n = 0, s = 0, s2 = 0, h = 0;
  for (let i = 0; i < d.length; i += 4) {
    const v = d[i];
    n++; s += v; s2 += v * v; h = (h * 31 + v) >>> 0;
  }
  const mean = s / n;
  return {mean, variance: s2 / n - mean * mean, hash: h, slice: c.dataset.slice,
          window: c.dataset.window, sop: c.dataset.sop};
}"""


def canvas(page: Page) -> dict[str, Any]:
    return page.page.evaluate(_CANVAS)


def wait_until(page: Page, check, what: str, timeout: float = 20.0) -> Any:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        page.page.wait_for_timeout(100)
    raise AssertionError(f"timed out waiting for {what}; problems: {page.problems}")


def sign_in(page: Page, token: str) -> None:
    """What the share-link page does after the exchange: the token in sessionStorage."""
    page.page.add_init_script(
        "sessionStorage.setItem('studybridge.access', JSON.stringify({token: '" + token + "'}))"
    )


def open_study(site: Site, page: Page, *, token: str | None = None) -> dict[str, Any]:
    sign_in(page, token or site.token)
    page.page.goto(site.viewer_url(site.study.study_uid))
    page.page.wait_for_selector("#canvas[data-ready='true']", timeout=30_000)
    return wait_until(page, lambda: (c := canvas(page))["variance"] > 10 and c, "a drawn image")


def shot(site: Site, page: Page, name: str) -> None:
    page.page.screenshot(path=str(site.shots / f"{name}.png"))


def test_study_opens_with_thumbnails_and_token_in_header(site: Site, page: Page) -> None:
    headers: list[tuple[str, str | None]] = []
    page.page.on(
        "request",
        lambda r: (
            headers.append((r.url, r.headers.get("authorization")))
            if "/dicom-web/" in r.url
            else None
        ),
    )
    response_headers: dict[str, str] = {}
    page.page.on(
        "response",
        lambda r: response_headers.update(r.headers) if r.url.endswith("/viewer/") else None,
    )
    first = open_study(site, page)
    assert first["slice"] == "0"
    thumbs = wait_until(
        page,
        lambda: (
            (
                n := page.page.evaluate(
                    "() => [...document.querySelectorAll('.thumb img')]"
                    ".filter(i => i.complete && i.naturalWidth > 0).length"
                )
            )
            >= 2
            and n
        ),
        "two series thumbnails",
    )
    assert thumbs == 2  # CT and the JPEG image; SR and PDF show a label instead
    labels = page.page.locator(".series-item .caption strong").all_inner_texts()
    assert labels == ["CT #1", "OT #2", "SR #90", "DOC #91"]
    assert page.page.locator(".series-item").first.get_attribute("aria-current") == "true"
    overlay = page.page.locator("#ov-bl").inner_text()
    assert f"Image 1 / {CT_SLICES}" in overlay
    assert "W 400 L 40" in overlay  # the data set's own window
    markers = [
        page.page.locator(f"#or-{s}").inner_text() for s in ("top", "bottom", "left", "right")
    ]
    assert markers == ["A", "P", "R", "L"]  # axial, Image Orientation 1\0\0\0\1\0
    assert page.page.locator("#lossy").is_hidden()
    assert page.page.locator("#attr-list").inner_text().count("VIEW001") == 1
    shot(site, page, "study-ct")
    # The access token travels as a header, never in a URL.
    assert headers and all(auth == f"Bearer {site.token}" for _url, auth in headers)
    assert not any(site.token in url for url in page.requests)
    assert response_headers["referrer-policy"] == "no-referrer"
    assert "script-src 'self'" in response_headers["content-security-policy"]
    assert page.problems == []


def test_scrolling_changes_the_slice(site: Site, page: Page) -> None:
    first = open_study(site, page)
    # Neighbouring slices are fetched before they are asked for.
    wait_until(
        page,
        lambda: sum("/rendered" in u for u in page.requests) >= 8,
        "prefetch of neighbouring slices",
    )
    box = page.page.locator("#canvas").bounding_box()
    page.page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.page.mouse.wheel(0, 100)
    after_wheel = wait_until(
        page, lambda: (c := canvas(page))["slice"] != "0" and c["variance"] > 10 and c, "a wheel"
    )
    assert int(after_wheel["slice"]) >= 1
    wait_until(page, lambda: canvas(page)["hash"] != first["hash"], "a different image")
    assert "Image 1 /" not in page.page.locator("#ov-bl").inner_text()

    # Keyboard: the image has focus after the wheel/pointer; End goes to the last slice.
    page.page.locator("#viewport").focus()
    page.page.keyboard.press("End")
    wait_until(page, lambda: canvas(page)["slice"] == str(CT_SLICES - 1), "End key")
    page.page.keyboard.press("ArrowUp")
    wait_until(page, lambda: canvas(page)["slice"] == str(CT_SLICES - 2), "ArrowUp key")
    page.page.keyboard.press("Home")
    wait_until(page, lambda: canvas(page)["slice"] == "0", "Home key")

    # Drag with the scroll tool (the default): 8 px per slice.
    x, y = box["x"] + box["width"] / 2, box["y"] + 100
    page.page.mouse.move(x, y)
    page.page.mouse.down()
    page.page.mouse.move(x, y + 45, steps=5)
    page.page.mouse.up()
    wait_until(page, lambda: canvas(page)["slice"] == "5", "drag scroll to slice 5")
    shot(site, page, "study-ct-scrolled")
    assert page.problems == []


def test_window_presets_change_the_pixels(site: Site, page: Page) -> None:
    stored = open_study(site, page)
    seen = {stored["hash"]}
    for name, window, label in (
        ("lung", "-600,1500", "W 1500 L -600"),
        ("bone", "400,1800", "W 1800 L 400"),
        ("brain", "40,80", "W 80 L 40"),
    ):
        page.page.select_option("#preset", name)
        now = wait_until(
            page, lambda w=window: (c := canvas(page))["window"] == w and c, f"{name} preset"
        )
        assert now["hash"] not in seen, name
        seen.add(now["hash"])
        assert label in page.page.locator("#ov-bl").inner_text()
        assert any(f"window={window.replace(',', '%2C')}" in u for u in page.requests), name
        if name == "lung":
            shot(site, page, "study-ct-lung")
    # Key 4 is the abdomen preset; 0 goes back to the stored window.
    page.page.locator("#viewport").focus()
    page.page.keyboard.press("4")
    wait_until(page, lambda: canvas(page)["window"] == "50,400", "abdomen preset key")
    page.page.keyboard.press("0")
    back = wait_until(page, lambda: (c := canvas(page))["window"] == "stored" and c, "stored")
    assert back["hash"] == stored["hash"]

    # Dragging with the window tool: a preview while dragging, the server's rendering
    # of the new window after release.
    page.page.click("button[data-tool='window']")
    box = page.page.locator("#canvas").bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.page.mouse.move(x, y)
    page.page.mouse.down()
    page.page.mouse.move(x - 100, y + 40, steps=4)
    preview = canvas(page)
    assert preview["hash"] != stored["hash"]
    page.page.mouse.up()
    dragged = wait_until(
        page, lambda: (c := canvas(page))["window"] not in ("stored", "50,400") and c, "drag"
    )
    center, width = (float(v) for v in dragged["window"].split(","))
    assert width < 400 and center > 40  # narrower (left) and higher level (down)
    assert page.page.input_value("#preset") == "custom"
    assert page.problems == []


def _markers(png: bytes) -> tuple[tuple[float, float], tuple[float, float]]:
    """Centres (canvas pixels) of the two bright markers above the body."""
    gray = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.int32)
    ys, xs = np.nonzero(gray >= 240)
    top = ys.min()
    band = ys <= top + 15  # the markers are the topmost bright things; the body is far below
    ys, xs = ys[band], xs[band]
    middle = (xs.min() + xs.max()) / 2
    left, right = xs < middle, xs >= middle
    return (
        (xs[left].mean() + 0.5, ys[left].mean() + 0.5),
        (xs[right].mean() + 0.5, ys[right].mean() + 0.5),
    )


def test_measurement_uses_pixel_spacing(site: Site, page: Page) -> None:
    open_study(site, page)
    # The canvas' own pixels (a screenshot would include the HTML overlays); the page
    # has a device pixel ratio of 1, so canvas pixels are CSS pixels.
    data_url = page.page.evaluate("document.getElementById('canvas').toDataURL('image/png')")
    a, b = _markers(base64.b64decode(data_url.split(",", 1)[1]))
    box = page.page.locator("#canvas").bounding_box()
    page.page.click("button[data-tool='measure']")
    page.page.mouse.move(box["x"] + a[0], box["y"] + a[1])
    page.page.mouse.down()
    page.page.mouse.move(box["x"] + b[0], box["y"] + b[1], steps=6)
    page.page.mouse.up()
    text = wait_until(
        page, lambda: page.page.locator("#ov-br").get_attribute("data-length"), "a length"
    )
    match = re.fullmatch(r"([\d.]+) mm", text)
    assert match, text
    # 80 columns of 0.4 mm; with rows and columns swapped it would read 48 mm.
    assert abs(float(match.group(1)) - MARKER_DISTANCE_MM) <= 0.3, text
    assert f"Length {text}" in page.page.locator("#ov-br").inner_text()
    shot(site, page, "study-ct-measure")
    page.page.keyboard.press("Delete")
    wait_until(
        page, lambda: page.page.locator("#ov-br").get_attribute("data-length") == "", "clear"
    )
    assert page.problems == []


def test_korean_by_browser_default_and_switch(site: Site) -> None:
    context, page = new_page(site, locale="ko-KR")
    try:
        open_study(site, page)
        assert page.page.evaluate("document.documentElement.lang") == "ko"
        assert page.page.locator("button[data-tool='scroll']").inner_text() == "스크롤"
        assert f"영상 1 / {CT_SLICES}" in page.page.locator("#ov-bl").inner_text()
        assert "환자" in page.page.locator("#attr-list").inner_text()
        assert "홍 길동" in page.page.locator("#study-title").inner_text()
        assert (
            page.page.locator(".series-item small")
            .first.inner_text()
            .endswith(f"영상 {CT_SLICES}장")
        )
        shot(site, page, "study-ct-korean")
        page.page.select_option("#lang", "en")
        wait_until(
            page,
            lambda: page.page.locator("button[data-tool='scroll']").inner_text() == "Scroll",
            "English",
        )
        assert f"Image 1 / {CT_SLICES}" in page.page.locator("#ov-bl").inner_text()
        # The choice is remembered over the browser's preference.
        page.page.reload()
        page.page.wait_for_selector("#canvas[data-ready='true']")
        assert page.page.evaluate("document.documentElement.lang") == "en"
        assert page.problems == []
    finally:
        context.close()


def test_lossy_flag_on_jpeg_baseline(site: Site, page: Page) -> None:
    open_study(site, page)
    assert page.page.locator("#lossy").is_hidden()
    assert page.page.locator("#notice").is_hidden()
    page.page.click(f"[data-series='{site.study.jpeg_series}']")
    wait_until(
        page, lambda: canvas(page)["sop"] and page.page.locator("#lossy").is_visible(), "flag"
    )
    assert page.page.locator("#lossy").inner_text() == "LOSSY"
    assert "not for primary diagnosis" in page.page.locator("#notice").inner_text()
    assert "1.2.840.10008.1.2.4.50" in page.page.locator("#attr-list").inner_text()
    wait_until(page, lambda: canvas(page)["variance"] > 10, "the JPEG image drawn")
    shot(site, page, "study-jpeg-lossy")
    page.page.click(f"[data-series='{site.study.ct_series}']")
    wait_until(page, lambda: page.page.locator("#lossy").is_hidden(), "flag gone on CT")
    assert page.page.locator("#notice").is_hidden()
    assert page.problems == []


def test_reports_sr_text_and_pdf(site: Site, page: Page) -> None:
    open_study(site, page)
    page.page.click(f"[data-series='{site.study.sr_series}']")
    report = page.page.locator("#document .report")
    report.wait_for()
    text = report.inner_text()
    assert "Diagnostic Imaging Report" in text
    assert "Findings" in text and FINDING in text
    assert "Impressions" in text and IMPRESSION in text
    assert "not verified" in text
    assert page.page.locator("#preset").is_hidden()  # no image tools for a report
    assert page.page.locator("#toggle-info").count() == 1
    shot(site, page, "report-sr")
    # The PDF comes through its BulkDataURI (it is larger than the inline threshold).
    with page.page.expect_response(lambda r: "/bulk/00420011" in r.url) as bulk:
        page.page.click(f"[data-series='{site.study.pdf_series}']")
    assert bulk.value.status == 200 and b"%PDF-1.4" in bulk.value.body()
    frame = page.page.locator("#document iframe")
    frame.wait_for()
    assert frame.get_attribute("src").startswith("blob:")
    link = page.page.locator("#document .pdf a")
    assert link.get_attribute("download").endswith(".pdf")
    assert link.inner_text() == "Download the PDF"
    page.page.wait_for_timeout(1000)  # let Chromium's PDF viewer paint for the screenshot
    shot(site, page, "report-pdf")
    assert page.problems == []


def test_phone_viewport(site: Site) -> None:
    context, page = new_page(
        site,
        viewport={"width": 390, "height": 844},
        device_scale_factor=2,
        is_mobile=True,
        has_touch=True,
    )
    try:
        open_study(site, page)
        layout = page.page.evaluate(
            """() => {
              const r = (s) => document.querySelector(s).getBoundingClientRect();
              return {scroll: document.documentElement.scrollWidth, canvas: r('#canvas'),
                      series: r('.series'), toolbar: r('#toolbar')};
            }"""
        )
        assert layout["scroll"] <= 390  # no sideways scrolling of the page
        assert layout["canvas"]["width"] >= 380 and layout["canvas"]["height"] >= 400
        assert layout["series"]["top"] >= layout["canvas"]["bottom"] - 1  # strip below image
        # Tapping a tool and a series works with touch.
        page.page.tap("button[data-tool='measure']")
        assert page.page.get_attribute("button[data-tool='measure']", "aria-pressed") == "true"
        page.page.tap(f"[data-series='{site.study.sr_series}']")
        page.page.locator("#document .report").wait_for()
        page.page.tap(f"[data-series='{site.study.ct_series}']")
        wait_until(page, lambda: canvas(page)["variance"] > 10, "CT again")
        # Two fingers spreading apart zoom in (touch pointer events, as a phone sends).
        zoom = page.page.evaluate(
            """() => {
              const c = document.getElementById('canvas');
              const box = c.getBoundingClientRect();
              const cx = box.left + box.width / 2, cy = box.top + box.height / 2;
              const fire = (type, id, x) => c.dispatchEvent(new PointerEvent(type, {
                pointerId: id, pointerType: 'touch', clientX: x, clientY: cy,
                bubbles: true, cancelable: true, isPrimary: id === 1}));
              fire('pointerdown', 1, cx - 40); fire('pointerdown', 2, cx + 40);
              fire('pointermove', 1, cx - 80); fire('pointermove', 2, cx + 80);
              fire('pointerup', 1, cx - 80); fire('pointerup', 2, cx + 80);
              return document.querySelector('#ov-bl .zoom').textContent;
            }"""
        )
        assert zoom == "Zoom 2.0\u00d7", zoom  # the multiplication sign
        shot(site, page, "phone")
        assert page.problems == []
    finally:
        context.close()


def test_states(site: Site, page: Page) -> None:
    # No valid access token (unknown, expired or revoked: the server answers 401):
    # "access ended", and no image is shown.
    context, refused = new_page(site)
    try:
        sign_in(refused, "sbat_" + "x" * 43)
        refused.page.goto(site.viewer_url(site.study.study_uid))
        refused.page.wait_for_selector("#state[data-state='unauthorized']")
        assert refused.page.locator("#viewer").is_hidden()
        shot(site, refused, "state-unauthorized")
    finally:
        context.close()
    sign_in(page, site.token)
    # A study not (yet) in the archive: "still arriving", and the page keeps asking.
    page.page.goto(site.viewer_url("1.2.826.0.1.3680043.10.1234.999"))
    page.page.wait_for_selector("#state[data-state='arriving']")
    assert "still arriving" in page.page.locator("#state").inner_text()
    assert page.page.locator("#viewer").is_hidden()
    shot(site, page, "state-arriving")
    # The server goes away: network errors become "server unavailable" with a retry.
    page.page.route("**/dicom-web/**", lambda route: route.abort("connectionrefused"))
    page.page.goto(site.viewer_url(site.study.study_uid))
    page.page.wait_for_selector("#state[data-state='unavailable']")
    assert page.page.locator("#viewer").is_hidden() and page.page.locator("#toolbar").is_hidden()
    assert page.page.evaluate("document.activeElement.textContent") == "Try again"
    shot(site, page, "state-unavailable")
    page.page.unroute("**/dicom-web/**")
    page.page.click("#state button")
    page.page.wait_for_selector("#canvas[data-ready='true']")
    page.problems.clear()  # the refused requests above were logged as failures on purpose
    # The share-link refusals draw through the same module.
    page.page.evaluate(
        """async () => {
          const {showState} = await import('./static/js/states.js');
          showState(document.getElementById('state'), 'wrong-code', {params: {remaining: 2}});
        }"""
    )
    assert "Tries left: 2." in page.page.locator("#state").inner_text()
    for name, words in (
        ("expired", "expired"),
        ("revoked", "revoked"),
        ("locked", "locked"),
        ("used", "already used"),
    ):
        page.page.evaluate(
            f"""async () => {{
              const {{showState}} = await import('./static/js/states.js');
              showState(document.getElementById('state'), '{name}');
            }}"""
        )
        assert words in page.page.locator("#state").inner_text().lower(), name
    assert page.problems == []


def test_keyboard_only(site: Site, page: Page) -> None:
    """Everything reachable with Tab, worked with Enter/Space and keys; no mouse."""
    open_study(site, page)

    def tab_to(selector: str, limit: int = 40) -> None:
        for _ in range(limit):
            page.page.keyboard.press("Tab")
            if page.page.evaluate(f"document.activeElement.matches({selector!r})"):
                return
        raise AssertionError(f"Tab never reached {selector}")

    page.page.keyboard.press("Tab")  # the skip link comes first
    assert page.page.evaluate("document.activeElement.classList.contains('skip')")
    page.page.keyboard.press("Enter")  # ... and jumps to the image
    assert page.page.evaluate("document.activeElement.id") == "viewport"
    assert site.study.study_uid in page.page.url  # the fragment still names the study
    page.page.keyboard.press("PageDown")
    wait_until(page, lambda: canvas(page)["slice"] == "10", "PageDown")
    tab_to("button[data-tool='measure']")
    page.page.keyboard.press("Enter")
    assert page.page.get_attribute("button[data-tool='measure']", "aria-pressed") == "true"
    tab_to(f"[data-series='{site.study.jpeg_series}']")
    page.page.keyboard.press("Enter")
    wait_until(page, lambda: page.page.locator("#lossy").is_visible(), "JPEG series by keyboard")
    tab_to(f"[data-series='{site.study.sr_series}']")
    page.page.keyboard.press(" ")
    page.page.locator("#document .report").wait_for()
    assert page.problems == []
