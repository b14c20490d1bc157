"""How soon does a study show in the browser? studybridge's viewer against OHIF.

What it measures
----------------
One synthetic CT study of ``--slices`` (default 250) 512x512 16-bit slices (the
corpus of bench/ingest.py, cached in bench/out/) is imported into a fresh
``studybridge serve`` on 127.0.0.1. Debian's Chromium (headless, Playwright) then
opens it ``--repeat`` times (default 5), each time in a fresh browser context (empty
cache, as a person opening a share link):

1. Time to first image through a real share link: the study's patient (an account
   linked to the corpus's Patient ID) creates a link with an access code through the
   portal API; each open goes to ``/viewer/share#sbl_...``, types the code and
   submits it, and the clock runs from the submit to the first animation frame whose
   canvas on the viewer page shows a non-blank image (pixel variance > 10): the link
   exchange, the redirect to the viewer, its queries and the first rendered frame.
   Both ends are read inside the pages (``performance.timeOrigin + now()``, the
   submit instant kept in sessionStorage across the navigation). The first open is
   the cold one (the server builds its series metadata cache); the median of the
   rest is the figure compared with the target (issue #7: under 1 s on loopback).
2. Scrolling: ArrowDown through every slice, waiting for each to be drawn; slices
   per second and p50/p95 time per slice (prefetch keeps neighbours ready).
3. The same first-image measurement for OHIF 3 (``scripts/ohif.sh`` installs its
   dist; skipped when absent), served from a second local port and pointed at the
   same DICOMweb base, from its navigation start, and the ratio OHIF / studybridge.
   OHIF reads anonymously: the server runs in the ``demo`` profile (environment, so
   no demo data is seeded), which serves requests without a token; the share link's
   access token is checked as in any profile.

Run: ``python bench/viewer.py [--slices 250] [--repeat 5] [--no-ohif] [--json out]``
"""

from __future__ import annotations

import argparse
import functools
import http.server
import io
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent


def _bench_dir_last() -> None:
    # This file is named like the ``viewer`` package: keep the bench folder behind the
    # repository on sys.path, so packages resolve and ``_common``/``ingest`` still do.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != BENCH_DIR]
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    sys.path.append(str(BENCH_DIR))


_bench_dir_last()
from _common import LOOPBACK, Processes, free_port, percentile, wait_for_port  # noqa: E402
from ingest import cpu_model, git_head, make_ct_corpus  # noqa: E402

_bench_dir_last()

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync"]
OHIF_VERSION = "3.13.2"  # as scripts/ohif.sh
TARGET_S = 1.0

# Resolves with performance.now() at the first animation frame where one of the
# canvases matching `selector` holds a non-blank image.
_FIRST_IMAGE = """([selector, timeout]) => new Promise((resolve, reject) => {
  const started = performance.now();
  const check = () => {
    for (const c of document.querySelectorAll(selector)) {
      if (c.width < 64 || c.height < 64) continue;
      const ctx = c.getContext('2d');
      if (!ctx) continue;
      const d = ctx.getImageData(0, 0, c.width, c.height).data;
      let n = 0, s = 0, s2 = 0;
      for (let i = 0; i < d.length; i += 16) { const v = d[i]; n++; s += v; s2 += v * v; }
      const mean = s / n;
      if (s2 / n - mean * mean > 10) return resolve(performance.now());
    }
    if (performance.now() - started > timeout) return reject(new Error('no image'));
    requestAnimationFrame(check);
  };
  check();
})"""


def _ohif_dist() -> Path | None:
    cache = Path(os.environ.get("STUDYBRIDGE_OHIF_CACHE", Path.home() / ".cache/studybridge/ohif"))
    dist = cache / OHIF_VERSION / "dist"
    return dist if (dist / "index.html").is_file() else None


class _OHIFHandler(http.server.SimpleHTTPRequestHandler):
    extensions_map = {
        **http.server.SimpleHTTPRequestHandler.extensions_map,
        ".js": "text/javascript",
        ".mjs": "text/javascript",
        ".wasm": "application/wasm",
    }
    config_js = b""

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def end_headers(self) -> None:
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        super().end_headers()

    def send_head(self):  # type: ignore[no-untyped-def]
        path = self.path.split("?", 1)[0]
        if path == "/app-config.js":
            self.send_response(200)
            self.send_header("Content-Type", "text/javascript")
            self.send_header("Content-Length", str(len(self.config_js)))
            self.end_headers()
            return io.BytesIO(self.config_js)
        last = path.rsplit("/", 1)[-1]
        if path != "/" and "." not in last and not Path(self.translate_path(path)).is_file():
            self.path = "/index.html"
        return super().send_head()


def _ohif_site(dist: Path, dicomweb: str) -> tuple[http.server.ThreadingHTTPServer, str]:
    source = {
        "name": "studybridge",
        "qidoRoot": dicomweb,
        "wadoRoot": dicomweb,
        "wadoUriRoot": dicomweb + "/wado",
        "qidoSupportsIncludeField": True,
        "imageRendering": "wadors",
        "thumbnailRendering": "wadors",
        "enableStudyLazyLoad": True,
        "bulkDataURI": {"enabled": True},
        "omitQuotationForMultipartRequest": True,
    }
    config = {
        "routerBasename": "/",
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
    handler = type(
        "Handler",
        (_OHIFHandler,),
        {"config_js": ("window.config = " + json.dumps(config) + ";\n").encode()},
    )
    port = free_port()
    server = http.server.ThreadingHTTPServer(
        (LOOPBACK, port), functools.partial(handler, directory=str(dist))
    )
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://{LOOPBACK}:{port}"


def first_image(browser: Any, url: str, selector: str, timeout_ms: int = 60_000) -> float:
    """Seconds from navigation start to the first non-blank canvas, in a fresh context."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    try:
        page = context.new_page()
        page.goto(url, wait_until="commit")
        ms = page.evaluate(_FIRST_IMAGE, [selector, timeout_ms])
        return ms / 1000.0
    finally:
        context.close()


ACCESS_CODE = "4711"
_MARK_SUBMIT = """() => document.getElementById('code-form').addEventListener('submit', () =>
  sessionStorage.setItem('bench.submit', String(performance.timeOrigin + performance.now())),
  {capture: true})"""


def open_share_link(page: Any, link: str) -> None:
    """Open a share link and submit its access code; returns once the viewer shows."""
    page.goto(link)
    page.wait_for_selector("#code-form:not([hidden])", timeout=60_000)
    page.evaluate(_MARK_SUBMIT)
    page.fill("#code", ACCESS_CODE)
    page.press("#code", "Enter")
    page.wait_for_url("**/viewer/#study=*", wait_until="commit", timeout=60_000)


def share_first_image(browser: Any, link: str, timeout_ms: int = 60_000) -> float:
    """Seconds from submitting the access code to the first non-blank canvas of the
    viewer, in a fresh context (nothing stored, as on the recipient's computer)."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    try:
        page = context.new_page()
        open_share_link(page, link)
        shown = page.evaluate(_FIRST_IMAGE, ["#canvas", timeout_ms])
        submitted = float(page.evaluate("() => sessionStorage.getItem('bench.submit')"))
        return (page.evaluate("() => performance.timeOrigin") + shown - submitted) / 1000.0
    finally:
        context.close()


def patient_link(data: Path, base: str, patient_id: str, issuer: str, study: str) -> str:
    """The corpus's patient signs in and shares the study with an access code."""
    import httpx

    from consent.accounts import set_password
    from consent.audit import Auditor
    from consent.patients import link_patient
    from consent.principals import Kind, add_user, user_principal
    from gateway.archive import Archive
    from gateway.config import Settings

    archive = Archive.open(Settings(data_dir=data))
    auditor = Auditor(archive.db)
    try:
        account = add_user(archive.db, "bench-patient", Kind.PATIENT)
        operator = add_user(archive.db, "bench-operator", Kind.OPERATOR)
        set_password(archive.db, "bench-patient", "bench-password-1")
        link_patient(
            archive.db, auditor, account_id=account, issuer=issuer, patient_id=patient_id,
            by=user_principal(archive.db, operator), evidence="synthetic bench patient",
        )  # fmt: skip
    finally:
        auditor.close()
        archive.close()
    signed = httpx.post(
        f"{base}/api/session",
        json={"username": "bench-patient", "password": "bench-password-1"},
        timeout=60,
    )
    signed.raise_for_status()
    created = httpx.post(
        f"{base}/api/me/links",
        json={"study_uids": [study], "access_code": ACCESS_CODE},
        headers={"Authorization": f"Bearer {signed.json()['access_token']}"},
        timeout=60,
    )
    created.raise_for_status()
    return str(created.json()["url"])


def scroll_through(browser: Any, link: str, slices: int) -> list[float]:
    """Seconds per slice stepping with ArrowDown, each waited for until drawn."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    try:
        page = context.new_page()
        open_share_link(page, link)
        page.wait_for_selector("#canvas[data-ready='true']", timeout=60_000)
        page.locator("#viewport").focus()
        page.wait_for_timeout(500)  # the first prefetch round, as a reader would pause
        times = []
        for i in range(1, slices):
            t0 = time.perf_counter()
            page.keyboard.press("ArrowDown")
            page.wait_for_function(
                # A function, not a string to evaluate: the page's CSP forbids eval.
                f"() => document.getElementById('canvas').dataset.slice === '{i}'",
                polling="raf",
            )
            times.append(time.perf_counter() - t0)
        return times
    finally:
        context.close()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--slices", type=int, default=250)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-ohif", action="store_true")
    parser.add_argument("--cache-dir", type=Path, default=BENCH_DIR / "out")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    files = make_ct_corpus(args.cache_dir / f"ct-512-{args.slices}", args.slices)
    import pydicom

    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    study, patient_id = first.StudyInstanceUID, first.PatientID
    results: dict[str, Any] = {
        "slices": args.slices,
        "git": git_head(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
    }
    # The demo profile (by environment: nothing seeded) lets OHIF read anonymously;
    # our viewer goes through the share link and its access token all the same.
    env = {**os.environ, "PYTHONPATH": str(REPO), "STUDYBRIDGE_PROFILE": "demo"}
    issuer = "BENCH"
    with tempfile.TemporaryDirectory(prefix="bench-viewer-") as tmp, Processes() as procs:
        data = Path(tmp) / "var"
        log = Path(tmp) / "serve.log"
        cli = [sys.executable, "-m", "gateway.cli"]
        import subprocess

        t0 = time.perf_counter()
        subprocess.run(
            [*cli, "import", str(files[0].parent), "--data-dir", str(data), "--issuer", issuer],
            check=True, env=env, cwd=REPO, capture_output=True,
        )  # fmt: skip
        print(f"imported {args.slices} slices in {time.perf_counter() - t0:.1f} s", flush=True)
        http_port, dimse_port = free_port(), free_port()
        proc = procs.start(
            [*cli, "serve", "--data-dir", str(data), "--http-port", str(http_port),
             "--dimse-port", str(dimse_port)],
            log=log, env=env, cwd=REPO,
        )  # fmt: skip
        wait_for_port(http_port, proc, 60, log)
        base = f"http://{LOOPBACK}:{http_port}"
        link = patient_link(data, base, patient_id, issuer, study)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(
                executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
            )
            try:
                ours = [share_first_image(browser, link) for _ in range(args.repeat)]
                print(
                    "studybridge share link, access code submitted to first image (s):",
                    " ".join(f"{t:.3f}" for t in ours),
                )
                warm = ours[1:] or ours
                results["viewer_first_image_cold_s"] = ours[0]
                results["viewer_first_image_median_s"] = statistics.median(warm)
                steps = scroll_through(browser, link, min(args.slices, 250))
                results["scroll_slices_per_s"] = len(steps) / sum(steps)
                results["scroll_p50_ms"] = percentile(steps, 50) * 1000
                results["scroll_p95_ms"] = percentile(steps, 95) * 1000
                dist = None if args.no_ohif else _ohif_dist()
                if dist is None:
                    print("OHIF: not measured (run scripts/ohif.sh, or --no-ohif given)")
                else:
                    server, site = _ohif_site(dist, f"{base}/dicom-web")
                    try:
                        url = f"{site}/viewer?StudyInstanceUIDs={study}"
                        theirs = [
                            first_image(browser, url, "canvas.cornerstone-canvas")
                            for _ in range(args.repeat)
                        ]
                    finally:
                        server.shutdown()
                    print("OHIF, first image (s):", " ".join(f"{t:.3f}" for t in theirs))
                    results["ohif_first_image_median_s"] = statistics.median(theirs[1:] or theirs)
            finally:
                browser.close()
    median = results["viewer_first_image_median_s"]
    print()
    print(
        f"{args.slices}-slice CT 512x512, {results['cores']} cores ({results['cpu']}), git {results['git']}"
    )
    print("  share link opened, from submitting the access code to the first image:")
    print(f"  first image, cold server     {results['viewer_first_image_cold_s']:.3f} s")
    verdict = "meets" if median < TARGET_S else "MISSES"
    print(
        f"  first image, median of rest  {median:.3f} s   ({verdict} the {TARGET_S:.0f} s target)"
    )
    print(
        f"  scrolling                    {results['scroll_slices_per_s']:.1f} slices/s "
        f"(p50 {results['scroll_p50_ms']:.0f} ms, p95 {results['scroll_p95_ms']:.0f} ms per slice)"
    )
    if "ohif_first_image_median_s" in results:
        ohif = results["ohif_first_image_median_s"]
        print(
            f"  OHIF {OHIF_VERSION} first image      {ohif:.3f} s   (OHIF / studybridge = {ohif / median:.2f})"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
