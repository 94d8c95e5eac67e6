"""The committed OpenAPI document is the one the app serves (default limits), and it says what the
API promises: bearer auth on every tenant route, problem+json for every error, no 422 shape."""

from __future__ import annotations

import json

from pipeline.api.openapi_file import OPENAPI_FILE, current_document, render


def test_committed_document_is_current() -> None:
    assert OPENAPI_FILE.read_text() == render(current_document()), (
        "pipeline/api/openapi.json is stale: .venv/bin/python -m pipeline.api.openapi_file"
    )


def test_tenant_routes_need_a_key_and_errors_are_problems() -> None:
    document = json.loads(OPENAPI_FILE.read_text())
    for path, item in document["paths"].items():
        operation = item["get"]
        if path.startswith("/v1/"):
            assert operation["security"] == [{"HTTPBearer": []}], path
            assert {"400", "401", "429", "500", "504"} <= set(operation["responses"]), path
        for status, response in operation["responses"].items():
            if int(status) >= 400:
                assert set(response["content"]) == {"application/problem+json"}, (path, status)
    logs = {p["name"]: p for p in document["paths"]["/v1/logs"]["get"]["parameters"]}
    assert logs["limit"]["schema"]["maximum"] == 1000
    assert not {"organization_id", "org", "org_id"} & set(logs), "the key decides the organization"
