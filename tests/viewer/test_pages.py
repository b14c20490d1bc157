"""The viewer's pages as served: files, configuration and browser security headers."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import pytest
from starlette.testclient import TestClient

from gateway.config import Settings
from viewer import pages

pytestmark = pytest.mark.fast


@pytest.fixture
def client(tmp_path) -> TestClient:
    settings = Settings(data_dir=tmp_path, dicomweb_prefix="/dicom-web")
    return TestClient(pages.create_app(settings))


def _csp(value: str) -> dict[str, list[str]]:
    out = {}
    for directive in value.split(";"):
        name, *sources = directive.split()
        out[name] = sources
    return out


@pytest.mark.parametrize("path", ["/", "/share"])
def test_page_is_served_with_strict_headers(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["x-frame-options"] == "DENY"
    csp = _csp(response.headers["content-security-policy"])
    assert csp["default-src"] == ["'none'"]
    assert csp["script-src"] == ["'self'"]
    assert csp["style-src"] == ["'self'"]
    assert csp["connect-src"] == ["'self'"]
    assert csp["object-src"] == ["'none'"]
    assert csp["frame-ancestors"] == ["'none'"]
    assert csp["base-uri"] == ["'none'"]
    assert not any("unsafe" in s for sources in csp.values() for s in sources)


class _Inline(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.problems: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):  # type: ignore[no-untyped-def]
        names = dict(attrs)
        if tag == "script":
            self._in_script = True
            if "src" not in names:
                self.problems.append("inline <script>")
        if "style" in names:
            self.problems.append(f"style attribute on <{tag}>")
        self.problems += [f"{n} handler on <{tag}>" for n in names if n.startswith("on")]
        if tag == "style":
            self.problems.append("<style> element")

    def handle_endtag(self, tag):  # type: ignore[no-untyped-def]
        if tag == "script":
            self._in_script = False

    def handle_data(self, data):  # type: ignore[no-untyped-def]
        if self._in_script and data.strip():
            self.problems.append("script body")


@pytest.mark.parametrize("path", ["/", "/signin", "/portal", "/inbox", "/share"])
def test_page_has_no_inline_script_or_style(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 200
    assert response.headers["referrer-policy"] == "no-referrer"
    assert "script-src 'self';" in response.headers["content-security-policy"]
    parser = _Inline()
    parser.feed(response.text)
    assert parser.problems == []


def test_share_page_is_static_and_not_cached(client: TestClient) -> None:
    """A link is /viewer/share#sbl_...: the page never sees the token, holds nothing
    of a link, and is kept in no cache."""
    first = client.get("/share")
    assert first.headers["cache-control"] == "no-store"
    assert first.headers["referrer-policy"] == "no-referrer"
    assert "sbl_" not in first.text
    assert client.get("/share?x=1").text == first.text


def test_static_files_and_config(client: TestClient) -> None:
    js = client.get("/static/js/main.js")
    assert js.status_code == 200
    assert js.headers["content-type"].split(";")[0] in ("text/javascript", "application/javascript")
    assert js.headers["cache-control"] == "no-cache"
    assert "etag" in js.headers
    assert client.get("/static/css/viewer.css").headers["content-type"].startswith("text/css")
    config = client.get("/config.json").json()
    assert config == {"dicomweb": "/dicom-web", "languages": ["en", "ko"]}
    assert client.get("/static/../pages.py").status_code == 404
    assert client.get("/static/js/missing.js").status_code == 404


def test_language_catalogues_have_the_same_keys_and_placeholders() -> None:
    catalogues = {
        lang: json.loads((pages.STATIC / "i18n" / f"{lang}.json").read_text("utf-8"))
        for lang in pages.LANGUAGES
    }
    english = catalogues["en"]

    def base(key: str) -> str:  # plural forms (.one, .other) count as one key
        return re.sub(r"\.(zero|one|two|few|many|other)$", "", key)

    for lang, catalogue in catalogues.items():
        assert {base(k) for k in catalogue} == {base(k) for k in english}, lang
        for key, text in catalogue.items():
            reference = english.get(key) or english[base(key) + ".other"]
            assert set(re.findall(r"{\w+}", text)) == set(re.findall(r"{\w+}", reference)), (
                lang,
                key,
            )


def test_every_translated_key_exists() -> None:
    """Keys used by the page and its modules are in the English catalogue."""
    english = json.loads((pages.STATIC / "i18n" / "en.json").read_text("utf-8"))
    plural_bases = {k.rsplit(".", 1)[0] for k in english if k.endswith(".other")}
    used: set[str] = set()
    for page in pages.STATIC.glob("*.html"):
        html = page.read_text("utf-8")
        used |= set(re.findall(r'data-i18n(?:-title|-label)?="([^"]+)"', html))
    for module in (pages.STATIC / "js").glob("*.js"):
        code = module.read_text("utf-8")
        used |= set(re.findall(r'\bt\("([\w.-]+)"', code))
        used |= {k for k in re.findall(r'\btn\("([\w.-]+)"', code)}
    states = re.search(
        r"export const STATES = \[(.*?)\]", (pages.STATIC / "js/states.js").read_text(), re.S
    )
    assert states is not None
    for name in re.findall(r'"([\w-]+)"', states.group(1)):
        used |= {f"state.{name}.title", f"state.{name}.message"}
    missing = {k for k in used if k not in english and k not in plural_bases}
    assert missing == set()
