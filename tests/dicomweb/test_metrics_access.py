"""Who may read /metrics: a client on this machine, an operator, or the scrape token.

The app is served here without the live server's default institution token, so a
request carries exactly the credentials the test gives it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from consent.principals import Kind, add_user
from consent.tokens import issue_for_user
from dicomweb.app import create_app
from gateway.archive import Archive
from gateway.config import Settings
from tests.dicomweb.conftest import _serve

pytestmark = [pytest.mark.integration, pytest.mark.production]
REMOTE = {"X-Forwarded-For": "203.0.113.7"}


@dataclass
class Served:
    url: str
    settings: Settings
    archive: Archive


@pytest.fixture
def served(settings: Settings, archive: Archive) -> Iterator[Served]:
    server, thread, port = _serve(create_app(settings, archive))
    try:
        yield Served(f"http://127.0.0.1:{port}/metrics", settings, archive)
    finally:
        server.should_exit = True
        thread.join(10)


def test_metrics_on_this_machine_without_a_token(served: Served):
    local = httpx.get(served.url)
    assert local.status_code == 200 and "studybridge_" in local.text
    # Through a proxy (even one on this machine) it is not for the caller.
    for header in ("X-Forwarded-For", "Forwarded", "X-Real-IP"):
        proxied = httpx.get(served.url, headers={header: "203.0.113.7"})
        assert proxied.status_code == 403, header
        assert "metrics_token" in proxied.json()["message"]
        assert "studybridge_" not in proxied.text


def test_metrics_with_the_scrape_token(served: Served):
    token = "scrape-9f2c1e7d0b"
    served.settings.metrics_token = SecretStr(token)
    assert httpx.get(served.url).status_code == 401  # even from this machine
    wrong = httpx.get(served.url, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert wrong.headers["www-authenticate"].startswith("Bearer")
    good = httpx.get(served.url, headers={**REMOTE, "Authorization": f"Bearer {token}"})
    assert good.status_code == 200 and "studybridge_" in good.text


def test_metrics_for_operators_only(served: Served):
    """An operator's access token opens /metrics from anywhere; another's does not."""
    db = served.archive.db
    operator = issue_for_user(db, add_user(db, "op", Kind.OPERATOR), dt.timedelta(hours=1))
    patient = issue_for_user(db, add_user(db, "pat", Kind.PATIENT), dt.timedelta(hours=1))
    served.settings.metrics_token = SecretStr("scrape-4a1b")
    ok = httpx.get(served.url, headers={**REMOTE, "Authorization": f"Bearer {operator.token}"})
    assert ok.status_code == 200 and "studybridge_" in ok.text
    other = httpx.get(served.url, headers={"Authorization": f"Bearer {patient.token}"})
    assert other.status_code == 403
    bad = httpx.get(served.url, headers={"Authorization": "Bearer sbat_not-a-token"})
    assert bad.status_code == 401 and "sbat_not-a-token" not in bad.text


def test_metrics_refused_to_a_remote_client(tmp_path):
    """A client that is not on this machine gets 403; health checks stay open."""
    app = create_app(Settings(data_dir=tmp_path / "var"))
    with TestClient(app, client=("198.51.100.4", 5555)) as client:
        assert client.get("/metrics").status_code == 403
        assert client.get("/healthz").status_code == 200
