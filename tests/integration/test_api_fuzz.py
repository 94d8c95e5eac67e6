"""Property-based fuzzing of the read API from its committed OpenAPI document (schemathesis).

Every operation gets a bounded number of generated requests, with org A's key, against the real
app behind uvicorn over real PostgreSQL and SeaweedFS: no 5xx, and every status code, content
type and body is one the document declares. Generated ids are mostly unknown ones, so the world
of two tenants is also where a crafted request would find org B's rows if it could.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from pipeline.api.openapi_file import OPENAPI_FILE
from pipeline.devtools.stack import StackInfo
from tests.integration.api_world import ServedApi, World, app_for, build_world, serve_in_thread

SCHEMA = schemathesis.openapi.from_path(OPENAPI_FILE)
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
async def fuzz_world(stack_info: StackInfo) -> Iterator[World]:
    async with build_world(stack_info, seed=41) as built:
        yield built


@pytest.fixture(scope="module")
def served(fuzz_world: World) -> Iterator[ServedApi]:
    # A rate limit the fuzzer cannot reach: 429 is declared, but every request should be judged.
    with serve_in_thread(app_for(fuzz_world, api_rate_burst=1_000_000, api_pool_size=4)) as api:
        yield api


@SCHEMA.parametrize()
@settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)
def test_no_server_errors_and_responses_match_the_document(
    case: schemathesis.Case, served: ServedApi, fuzz_world: World
) -> None:
    a = fuzz_world.a
    response = case.call(base_url=served.url, headers=a.headers, timeout=30)
    case.validate_response(response, checks=CHECKS)
    secrets = fuzz_world.secrets_of(fuzz_world.b)
    leaked = [s for s in secrets if s in response.text and s not in str(case.path_parameters)]
    assert not leaked, f"org B's {leaked[:3]} in an answer to org A"
