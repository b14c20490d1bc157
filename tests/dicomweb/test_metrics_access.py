"""Who may read /metrics: a client on this machine, or the holder of the scrape token."""

from __future__ import annotations

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from dicomweb.app import create_app
from gateway.config import Settings
from tests.dicomweb.conftest import LiveServer

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("backend", ["sqlite"])
def test_metrics_on_this_machine_without_a_token(live_server: LiveServer):
    url = f"{live_server.url}/metrics"
    local = httpx.get(url)
    assert local.status_code == 200 and "studybridge_" in local.text
    # Through a proxy (even one on this machine) it is not for the caller.
    for header in ("X-Forwarded-For", "Forwarded", "X-Real-IP"):
        proxied = httpx.get(url, headers={header: "203.0.113.7"})
        assert proxied.status_code == 403, header
        assert "metrics_token" in proxied.json()["message"]
        assert "studybridge_" not in proxied.text


@pytest.mark.parametrize("backend", ["sqlite"])
def test_metrics_with_a_token(live_server: LiveServer):
    token = "scrape-9f2c1e7d0b"
    live_server.settings.metrics_token = SecretStr(token)
    url = f"{live_server.url}/metrics"
    try:
        assert httpx.get(url).status_code == 401
        wrong = httpx.get(url, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        assert wrong.headers["www-authenticate"].startswith("Bearer")
        assert token not in wrong.text
        good = httpx.get(url, headers={"Authorization": f"Bearer {token}"})
        assert good.status_code == 200 and "studybridge_" in good.text
        proxied = httpx.get(
            url, headers={"Authorization": f"Bearer {token}", "X-Forwarded-For": "203.0.113.7"}
        )
        assert proxied.status_code == 200  # the token is what counts, wherever it comes from
    finally:
        live_server.settings.metrics_token = SecretStr("")


def test_metrics_refused_to_a_remote_client(tmp_path):
    """A client that is not on this machine (the test client's address) gets 403."""
    app = create_app(Settings(data_dir=tmp_path / "var"))
    with TestClient(app, client=("198.51.100.4", 5555)) as client:
        refused = client.get("/metrics")
        assert refused.status_code == 403
        assert client.get("/healthz").status_code == 200
