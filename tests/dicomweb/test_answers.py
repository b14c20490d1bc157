"""The portal API's answers are documented in /openapi.json (dicomweb.answers); the
routes' own tests (test_portal, test_sessions, test_inbox_links) check that the answers
keep their shapes through the models."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from dicomweb.app import create_app
from gateway.archive import Archive
from gateway.config import Settings

# (method, path) -> the model its 200/201 answer is documented with ("[]": a list of it).
DOCUMENTED = {
    ("post", "/api/session"): "TokenAnswer",
    ("post", "/api/session/browser"): "BrowserSignedIn",
    ("get", "/api/session/browser"): "BrowserSession",
    ("delete", "/api/session/browser"): "SignedOut",
    ("post", "/api/session/viewer-token"): "ViewerToken",
    ("post", "/api/links/describe"): "LinkDescription",
    ("post", "/api/links/exchange"): "LinkExchanged",
    ("post", "/api/links/launch"): "LinkLaunch",
    ("get", "/api/me/links"): "[]ShareLink",
    ("post", "/api/me/links"): "NewShareLink",
    ("delete", "/api/me/links/{link_id}"): "Notice",
    ("get", "/api/me/consents"): "[]FhirConsent",
    ("post", "/api/me/consents"): "FhirConsent",
    ("delete", "/api/me/consents/{consent_id}"): "FhirConsent",
    ("get", "/api/me/requests"): "[]AccessRequest",
    ("post", "/api/me/requests/{request_id}/{decision}"): "RequestDecided",
    ("post", "/api/requests"): "Created",
    ("get", "/api/me/history"): "History",
    ("post", "/api/break-glass"): "BreakGlassGrant",
    ("get", "/api/break-glass"): "[]BreakGlassGrant",
    ("post", "/api/break-glass/{grant_id}/review"): "Status",
    ("post", "/api/patient-links"): "PatientLinkMade",
    ("get", "/api/me/studies"): "MyStudies",
    ("get", "/api/inbox"): "Inbox",
    ("get", "/api/institutions"): "[]InstitutionChoice",
    ("get", "/api/studies/{study}/actions"): "StudyActions",
}


@pytest.mark.fast
def test_openapi_documents_the_portal_answers(settings: Settings, archive: Archive) -> None:
    with TestClient(create_app(settings, archive)) as http:
        spec = http.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    for (method, path), model in DOCUMENTED.items():
        responses = spec["paths"][path][method]["responses"]
        ok = responses.get("200") or responses["201"]
        schema = ok["content"]["application/json"]["schema"]
        if model.startswith("[]"):
            assert schema["type"] == "array", (method, path)
            schema, model = schema["items"], model[2:]
        assert schema["$ref"] == f"#/components/schemas/{model}", (method, path)
        assert schemas[model]["properties"], model
    # Nested answers are documented down to their leaves.
    inbox = schemas["InboxStudy"]["properties"]
    assert {"study_uid", "institution", "reason", "shared_until"} <= set(inbox)
    assert set(schemas["History"]["properties"]) == {"accesses", "break_glass"}
    # Secrets answered once are said to be so.
    assert "once" in schemas["NewShareLink"]["properties"]["token"]["description"]
